// affectkit live view: a session over the WebSocket API, a transcript, and per-speaker probability
// timelines drawn as SVG (no third-party code). Readiness marker for tests: body[data-state="ready"].
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const PALETTE = ["#e6a700", "#3b6fd8", "#8a8a8a", "#d43d3d", "#2aa876", "#8d4bd6", "#e377c2", "#17becf"];
  let ws = null, labels = [], session = null;
  let count = 0;
  const pending = [];  // texts sent, awaiting their answer (answers come in order)
  const series = new Map();  // speaker -> [{position, probs}]

  function setState(state, text) { document.body.dataset.state = state; $("status").textContent = text; }
  function showError(text) { $("error").textContent = text || ""; }
  const colour = (i) => PALETTE[i % PALETTE.length];

  async function api(method, path, token) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const r = await fetch(path, { method, headers });
    if (!r.ok) throw new Error(method + " " + path + ": " + r.status + " " + (await r.text()));
    return r.status === 204 ? null : r.json();
  }

  function legend() {
    const box = $("legend");
    box.replaceChildren();
    labels.forEach((name, i) => {
      const s = document.createElement("span");
      s.textContent = name;
      s.style.setProperty("--c", colour(i));
      box.appendChild(s);
    });
  }

  function addRow(u) {
    const tr = document.createElement("tr");
    tr.dataset.position = u.position;
    tr.dataset.label = u.label;
    if (u.source === "audio" || u.audio) tr.dataset.source = "audio";
    const probs = Array.isArray(u.probs) ? u.probs : labels.map((n) => u.probs[n]);
    const idx = labels.indexOf(u.label);
    const cells = [String(u.position), u.speaker, u.text || "(features)", null,
                   probs[idx].toFixed(2), u.latency_ms.toFixed(1)];
    cells.forEach((text, k) => {
      const td = document.createElement("td");
      if (k === 3) {
        const chip = document.createElement("span");
        chip.className = "chip label";
        chip.textContent = u.label;
        chip.style.background = colour(idx);
        td.appendChild(chip);
      } else {
        td.textContent = text;
      }
      if (k === 0 || k >= 4) td.className = "num";
      tr.appendChild(td);
    });
    $("rows").appendChild(tr);
    if (!series.has(u.speaker)) {
      series.set(u.speaker, []);
      const o = document.createElement("option");
      o.value = u.speaker;
      $("speakers").appendChild(o);
    }
    series.get(u.speaker).push({ position: u.position, probs });
    $("latency").textContent = "last answer " + u.latency_ms.toFixed(1) + " ms";
    draw();
  }

  function draw() {
    const box = $("charts");
    box.querySelectorAll("svg").forEach((s) => s.remove());
    let last = 0;
    series.forEach((pts) => { last = Math.max(last, pts[pts.length - 1].position); });
    const W = 460, H = 150, L = 34, R = 10, T = 18, B = 20;
    const x = (p) => L + (last === 0 ? 0 : (p / last) * (W - L - R));
    const y = (v) => T + (1 - v) * (H - T - B);
    series.forEach((pts, speaker) => {
      const svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("class", "chart");
      svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
      svg.setAttribute("width", W);
      svg.setAttribute("height", H);
      svg.dataset.speaker = speaker;
      const el = (tag, attrs, text) => {
        const e = document.createElementNS(SVG, tag);
        for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
        if (text !== undefined) e.textContent = text;
        svg.appendChild(e);
        return e;
      };
      el("text", { x: L, y: 12 }, speaker);
      for (const v of [0, 0.5, 1]) {
        el("line", { class: "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) });
        el("text", { x: 4, y: y(v) + 4 }, v.toFixed(1));
      }
      el("text", { x: W - R - 60, y: H - 4 }, "position " + last);
      labels.forEach((name, c) => {
        el("polyline", { fill: "none", stroke: colour(c), "stroke-width": 2,
                         points: pts.map((p) => `${x(p.position)},${y(p.probs[c])}`).join(" ") });
        pts.forEach((p) => {
          const dot = el("circle", { class: "pt", cx: x(p.position), cy: y(p.probs[c]), r: 3, fill: colour(c) });
          dot.dataset.position = p.position;
          dot.dataset.label = name;
          dot.appendChild(document.createElementNS(SVG, "title")).textContent =
            `${speaker} #${p.position} ${name} ${p.probs[c].toFixed(3)}`;
        });
      });
      box.appendChild(svg);
    });
  }

  const streamUrl = (id, token) => {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/v1/sessions/${encodeURIComponent(id)}/stream?token=${encodeURIComponent(token)}`;
  };

  // Microphones: one WebSocket per participant; the AudioWorklet (mic-worklet.js) makes 16 kHz s16le frames.
  const mics = new Map();  // speaker -> {sock, ctx, media, badge}

  function micState(speaker, text, state) {
    const m = mics.get(speaker);
    if (!m) return;
    m.badge.textContent = "\u266A " + speaker + ": " + text;
    m.badge.dataset.state = state;
  }

  function stopMic(speaker) {
    const m = mics.get(speaker);
    if (!m) return;
    mics.delete(speaker);
    m.media.getTracks().forEach((t) => t.stop());
    m.ctx.close();
    if (m.sock.readyState === WebSocket.OPEN) m.sock.send(JSON.stringify({ type: "audio_end" }));
    setTimeout(() => m.sock.close(), 3000);  // the last utterance's answer may still come
    m.badge.remove();
  }

  async function startMic(speaker) {
    const media = await navigator.mediaDevices.getUserMedia(
      { audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
    const ctx = new AudioContext();
    await ctx.audioWorklet.addModule("/static/mic-worklet.js");
    const node = new AudioWorkletNode(ctx, "affectkit-downsampler");
    ctx.createMediaStreamSource(media).connect(node);
    node.connect(ctx.destination);  // pulls the graph; the processor writes silence
    const sock = new WebSocket(streamUrl(session.id, session.token));
    sock.binaryType = "arraybuffer";
    const badge = document.createElement("span");
    badge.className = "mic";
    badge.dataset.speaker = speaker;
    $("mics").appendChild(badge);
    mics.set(speaker, { sock, ctx, media, badge });
    micState(speaker, "connecting", "connecting");
    sock.onmessage = (ev) => {
      const m = JSON.parse(ev.data);
      if (m.type === "ready") {
        sock.send(JSON.stringify({ type: "audio", speaker,
                                   format: { encoding: "s16le", sample_rate: 16000, channels: 1 } }));
      } else if (m.type === "audio_ready") {
        node.port.onmessage = (e) => { if (sock.readyState === WebSocket.OPEN) sock.send(e.data); };
        micState(speaker, "listening", "listening");
      } else if (m.type === "speech_start") {
        micState(speaker, "speaking", "speaking");
      } else if (m.type === "speech_end") {
        micState(speaker, "transcribing", "transcribing");
      } else if (m.type === "transcript") {
        micState(speaker, "\u201C" + m.text + "\u201D", "listening");
      } else if (m.type === "prediction") {
        addRow({ ...m, source: "audio" });
        count = m.position + 1;
        $("status").textContent = `session ${session.id}: ${count} utterances, ${labels.length} emotions`;
      } else if (m.type === "error") {
        showError(speaker + ": " + m.error + ": " + m.detail);
      }
    };
    sock.onclose = () => { if (mics.get(speaker)?.sock === sock) stopMic(speaker); };
  }

  $("mic").onclick = async () => {
    const speaker = $("speaker").value.trim();
    if (!speaker) { showError("name the speaker whose microphone this is"); return; }
    if (mics.has(speaker)) { stopMic(speaker); return; }
    try {
      await startMic(speaker);
    } catch (e) {
      stopMic(speaker);
      showError("microphone: " + e.message);
    }
  };

  function connect(id, token) {
    if (ws) ws.close();
    setState("connecting", "connecting");
    ws = new WebSocket(streamUrl(id, token));
    ws.onmessage = (ev) => {
      const m = JSON.parse(ev.data);
      if (m.type === "ready") {
        $("send").disabled = false;
        $("mic").disabled = !window.AudioWorkletNode || !navigator.mediaDevices;
        count = m.position;
        setState("ready", `session ${id}: ${count} utterances, ${m.labels.length} emotions`);
      } else if (m.type === "prediction") {
        showError("");
        addRow({ ...m, text: pending.shift() });
        count = m.position + 1;
        $("status").textContent = `session ${id}: ${count} utterances, ${labels.length} emotions`;
      } else if (m.type === "error") {
        pending.shift();
        showError(m.error + ": " + m.detail);
      }
    };
    ws.onclose = (ev) => {
      $("send").disabled = true;
      $("mic").disabled = true;
      setState("closed", "disconnected" + (ev.reason ? ": " + ev.reason : ""));
    };
  }
  async function open(id, token) {
    showError("");
    try {
      const t = await api("GET", `/v1/sessions/${encodeURIComponent(id)}`, token);
      [...mics.keys()].forEach(stopMic);
      session = { id, token };
      labels = t.labels;
      $("rows").replaceChildren();
      series.clear();
      $("speakers").replaceChildren();
      legend();
      t.utterances.forEach(addRow);
      $("sid").value = id;
      $("token").value = token;
      history.replaceState(null, "", `#id=${encodeURIComponent(id)}&token=${encodeURIComponent(token)}`);
      connect(id, token);
    } catch (e) {
      setState("error", "could not open the session");
      showError(e.message);
    }
  }

  $("new").onclick = async () => {
    try {
      const s = await api("POST", "/v1/sessions");
      await open(s.id, s.token);
    } catch (e) { showError(e.message); }
  };
  $("open").onclick = () => open($("sid").value.trim(), $("token").value.trim());
  $("say").onsubmit = (ev) => {
    ev.preventDefault();
    if (!ws || ws.readyState !== WebSocket.OPEN || !session) return;
    const text = $("text").value.trim(), speaker = $("speaker").value.trim();
    if (!text || !speaker) return;
    pending.push(text);
    ws.send(JSON.stringify({ speaker, text }));
    $("text").value = "";
    $("text").focus();
  };

  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("id") && params.get("token")) {
    open(params.get("id"), params.get("token"));
  } else {
    setState("idle", "start a new session or reopen one");
  }
})();

// affectkit microphone capture: an AudioWorkletProcessor that averages the context's samples down to
// 16 kHz (a box filter: enough against aliasing for speech), converts them to 16-bit PCM and posts
// 100 ms frames (1600 samples, 3200 bytes) to the page, which sends them over the WebSocket.
"use strict";
const RATE = 16000, FRAME = 1600;

class AffectkitDownsampler extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / RATE;  // context samples per output sample (e.g. 3 at 48 kHz)
    this.pos = 0; this.sum = 0; this.n = 0;
    this.out = new Int16Array(FRAME); this.k = 0;
  }

  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (!ch) return true;
    for (let i = 0; i < ch.length; i++) {
      this.sum += ch[i]; this.n += 1; this.pos += 1;
      if (this.pos >= this.step) {
        this.pos -= this.step;
        const v = Math.max(-1, Math.min(1, this.sum / this.n));
        this.sum = 0; this.n = 0;
        this.out[this.k++] = Math.round(v * 32767);
        if (this.k === FRAME) {
          this.port.postMessage(this.out.buffer, [this.out.buffer]);
          this.out = new Int16Array(FRAME); this.k = 0;
        }
      }
    }
    return true;
  }
}

registerProcessor("affectkit-downsampler", AffectkitDownsampler);

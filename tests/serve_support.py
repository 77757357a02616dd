"""Helpers for the service tests: a small trained causal text-only checkpoint, a deterministic fake
sentence encoder, a server in a thread (uvicorn) and a server in a subprocess (``affectkit serve``)."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from affectkit.config import load_config
from affectkit.data.synthetic_conversation import write_synthetic_conversations
from affectkit.train import train

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")

#: The tiny text-only causal model of the in-process service tests (its info and build parameters).
DIM = 8
INFO = {"dims": {"text": DIM}, "n_classes": 4, "label_names": ["hap", "sad", "neu", "ang"], "n_speakers": 2,
        "speakers": ["F", "M"]}
SMALL = {"hidden": 8, "text_ff": 16, "text_layers": 1, "text_heads": 2, "graph_heads": 2, "wp": 3, "wf": 0,
         "causal": True, "modalities": ["text"]}


def data_root() -> Path:
    """Real data: $AFFECTKIT_DATA, else ``../shared/data`` beside the repository."""
    env = os.environ.get("AFFECTKIT_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def train_text_checkpoint(root: Path, dim: int, data: Path | None = None,
                          preset: str = "corect_iemocap4_causal") -> Path:
    """A causal text-only CORECT (tiny, one epoch) trained by the one trainer; on ``data`` if given, else
    on a synthetic IEMOCAP-4 file with ``dim``-d text features.  Returns the best.pt path."""
    if data is None:
        data = root / f"text{dim}.pkl"
        write_synthetic_conversations(data, "iemocap4", seed=0, n_dialogues={"train": 6, "dev": 2, "test": 2})
        raw = pickle.loads(data.read_bytes())
        for split in ("train", "dev", "test"):
            for d in raw[split]:
                d["text"] = d["text"][:, :dim].copy()
                del d["audio"], d["visual"]
        data.write_bytes(pickle.dumps(raw))
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml", [
        "model.modalities=[text]", "model.hidden=16", "model.text_ff=32", "model.text_layers=1",
        "model.graph_heads=2", "train.epochs=1", "train.progress=false", "train.tensorboard=false",
        f"out_dir={root / 'runs'}"])
    return train(cfg, data_path=data).run_dir / "best.pt"


def fake_embed(sentences: list[str], dim: int = 384) -> np.ndarray:
    """A deterministic stand-in for the sentence encoder: a vector seeded by the sentence's hash."""
    return np.stack([np.random.default_rng(int.from_bytes(hashlib.sha1(s.encode()).digest()[:4], "little"))
                     .standard_normal(dim).astype(np.float32) for s in sentences])


def embed(sentences: list[str]) -> np.ndarray:
    """The stand-in encoder at the small model's width (``DIM``)."""
    return fake_embed(sentences, DIM)


def small_model() -> tuple[Any, dict]:
    """The small causal CORECT of the service tests (seed 0, eval mode) and its info."""
    import torch

    from affectkit.models import build_model

    torch.manual_seed(0)
    return build_model("corect", SMALL, INFO).eval(), INFO


@contextmanager
def thread_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on 127.0.0.1 (ephemeral port); yields the base URL."""
    import uvicorn

    from affectkit.serve.run import bind, uvicorn_config
    from affectkit.serve.service import ServeSettings

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn_config(app, ServeSettings()))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.05)
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server thread did not stop"


class ServerProcess:
    """``affectkit serve CHECKPOINT --port 0 --store STORE`` as a child process; ``url`` once it listens."""

    def __init__(self, checkpoint: Path, store: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "affectkit.cli", "-q", "serve", str(checkpoint), "--port", "0",
             "--store", str(store), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        line = self.proc.stdout.readline() if ready else ""
        m = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
        if not m:
            self.stop()
            raise AssertionError(f"server did not start: {line!r} {self.proc.stderr.read()[-2000:]!r}")
        self.url = m.group(1)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def open_session_page(page: Any, url: str) -> list[str]:
    """Load the browser view at ``url`` in a Playwright ``page`` and open a new session; returns the list that
    collects the page's script errors and console errors (a test asserts it stays empty)."""
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url + "/")
    page.wait_for_selector('body[data-state="idle"]')
    page.click("#new")
    page.wait_for_selector('body[data-state="ready"]')
    return errors

"""``affectkit serve`` in a child process for the benches: started on 127.0.0.1 with ``--port 0``, its URL
read from the "serving on" line, its CPU time read from /proc, stopped (terminate, then kill) at the end.
One copy for bench/serve.py, bench/audio.py and bench/soak.py."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ServeProcess:
    """The service over ``checkpoint`` logging to ``store``, with ``args`` added to the command line."""

    def __init__(self, checkpoint: Path, store: Path, args: list[str] | tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        child_env = {**os.environ, **(env or {}),
                     "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "affectkit.cli", "-q", "serve", str(checkpoint), "--port", "0", "--store",
             str(store), *args], stdout=subprocess.PIPE, text=True, env=child_env)
        ready, _, _ = select.select([self.proc.stdout], [], [], 300)
        m = re.search(r"serving on (http://[\d.]+:\d+)", self.proc.stdout.readline() if ready else "")
        if not m:
            self.stop()
            raise SystemExit("the server did not start")
        self.url = m.group(1)

    def cpu(self) -> float:
        """User + system CPU seconds of the server so far (from /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

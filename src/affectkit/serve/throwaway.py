"""A throw-away PostgreSQL cluster and HAProxy on 127.0.0.1, for the tests, the benches and trying replicas on one
machine: Debian's binaries (``initdb``/``pg_ctl``, ``haproxy``), a temporary folder, a free port, and a stop that
leaves no process behind.  Run as root, PostgreSQL runs as the ``postgres`` user (it refuses root)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["LocalHAProxy", "LocalPostgres", "free_port", "haproxy_config", "haproxy_missing", "postgres_missing"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


def postgres_missing() -> str | None:
    """Why a throw-away PostgreSQL cannot be started here (None: it can)."""
    if _pg_bin() is None:
        return "PostgreSQL's initdb/pg_ctl not found (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    return None


def haproxy_missing() -> str | None:
    """Why HAProxy cannot be started here (None: it can)."""
    return None if shutil.which("haproxy") else "haproxy not found (apt-get install haproxy)"


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


class LocalPostgres:
    """``initdb`` + ``pg_ctl start`` in a temporary folder, listening on 127.0.0.1 only (trust authentication
    for the user ``affectkit``); :meth:`stop` stops the server and deletes the folder.  ``fsync`` off only for
    tests that measure nothing."""

    def __init__(self, fsync: bool = True) -> None:
        reason = postgres_missing()
        if reason:
            raise RuntimeError(reason)
        self.bin = _pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="affectkit-pg-"))
        self.port = free_port()
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user:
            ids = pwd.getpwnam(self._user)
            os.chown(self.root, ids.pw_uid, ids.pw_gid)
        self.started = False
        try:
            self._pg("initdb", "-D", str(self.root / "data"), "-U", "affectkit", "--auth=trust", "-E", "UTF8",
                     "--no-sync")
            opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync={'on' if fsync else 'off'}"
                    " -c max_connections=200")
            self._pg("pg_ctl", "-D", str(self.root / "data"), "-o", opts, "-l", str(self.root / "log"), "-w",
                     "-t", "60", "start")
            self.started = True
        except BaseException:
            self.stop()
            raise

    def _pg(self, tool: str, *args: str) -> None:
        assert self.bin is not None
        out = subprocess.run([str(self.bin / tool), *args], user=self._user, capture_output=True, text=True,
                             timeout=120, cwd=self.root)
        if out.returncode:
            raise RuntimeError(f"{tool} failed: {(out.stderr or out.stdout).strip()[-500:]}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://affectkit@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        import psycopg

        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"database name {name!r}: lower-case letters, digits and _ only")
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown: clients are disconnected) and delete its folder."""
        try:
            if self.started:
                self._pg("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "-t", "60", "stop")
                self.started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def haproxy_config(sample: str, port: int, servers: list[int]) -> str:
    """The sample configuration (``examples/haproxy.cfg``) listening on 127.0.0.1:``port`` with one ``server``
    line per replica port in each backend (its other settings as they are)."""
    out: list[str] = []
    for line in sample.splitlines():
        stripped = line.strip()
        if stripped.startswith("bind "):
            out.append(f"    bind 127.0.0.1:{port}")
        elif stripped.startswith("server "):
            if not out or not out[-1].strip().startswith("server "):
                out += [f"    server r{i + 1} 127.0.0.1:{p} check" for i, p in enumerate(servers)]
        else:
            out.append(line)
    return "\n".join(out) + "\n"


class LocalHAProxy:
    """``haproxy -db -f CONFIG`` (foreground, a child of this process) with ``config`` written to a temporary
    file; ``port``: the port its frontend binds (the caller wrote it into ``config``)."""

    def __init__(self, config: str, port: int) -> None:
        reason = haproxy_missing()
        if reason:
            raise RuntimeError(reason)
        self.root = Path(tempfile.mkdtemp(prefix="affectkit-haproxy-"))
        cfg = self.root / "haproxy.cfg"
        cfg.write_text(config)
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
        if check.returncode:
            shutil.rmtree(self.root, ignore_errors=True)
            raise RuntimeError(f"haproxy -c: {(check.stderr or check.stdout).strip()[-800:]}")
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = self.root / "haproxy.log"
        with open(self.log, "w") as log:  # a file, not a pipe nobody reads (a full pipe would stall it)
            self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=log)
        try:
            _wait_port(port, 30, self.proc)
        except RuntimeError as exc:
            err = self.log.read_text()[-800:]
            self.stop()
            raise RuntimeError(f"haproxy: {exc} {err}".strip()) from None
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalHAProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Where a study's runs execute: in this process, in a local pool of processes, or as Ray tasks on a cluster.

Every engine takes the same jobs (plain dicts: variant, seed, run config, run folder) and reports a
:class:`RunOutcome` per finished run to the caller's ``record``; the tables are written afterwards from the run
folders alone, by the same code for every engine (:mod:`affectkit.studies.report`).  Jobs may come from an
iterator that is read only when a slot is free (``in_flight`` at a time: a sweep asks for its next trial then),
and ``decide(job, epoch, score)`` hears every epoch's dev score and may stop the run (a sweep's pruner); on Ray
the scores travel from the task to the driver through a small actor, so the driver stays the only writer.

The Ray engine assumes no shared file system: the data file is shipped once through Ray's object store (a node
that holds the same file at the same path, checked by sha256, uses it directly), each run trains into a
temporary folder on its node and returns its metrics and the folder's files as bytes, and the driver alone
writes them into the study folder (atomically: a run folder appears complete or not at all). A run is an
idempotent task, so Ray may retry it on another node when a worker process or a node dies.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tarfile
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affectkit.config import apply_overrides, config_from_dict
from affectkit.data.provenance import file_sha256
from affectkit.errors import ConfigError
from affectkit.studies.report import PROVENANCE_FILE

log = logging.getLogger("affectkit")

Record = Callable[["RunOutcome"], None]
#: ``decide(job, epoch, score)`` -> True to stop the run there (pruned).
Decide = Callable[[dict[str, Any], int, float], bool]


@dataclass
class RunOutcome:
    """What became of one job: trained (``ok``), failed (``error``) or stopped early by a pruner (``pruned``)."""

    variant: str
    seed: int
    ok: bool
    seconds: float
    error: str = ""
    pruned: bool = False
    #: The run's metrics.json (ok runs) or what a pruned run reported: {"epochs": [...scores]}.
    metrics: dict[str, Any] = field(default_factory=dict)
    #: Where it ran (the Ray node id on the ray engine).
    node: str = ""


class PruneRun(Exception):  # noqa: N818 - a signal, not an error
    """Raised by an ``on_epoch`` callback to stop a run early (a sweep's pruner said so)."""


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def device_of(raw: dict[str, Any]) -> str:
    """A run config's ``train.device`` (``auto`` when the config has none)."""
    return str((raw.get("train") or {}).get("device") or "auto")


def gpus_for(device: str, cluster_gpus: float, per_run: float = 1.0) -> float:
    """GPUs a run asks Ray for: ``per_run`` (1 or a fraction) when its device is cuda, or ``auto`` on a
    cluster that has GPUs; none for cpu or mps."""
    if device.startswith("cuda") or (device == "auto" and cluster_gpus > 0):
        return per_run
    return 0.0


# ----------------------------------------------------------------------------- one run, on any engine

_DATA_CACHE: dict[tuple[Any, ...], Any] = {}
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def cached_sha256(path: str | Path) -> str:
    """The sha256 of a file, computed once per (path, size, mtime) in this process."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


def load_run_data(cfg: Any, path: str | Path) -> Any:
    """The data of a run, kept between the runs of one process (one file and modality set at a time)."""
    from affectkit.models.registry import model_config
    from affectkit.tasks import get_task

    task = get_task(cfg.data.task)
    mcfg = model_config(cfg.model_name, cfg.model_params)
    key = (task.name, cached_sha256(path), repr(getattr(mcfg, "modalities", None)), repr(cfg.data.classes))
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = task.load(Path(path), mcfg, cfg.data)
    return _DATA_CACHE[key]


def hide_test_split(data: Any, task: Any) -> Any:
    """A view of ``data`` whose test split is its validation split: a sweep's trials never see test data
    (the one trainer always evaluates its third split; here that is the dev split once more)."""
    import dataclasses

    train_s, valid_s, test_s = task.splits
    return dataclasses.replace(data, splits={**data.splits, test_s: data.splits[valid_s]})


def execute_run(job: dict[str, Any], folder: Path, data_path: str | Path,
                on_epoch: Callable[[int, float], None] | None = None) -> RunOutcome:
    """Train one job into ``folder`` (made empty first) with the one trainer, then write ``provenance.json``
    (the sha256 of the data trained on). Any exception becomes a failed outcome and ``error.txt``;
    :class:`PruneRun` from ``on_epoch`` a pruned one. ``job["hide_test"]`` trains without the test split."""
    import affectkit.train as trainer
    from affectkit.tasks import get_task

    start = time.perf_counter()
    scores: list[float] = []

    def report(epoch: int, score: float) -> None:
        scores.append(score)
        if on_epoch is not None:
            on_epoch(epoch, score)

    try:
        raw = job["config"]
        if job.get("device"):
            raw = apply_overrides(raw, {"train.device": job["device"]})
        cfg = config_from_dict(raw)
        if folder.exists():  # a run interrupted earlier: start clean
            shutil.rmtree(folder)
        data = load_run_data(cfg, data_path)
        if job.get("hide_test"):
            data = hide_test_split(data, get_task(cfg.data.task))
        trainer.train(cfg, data_path=cfg.data.path, run_dir=folder, data=data, on_epoch=report)
        sha = cached_sha256(data_path)
        from affectkit.studies.run import full_model_config

        (folder / PROVENANCE_FILE).write_text(json.dumps({
            "data_sha256": sha, "data_file": Path(str(cfg.data.path)).name, "host": socket.gethostname(),
            "test_split": "hidden (replaced by the dev split)" if job.get("hide_test") else "evaluated",
            "model_config": full_model_config(cfg),
        }, indent=2))
        metrics = json.loads((folder / "metrics.json").read_text())
        return RunOutcome(job["variant"], job["seed"], True, time.perf_counter() - start, metrics=metrics)
    except PruneRun:
        return RunOutcome(job["variant"], job["seed"], False, time.perf_counter() - start, "pruned", True,
                          {"epochs": scores})
    except Exception as exc:  # one failed run must not stop the study
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.txt").write_text(traceback.format_exc())
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return RunOutcome(job["variant"], job["seed"], False, time.perf_counter() - start, msg,
                          metrics={"epochs": scores})


# ----------------------------------------------------------------------------- local: this process or a pool

_WORKER_DEVICE: str | None = None


def _init_worker(threads: int, devices: Any) -> None:
    import torch

    global _WORKER_DEVICE
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    torch.set_num_threads(threads)
    if devices is not None:
        _WORKER_DEVICE = devices.get()  # one device per worker, for the worker's life


def _pool_job(job: dict[str, Any]) -> RunOutcome:
    if _WORKER_DEVICE is not None:
        job = {**job, "device": _WORKER_DEVICE}
    return execute_run(job, Path(job["run_dir"]), job["config"]["data"]["path"])


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued runs and end the running ones (their folders lack metrics.json: they rerun)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.join(timeout=10)


class LocalEngine:
    """Runs in this process (``workers=1``) or in ``workers`` spawned processes with ``threads`` torch threads
    each; ``devices`` (e.g. ``cuda:0 cuda:1``) gives each worker process one device for its life."""

    name = "local"

    def __init__(self, workers: int = 1, threads: int | None = None, devices: Sequence[str] | None = None):
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        if devices and len(devices) < workers:
            raise ConfigError(f"--devices: {len(devices)} device(s) for {workers} workers; give one per worker")
        self.workers, self.threads, self.devices = workers, threads, list(devices or [])

    def run(self, jobs: Iterable[dict[str, Any]], record: Record, decide: Decide | None = None,
            in_flight: int | None = None) -> None:
        """Run ``jobs`` (read as slots free up), ``record`` each outcome; ``decide`` (this process only) may stop
        a run after any epoch."""
        import torch

        known = len(jobs) if isinstance(jobs, Sequence) else None  # an iterator: as many as it yields
        if known == 0:
            return
        workers = max(1, min(self.workers, known or self.workers, in_flight or self.workers))
        if decide is not None and (workers > 1 or self.devices):
            raise ConfigError("per-epoch decisions (pruning) need one worker in this process, or the ray engine")
        threads = self.threads or max(1, available_cores() // workers)
        if workers == 1 and not self.devices:
            before, level = torch.get_num_threads(), log.level
            torch.set_num_threads(threads)
            log.setLevel(logging.WARNING)  # the study's bar replaces the per-epoch log lines
            try:
                for job in jobs:
                    record(execute_run(job, Path(job["run_dir"]), job["config"]["data"]["path"],
                                       _stopper(decide, job)))
            finally:
                torch.set_num_threads(before)
                log.setLevel(level)
            return
        ctx = mp.get_context("spawn")  # fresh interpreters: no forked OpenMP/torch thread state
        slots = None
        if self.devices:
            slots = ctx.Manager().Queue()
            for d in self.devices[:workers]:
                slots.put(d)
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads, slots))
        pending = iter(jobs)
        futures: dict[Any, dict[str, Any]] = {}
        try:
            while True:
                while len(futures) < (len(futures) + 1 if in_flight is None else in_flight):
                    job = next(pending, None)
                    if job is None:
                        break
                    futures[pool.submit(_pool_job, job)] = job
                if not futures:
                    break
                done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                for fut in done:
                    job = futures.pop(fut)
                    try:
                        record(fut.result())
                    except Exception as exc:  # a worker process died (killed, out of memory): no hang
                        record(RunOutcome(job["variant"], job["seed"], False, 0.0,
                                          f"worker process died ({type(exc).__name__})"))
        except BaseException:  # Ctrl-C: stop now; finished runs are kept, the cut ones rerun next time
            _stop(pool)
            raise
        pool.shutdown()


def _stopper(decide: Decide | None, job: dict[str, Any]) -> Callable[[int, float], None] | None:
    """The trainer's ``on_epoch`` that asks ``decide`` and stops the run (:class:`PruneRun`) when told."""
    if decide is None:
        return None

    def on_epoch(epoch: int, score: float) -> None:
        if decide(job, epoch, score):
            raise PruneRun(job["variant"])

    return on_epoch


# ----------------------------------------------------------------------------- ray: tasks on a cluster


def pack_folder(folder: Path) -> bytes:
    """A run folder's files as tar bytes (paths relative to the folder; uncompressed: weights barely compress)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=str(p.relative_to(folder)), recursive=False)
    return buf.getvalue()


def install_folder(archive: bytes, folder: Path) -> None:
    """Unpack a run's bytes into ``folder``, replacing what was there, in one rename: a reader sees the old
    folder or the whole new one, never a half-written run. Refuses absolute paths and links in the archive."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    incoming = folder.parent / f".{folder.name}.incoming-{uuid.uuid4().hex[:8]}"
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
        for m in tar.getmembers():
            if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in Path(m.name).parts:
                raise ConfigError(f"refused run archive member {m.name!r} (not a plain relative file)")
        tar.extractall(incoming, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    if folder.exists():
        shutil.rmtree(folder)
    incoming.rename(folder)


def clean_incoming(out: Path) -> None:
    """Remove the half-unpacked folders a driver killed while installing a run left behind."""
    for p in Path(out).glob("runs/*/.*.incoming-*"):
        shutil.rmtree(p, ignore_errors=True)


def _local_data_copy(path: str, sha: str, box: list[Any]) -> str:
    """This node's copy of the run's data file: the driver's path when it holds the same content here,
    else a file in the node's temp folder named by its sha256, written once from the object store."""
    import ray

    if Path(path).is_file() and cached_sha256(path) == sha:
        return path
    cache = Path(tempfile.gettempdir()) / "affectkit-data"
    target = cache / f"{sha}.pkl"
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        data = ray.get(box[0])
        tmp = cache / f".{sha}.{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(data)
        if file_sha256(tmp) != sha:
            tmp.unlink()
            raise ConfigError(f"{path}: the shipped data does not match its sha256")
        tmp.replace(target)
    return str(target)


def ray_run(job: dict[str, Any], box: list[Any], threads: int,
            relay: Any = None) -> tuple[RunOutcome, bytes | None]:
    """The Ray task: train one job into a temporary folder on this node; return the outcome and the folder's
    files as bytes (no shared file system). ``box`` holds the data's object ref (not resolved unless this
    node lacks the file). ``relay`` (an actor) carries each epoch's score to the driver and its decision back."""
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("affectkit").setLevel(logging.WARNING)
    on_epoch = None
    if relay is not None:
        import ray

        key = job["variant"]

        def on_epoch(epoch: int, score: float) -> None:
            if ray.get(relay.report.remote(key, epoch, score)):
                raise PruneRun(key)

    data_path = _local_data_copy(str(job["config"]["data"]["path"]), job["data_sha256"], box)
    with tempfile.TemporaryDirectory(prefix="affectkit-run-") as tmp:
        folder = Path(tmp) / "run"
        outcome = execute_run(job, folder, data_path, on_epoch)
        archive = pack_folder(folder) if folder.is_dir() else None
    import ray

    outcome.node = ray.get_runtime_context().get_node_id()
    return outcome, archive


def _relay(ray: Any) -> Any:
    """A small async actor between running tasks and the driver: a task reports an epoch's score and waits for
    the driver's decision (stop or go on); the driver drains the reports and decides."""
    import asyncio

    @ray.remote(num_cpus=0)
    class Relay:
        def __init__(self) -> None:
            self.queue: list[tuple[str, int, float]] = []
            self.waiting: dict[tuple[str, int], Any] = {}
            self.decided: dict[tuple[str, int], bool] = {}

        async def report(self, key: str, epoch: int, score: float) -> bool:
            event = asyncio.Event()
            self.waiting[(key, epoch)] = event
            self.queue.append((key, epoch, score))
            await event.wait()
            return self.decided.pop((key, epoch))

        async def drain(self) -> list[tuple[str, int, float]]:
            queue, self.queue = self.queue, []
            return queue

        async def decide(self, key: str, epoch: int, stop: bool) -> None:
            self.decided[(key, epoch)] = stop
            event = self.waiting.pop((key, epoch), None)
            if event is not None:
                event.set()

    return Relay.remote()


class RayEngine:
    """Each run a Ray task on the cluster at ``address`` (``auto``, ``HOST:PORT``, or None: a local instance
    started here and stopped at the end; an already connected session is used as it is). A task asks for
    ``threads`` CPUs (the run config's ``train.num_threads`` when set) and ``gpus_per_run`` GPUs when its
    ``train.device`` is cuda (or auto on a cluster with GPUs); Ray retries it up to ``retries`` times when
    its worker process or node dies."""

    name = "ray"

    def __init__(self, address: str | None = None, threads: int | None = None, gpus_per_run: float = 1.0,
                 retries: int = 3):
        self.address, self.threads, self.gpus_per_run, self.retries = address, threads, gpus_per_run, retries
        self._started = False

    def start(self) -> Any:
        """Connect (or start a local instance); returns the ``ray`` module."""
        try:
            import ray
        except ImportError:
            raise ConfigError("the ray engine needs Ray: pip install 'affectkit[ray]'") from None
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:  # "local": a new instance on this machine, never one a stale /tmp/ray file points to
                ray.init(address="local", num_cpus=available_cores(), **kwargs)
            self._started = True
        return ray

    def stop(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def resources(self, ray: Any, raw: dict[str, Any]) -> dict[str, float]:
        """The task options of one run: CPUs (its thread count), GPUs (by its device), retries."""
        tc = raw.get("train") or {}
        cpus = int(tc.get("num_threads") or self.threads or 1)
        gpus = gpus_for(device_of(raw), float(ray.cluster_resources().get("GPU", 0)), self.gpus_per_run)
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if nodes and not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
            raise ConfigError(f"no Ray node has {cpus} CPU(s)" + (f" and {gpus:g} GPU(s)" if gpus else "")
                              + " for one run; lower train.num_threads or add such a node")
        return {"num_cpus": cpus, "num_gpus": gpus, "max_retries": self.retries}

    def run(self, jobs: Iterable[dict[str, Any]], record: Record, decide: Decide | None = None,
            in_flight: int | None = None) -> None:
        """Run ``jobs`` as tasks, ``in_flight`` at a time (None: all at once), reading the next job only when one
        finishes; ``record`` each outcome; ``decide`` hears every epoch's score on the driver."""
        if isinstance(jobs, Sequence) and not jobs:
            return
        ray = self.start()
        try:
            task = ray.remote(ray_run)
            relay = _relay(ray) if decide is not None else None
            boxes: dict[str, list[Any]] = {}
            options: dict[tuple[Any, str], dict[str, float]] = {}

            def submit(job: dict[str, Any]) -> Any:
                sha = job["data_sha256"]
                if sha not in boxes:  # each distinct data file goes into the object store once
                    boxes[sha] = [ray.put(Path(job["config"]["data"]["path"]).read_bytes())]
                key = ((job["config"].get("train") or {}).get("num_threads"), device_of(job["config"]))
                if key not in options:
                    options[key] = self.resources(ray, job["config"])
                opts = options[key]
                return task.options(**opts).remote(job, boxes[sha], opts["num_cpus"], relay)

            self._collect(ray, iter(jobs), submit, record, decide, relay, in_flight)
        finally:
            self.stop()

    def _collect(self, ray: Any, jobs: Iterator[dict[str, Any]], submit: Callable[[dict[str, Any]], Any],
                 record: Record, decide: Decide | None, relay: Any, in_flight: int | None) -> None:
        """The one collection loop: keep ``in_flight`` tasks running, relay epoch scores, install and record
        each finished run."""
        refs: dict[Any, dict[str, Any]] = {}
        more = True
        try:
            while True:
                while more and (in_flight is None or len(refs) < in_flight):
                    job = next(jobs, None)
                    if job is None:
                        more = False
                        break
                    refs[submit(job)] = job
                if not refs:
                    break
                done, _ = ray.wait(list(refs), num_returns=1, timeout=0.2 if relay is not None else None)
                if relay is not None:
                    running = {j["variant"]: j for j in refs.values()}
                    for key, epoch, score in ray.get(relay.drain.remote()):
                        stop = key in running and decide is not None and bool(decide(running[key], epoch, score))
                        relay.decide.remote(key, epoch, stop)
                for ref in done:
                    job = refs.pop(ref)
                    try:
                        outcome, archive = ray.get(ref)
                    except Exception as exc:  # retries spent: the task's worker or node kept dying
                        record(RunOutcome(job["variant"], job["seed"], False, 0.0,
                                          f"ray task lost ({type(exc).__name__})"))
                        continue
                    if archive is not None:
                        install_folder(archive, Path(job["run_dir"]))
                    record(outcome)
        except BaseException:  # Ctrl-C: cancel what is in flight; installed runs are kept
            for ref in refs:
                ray.cancel(ref, force=True)
            raise

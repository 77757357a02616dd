"""Cross-session micro-batching: callers submit one item each; one worker takes what is queued (up to
``max_batch``, waiting at most ``max_wait_ms`` for more), runs the batch function off the event loop in
a single thread, and resolves each caller's future with its own result (or the batch's exception).

The queue is bounded: :meth:`Batcher.submit` raises :class:`Overloaded` at once when it is full, so
overload is answered, never buffered without end.  Items whose caller went away (cancelled future)
are dropped before the batch runs.  ``max_batch=1`` turns batching off (the benchmark's baseline).

Background work (rebuilding sessions from their log) goes to a second, bounded lane
(:meth:`Batcher.submit_job`): requests wait there (at most ``max_jobs``; beyond, :class:`Overloaded` at
once) until the worker takes up to ``max_job_batch`` of them into one *job*, ``jobs(requests, alive)``: a
generator run on the same worker thread one piece (one ``next``) at a time, whose return value holds one
result per request.  Between two batches of live items the worker runs one piece.  So a live item waits
behind at most one piece of background work, never behind the whole lane, while jobs still progress under
full live load and run back to back when there is none.  Requests are served first come, first served; one whose
caller went away is dropped before its job starts (and ``alive(i)`` tells a running job which callers still
wait); a job nobody waits for any more is closed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from affectkit.errors import AffectkitError, ConfigError

__all__ = ["Batcher", "Overloaded"]

T = TypeVar("T")
Job = Callable[[list[Any], Callable[[int], bool]], Generator[Any, None, Sequence[Any]]]


class Overloaded(AffectkitError):
    """The queue is full: the caller should retry later."""


class Batcher(Generic[T]):
    """``fn(items) -> results`` (one result per item, an Exception instance for a failed item) runs on
    ``executor`` (default: a private single-thread pool, which then owns the model and the store's
    writes).  ``on_batch(size, seconds)`` is called after each batch (metrics)."""

    def __init__(self, fn: Callable[[list[T]], Sequence[Any]], max_batch: int = 32, max_wait_ms: float = 2.0,
                 max_queue: int = 256, executor: ThreadPoolExecutor | None = None,
                 on_batch: Callable[[int, float], None] | None = None, jobs: Job | None = None,
                 max_jobs: int = 64, max_job_batch: int = 8) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0 or max_jobs < 1 or max_job_batch < 1:
            raise ConfigError(f"batcher needs max_batch >= 1, max_queue >= 1, max_wait_ms >= 0, max_jobs >= 1, "
                              f"max_job_batch >= 1; got {max_batch}, {max_queue}, {max_wait_ms}, {max_jobs}, "
                              f"{max_job_batch}")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000
        self.max_queue = max_queue
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="affectkit-infer")
        self._own_executor = executor is None
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[Any]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self.job_fn, self.max_jobs, self.max_job_batch = jobs, max_jobs, max_job_batch
        self._jobs: deque[tuple[Any, asyncio.Future[Any]]] = deque()  # requests waiting for a job
        self._job: tuple[Generator[Any, None, Sequence[Any]], list[tuple[Any, asyncio.Future[Any]]]] | None = None
        self._wake: asyncio.Event | None = None
        self.jobs_dropped = 0  # jobs closed because their caller went away
        self.side_waiting = 0  # run_bounded calls not finished yet

    @property
    def depth(self) -> int:
        """Items waiting (not counting the batch being run)."""
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def jobs_waiting(self) -> int:
        """Requests in the lane (waiting, or in the job in progress)."""
        return len(self._jobs) + (len(self._job[1]) if self._job is not None else 0)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue(self.max_queue)
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._work(), name="affectkit-batcher")

    async def stop(self) -> None:
        """Stop the worker; waiting callers get a cancelled future."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            self._queue.get_nowait()[1].cancel()
        while self._jobs:
            self._jobs.popleft()[1].cancel()
        if self._job is not None:
            for _, fut in self._job[1]:
                fut.cancel()
            self._job = None
        if self._own_executor:
            self.executor.shutdown(wait=True)

    async def submit(self, item: T) -> Any:
        """The item's result; raises :class:`Overloaded` at once when the queue is full, or the item's
        (or its batch's) exception."""
        if self._queue is None or not self.running:
            raise Overloaded("the service is not running")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, fut))
        except asyncio.QueueFull:
            raise Overloaded(f"queue full ({self.max_queue} utterances waiting)") from None
        assert self._wake is not None
        self._wake.set()
        return await fut

    def submit_job(self, request: Any, what: str = "jobs") -> asyncio.Future[Any]:
        """Queue a background request in the lane; returns the future of its result (cancel it to drop the
        request).  Raises :class:`Overloaded` at once when ``max_jobs`` requests are in the lane."""
        if self._queue is None or not self.running or self.job_fn is None:
            raise Overloaded("the service is not running")
        if self.jobs_waiting >= self.max_jobs:
            raise Overloaded(f"too many {what} waiting ({self.max_jobs})")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs.append((request, fut))
        assert self._wake is not None
        self._wake.set()
        return fut

    def run_sync(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` on the worker thread (serialised with the batches), as an awaitable."""
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def run_bounded(self, fn: Callable[..., Any], *args: Any, what: str = "requests") -> asyncio.Future[Any]:
        """:meth:`run_sync` for work a client can ask for at will (opening a live session, deleting one):
        at most ``max_jobs`` wait at once, beyond that :class:`Overloaded` at once, so a storm of such
        requests is refused instead of piling up in front of the worker."""
        if self.side_waiting >= self.max_jobs:
            raise Overloaded(f"too many {what} waiting ({self.max_jobs})")
        self.side_waiting += 1
        fut = self.run_sync(fn, *args)

        def done(_: Any) -> None:
            self.side_waiting -= 1

        fut.add_done_callback(done)
        return fut

    async def _work(self) -> None:
        assert self._queue is not None and self._wake is not None
        queue, loop, wake = self._queue, asyncio.get_running_loop(), self._wake
        while True:
            while queue.empty() and not self._jobs and self._job is None:
                wake.clear()
                await wake.wait()
            if not queue.empty():
                await self._run_batch(queue, loop)
            await self._run_piece(loop)

    async def _run_batch(self, queue: asyncio.Queue[tuple[T, asyncio.Future[Any]]],
                         loop: asyncio.AbstractEventLoop) -> None:
        """Take what is queued (up to ``max_batch``, waiting ``max_wait`` for more) and run it."""
        batch = [queue.get_nowait()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except asyncio.TimeoutError:
                break
        live = [(item, fut) for item, fut in batch if not fut.done()]
        if not live:
            return
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in live])
        except Exception as exc:  # the whole batch failed: every caller gets the error
            results = [exc] * len(live)
        if self.on_batch is not None:
            self.on_batch(len(live), time.perf_counter() - start)
        _resolve(live, results)

    async def _run_piece(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Run one piece of the job in progress, starting one from the waiting requests if there is none
        (dropping requests whose caller went away); False if the lane was empty."""
        if self._job is not None and all(fut.done() for _, fut in self._job[1]):
            job, entries = self._job
            self._job = None
            self.jobs_dropped += len(entries)
            await loop.run_in_executor(self.executor, job.close)  # its cleanup runs on the worker thread
        if self._job is None:
            entries: list[tuple[Any, asyncio.Future[Any]]] = []
            while self._jobs and len(entries) < self.max_job_batch:
                request, fut = self._jobs.popleft()
                if fut.done():
                    self.jobs_dropped += 1
                else:
                    entries.append((request, fut))
            if not entries:
                return False
            assert self.job_fn is not None
            futures = [fut for _, fut in entries]
            self._job = (self.job_fn([r for r, _ in entries], lambda i: not futures[i].done()), entries)
        job, entries = self._job
        try:
            done, value = await loop.run_in_executor(self.executor, _advance, job)
        except Exception as exc:  # noqa: BLE001 - the job failed: every caller gets the error
            done, value = True, [exc] * len(entries)
        if done:
            self._job = None
            _resolve(entries, value)
        return True


def _advance(job: Generator[Any, None, Any]) -> tuple[bool, Any]:
    """One ``next`` of ``job``: (False, None) while it goes on, (True, its return value) when it ends."""
    try:
        next(job)
    except StopIteration as stop:
        return True, stop.value
    return False, None


def _resolve(entries: list[tuple[Any, asyncio.Future[Any]]], results: list[Any]) -> None:
    """Give each waiting caller its result (an exception is raised to it); callers gone already are skipped."""
    for (_, fut), res in zip(entries, results):
        if fut.done():
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)

"""A bounded queue of requests and the one loop that runs them, in batches, on the model thread.

The model runs one batch at a time (a second concurrent batch would only split the same device).
While it runs, requests queue up. When it is free, the oldest waiting request opens the next batch:
every waiting request with the same batch key joins it in arrival order, up to `max_rows` samples,
and if there is still room the batch waits up to `max_wait` seconds (counted from the oldest
request's arrival) for more. A request larger than `max_rows` still runs, alone. The oldest request
always goes first, so none waits behind a stream of newer ones with another key.

The wait to fill happens only while more requests are on their way in (`arriving()`: received but
not yet queued, e.g. still being read or encoded). Under steady load the next batch's requests are
already queued when the model frees up, and a lone client has nobody to wait for; a fixed wait would
cost them a timer wake-up per batch, which on a loaded machine measured ~0.1 s, not 10 ms.

Beyond `max_queue` waiting requests a new one is refused at once (QueueFull -> 429 with
Retry-After), never queued. A request whose client has left is cancelled: taken out of the queue
if it has not started, its result discarded if its batch is running (the sampler runs a batch to
its end: it has no way to drop one row mid-run).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional


class QueueFull(Exception):
    """The queue holds `max_queue` requests; `retry_after` is a guess of when a slot frees up (s)."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    key: tuple
    rows: int
    payload: object  # handed to run_batch as is
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued | running | done | cancelled


class Batcher:
    """`run_batch(payloads) -> list of results` runs on a single worker thread, one batch at a time."""

    def __init__(self, run_batch: Callable[[list], list], max_queue: int = 64, max_rows: int = 16,
                 max_wait: float = 0.01, on_batch: Optional[Callable[[int, int], None]] = None,
                 on_drop: Optional[Callable[[], None]] = None, arriving: Callable[[], int] = lambda: 1):
        self.run_batch = run_batch
        self.max_queue, self.max_rows, self.max_wait = max_queue, max_rows, max_wait
        self.on_batch = on_batch or (lambda requests, rows: None)
        self.on_drop = on_drop or (lambda: None)
        self.arriving = arriving
        self.queue: list[Job] = []
        self.running: list[Job] = []
        self._arrival = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safegen-model")
        self._task: Optional[asyncio.Task] = None
        self._batch_seconds = 1.0  # running mean of a batch's time, for Retry-After
        self._running_batch = False

    # ------------------------------------------------------------------ called by request handlers
    def submit(self, key: tuple, rows: int, payload) -> Job:
        if len(self.queue) >= self.max_queue:
            # Roughly the time to run the batches ahead of a slot freeing up: at least one second.
            raise QueueFull(max(1, round(self._batch_seconds * (1 + len(self.queue) // max(self.max_rows, 1)))))
        job = Job(key=key, rows=rows, payload=payload, future=asyncio.get_running_loop().create_future())
        self.queue.append(job)
        self._arrival.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())
        return job

    def cancel(self, job: Job) -> None:
        """The client left: a queued job never runs; a running job's result is discarded."""
        if job.state == "queued":
            self.queue.remove(job)
            self.on_drop()
        if job.state in ("queued", "running"):
            job.state = "cancelled"
        if not job.future.done():
            job.future.cancel()

    def abort(self, error: BaseException) -> int:
        """Answers every queued and running job with `error` now (the drain's deadline): a running
        batch goes on on the model thread, but its results are no longer waited for. The number of
        jobs answered."""
        jobs = [j for j in self.queue + self.running if not j.future.done()]
        self.queue.clear()
        for job in jobs:
            job.state = "cancelled"
            job.future.set_exception(error)
        return len(jobs)

    @property
    def model_busy(self) -> bool:
        """A batch is running on the model thread (even one whose jobs were all answered)."""
        return self._running_batch

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)

    # ------------------------------------------------------------------ the loop
    def _take(self) -> list[Job]:
        """The oldest job and the same-key jobs behind it that fit in max_rows."""
        first = self.queue[0]
        batch, rows = [first], first.rows
        for job in self.queue[1:]:
            if job.key == first.key and rows + job.rows <= self.max_rows:
                batch.append(job)
                rows += job.rows
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self._arrival.clear()
                await self._arrival.wait()
            batch = self._take()
            wait = self.max_wait - (time.monotonic() - batch[0].arrived)
            while sum(j.rows for j in batch) < self.max_rows and wait > 0 and self.arriving() > 0:
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                if not self.queue:
                    break
                batch = self._take()
                wait = self.max_wait - (time.monotonic() - batch[0].arrived)
            if not self.queue:
                continue  # every job of the batch was cancelled while it filled
            for job in batch:
                self.queue.remove(job)
                job.state = "running"
            self.running = batch
            self.on_batch(len(batch), sum(j.rows for j in batch))
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(self._executor, self._run, [j.payload for j in batch])
            except Exception as error:  # the whole batch failed: every request of it says so
                results = [error] * len(batch)
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - started)
            self.running = []
            for job, result in zip(batch, results):
                if job.state == "cancelled" or job.future.done():
                    continue
                job.state = "done"
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _run(self, payloads: list) -> list:
        """On the model thread: the flag says whether the thread is inside a batch, whatever the loop does."""
        self._running_batch = True
        try:
            return self.run_batch(payloads)
        finally:
            self._running_batch = False

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

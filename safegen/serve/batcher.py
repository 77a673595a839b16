"""A bounded queue of requests and the step-level loop that runs them on the model thread.

Requests with the same batch key that wait together form a group: the oldest waiting request
opens it and every waiting request with its key joins, in arrival order, up to `max_rows` samples.
Groups run step by step on the step-level engine (safegen/engine.py): each round advances every
running group by one sampler step (one forward, or at a refinement point the kernel's work), so a
group that starts while another runs joins at the next round, and a group that is done leaves at
once and frees its rows. A short request is never held behind a long one: it takes as many rounds
as its own steps. The engine merges the groups' forwards of a round into one model call where their
shapes allow (the cached steps' blocks, the uncached sampler's sequences), so groups at different
points of their blocks, with other prompts and lengths, still share the weights' reads. Every sample
of a group gets the tokens it gets alone, whatever ran beside it or before it (safegen.sampling.rng
keys every draw by the row's seed; the engine's merged forwards keep rows apart).

At most `max_rows` samples run at once: a new group starts when its rows fit beside the running
ones (a group larger than `max_rows` still runs, alone). The oldest request always starts first,
so none waits behind a stream of newer ones with another key.

When nothing runs, the first group waits up to `max_wait` seconds (counted from the oldest
request's arrival) to fill, but only while more requests are on their way in (`arriving()`:
received but not yet queued, e.g. still being read or encoded). Under load the next requests are
already queued at a round's end, and a lone client has nobody to wait for; a fixed wait would cost
them a timer wake-up per group, which on a loaded machine measured ~0.1 s, not 10 ms.

Beyond `max_queue` waiting requests a new one is refused at once (QueueFull -> 429 with
Retry-After), never queued. A request whose client has left is cancelled: taken out of the queue
if it has not started, its result discarded if its group is running, and a group whose every
request was cancelled stops at the next round.

`run_batch(payloads)` may return the results at once, or a generator that yields after each step
and returns them (serve/engine.py, Engine.run_steps): the first is one round long.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

from .. import engine


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


@dataclass(eq=False)
class Group:
    """Requests that run as one generation: their jobs, their samples, and the run once started."""

    jobs: list
    rows: int
    generation: engine.Generation
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return self.generation.done

    @property
    def results(self):
        """A list of results, one per job, or the exception that failed them all."""
        return self.generation.result

    def close(self) -> None:
        self.generation.close()


class Batcher:
    """`run_batch(payloads)` (results, or a step generator of them) runs on a single worker thread,
    the model's; the groups it runs advance there in rounds of one step each."""

    def __init__(self, run_batch: Callable[[list], list], max_queue: int = 64, max_rows: int = 16,
                 max_wait: float = 0.01, on_batch: Optional[Callable[[int, int], None]] = None,
                 on_drop: Optional[Callable[[], None]] = None, arriving: Callable[[], int] = lambda: 1,
                 step_level: bool = True):
        self.run_batch = run_batch
        self.max_queue, self.max_rows, self.max_wait = max_queue, max_rows, max_wait
        self.on_batch = on_batch or (lambda requests, rows: None)
        self.on_drop = on_drop or (lambda: None)
        self.arriving = arriving
        # False: each group runs to its end before the next starts (fixed batches; for comparison).
        self.step_level = step_level
        self.queue: list[Job] = []
        self.groups: list[Group] = []
        self._arrival = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safegen-model")
        self._task: Optional[asyncio.Task] = None
        self._batch_seconds = 1.0  # running mean of a batch's time, for Retry-After
        self._running_batch = False
        self._forming = 0  # jobs of the group being filled (see submit)

    # ------------------------------------------------------------------ called by request handlers
    def submit(self, key: tuple, rows: int, payload) -> Job:
        # Jobs that are about to start (a group being filled, or queued ones that fit beside the running
        # ones but that the loop has not taken yet) are not waiting: they hold no queue place, else
        # requests that arrive together, or a client answered just now, could find the queue full
        # while it is about to empty.
        if len(self.queue) - max(self._forming, self._startable()) >= self.max_queue:
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
        jobs = [j for j in self.queue + [j for g in self.groups for j in g.jobs] if not j.future.done()]
        self.queue.clear()
        self.groups.clear()  # a round in progress finishes its step; nobody reads what it returns
        for job in jobs:
            job.state = "cancelled"
            job.future.set_exception(error)
        return len(jobs)

    @property
    def model_busy(self) -> bool:
        """A round is running on the model thread (even one whose jobs were all answered)."""
        return self._running_batch

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.groups)

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

    async def _fill(self) -> None:
        """With nothing running: wait up to max_wait for the first group to fill, while requests arrive."""
        batch = self._take()
        wait = self.max_wait - (time.monotonic() - batch[0].arrived)
        try:
            while sum(j.rows for j in batch) < self.max_rows and wait > 0 and self.arriving() > 0:
                self._forming = len(batch)
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                if not self.queue:
                    return
                batch = self._take()
                wait = self.max_wait - (time.monotonic() - batch[0].arrived)
        finally:
            self._forming = 0

    def _admit(self) -> None:
        """Starts groups from the queue, oldest first, while their rows fit beside the running ones."""
        while self.queue:
            batch = self._take()
            rows = sum(j.rows for j in batch)
            if self.groups and (not self.step_level or self.rows_running + rows > self.max_rows):
                return
            for job in batch:
                self.queue.remove(job)
                job.state = "running"
            payloads = [j.payload for j in batch]
            self.groups.append(Group(jobs=batch, rows=rows,
                                     generation=engine.Generation(lambda p=payloads: self.run_batch(p))))
            self.on_batch(len(batch), rows)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue and not self.groups:
                self._arrival.clear()
                await self._arrival.wait()
            if not self.groups:
                await self._fill()
            self._admit()
            # A group whose every client has left stops here: its rows go to the next ones.
            for group in [g for g in self.groups if all(j.state == "cancelled" for j in g.jobs)]:
                self.groups.remove(group)
                group.close()
            if not self.groups:
                continue
            groups = list(self.groups)
            await loop.run_in_executor(self._executor, self._round, groups)
            for group in groups:
                if group.done and group in self.groups:
                    self.groups.remove(group)
                    self._deliver(group)

    def _round(self, groups: list["Group"]) -> None:
        """On the model thread: one step of each group (its first step starts it), their forwards merged
        (safegen/engine.py)."""
        self._running_batch = True
        try:
            if self.step_level:
                engine.advance([g.generation for g in groups])
            else:
                for group in groups:
                    while not group.done:
                        engine.advance([group.generation])
        finally:
            self._running_batch = False

    def _deliver(self, group: "Group") -> None:
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - group.started)
        results = group.results if isinstance(group.results, list) else [group.results] * len(group.jobs)
        for job, result in zip(group.jobs, results):
            if job.state == "cancelled" or job.future.done():
                continue
            job.state = "done"
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _startable(self) -> int:
        """How many of the oldest queued jobs fit beside the running rows (the first always does when
        nothing runs), whatever their keys: those the loop starts next."""
        room, n = self.max_rows - self.rows_running, 0
        for job in self.queue:
            if job.rows > room and (n or self.groups):
                break
            room -= job.rows
            n += 1
        return n

    @property
    def rows_running(self) -> int:
        return sum(g.rows for g in self.groups)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

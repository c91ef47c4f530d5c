"""Dynamic micro-batching and the prediction-log writer: the two worker threads behind the server.

``MicroBatcher``: request handlers ``await submit(texts)``; one inference thread takes the first waiting
request, keeps collecting until ``max_batch`` texts or ``max_wait_ms`` have passed, runs one
``predict_proba`` over all of them (the predictor sorts by length inside), and resolves each request's
future with its rows. ``swap(predict, tag)`` replaces the model between batches: the inference thread
reads the (predict, tag) pair once when it starts a batch, so a batch in flight finishes on the model
it started with and every request learns (``submit_tagged``) which model answered it. The queue is
bounded in texts: a submit that would overflow it raises
:class:`QueueFull` at once (the server answers 429 + Retry-After) instead of letting memory grow.

``LogWriter``: handlers hand it prediction records without waiting; its thread commits them to the
store in batches (one transaction per ``flush_every`` records or ``flush_ms``). ``flush()`` waits until
every record handed over before the call is committed: feedback calls it before writing, so a
prediction the client already holds an id for is always found.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


class QueueFull(Exception):
    """The inference queue is at its bound; ``retry_after`` is an estimate in seconds."""

    def __init__(self, retry_after: float):
        super().__init__(f"server busy: inference queue full, retry in ~{retry_after:.1f} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


@dataclass
class _Job:
    texts: Sequence[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    tag: object = None  # set by the inference thread: the tag of the model that ran this job


class MicroBatcher:
    """One inference thread fed by a bounded queue of requests (see the module docstring)."""

    def __init__(
        self,
        predict: Callable[..., np.ndarray],  # predict(texts, on_rows) -> (N, C); see Predictor.predict_proba
        *,
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        on_batch: Callable[[int, float], None] | None = None,
        tag: object = None,
    ):
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        # one attribute holding both, replaced whole: the inference thread can never see a predict
        # of one model with the tag of another
        self._current: tuple[Callable[..., np.ndarray], object] = (predict, tag)
        self.max_queue, self.on_batch = max_queue, on_batch
        self._jobs: deque[_Job] = deque()
        self._queued_texts = 0
        self._cv = threading.Condition()
        self._closing = False
        self._items_per_s = 200.0  # running estimate for Retry-After
        self._expect = max_batch
        self._thread = threading.Thread(target=self._run, name="lmloop-infer", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Texts waiting for the inference thread."""
        return self._queued_texts

    @property
    def predict(self) -> Callable[..., np.ndarray]:
        return self._current[0]

    @property
    def tag(self) -> object:
        """The tag of the model the next batch will run on."""
        return self._current[1]

    def swap(self, predict: Callable[..., np.ndarray], tag: object = None) -> None:
        """Run later batches on ``predict`` (tagged ``tag``); the batch in flight finishes on the old one."""
        with self._cv:
            self._current = (predict, tag)

    async def submit(self, texts: Sequence[str]) -> np.ndarray:
        """Probabilities (len(texts), C) for ``texts``, batched with whatever else is waiting."""
        return (await self.submit_tagged(texts))[0]

    async def submit_tagged(self, texts: Sequence[str]) -> tuple[np.ndarray, object]:
        """(probabilities (len(texts), C), the tag of the model that computed them)."""
        loop = asyncio.get_running_loop()
        job = _Job(texts, loop, loop.create_future())
        with self._cv:
            if self._closing:
                raise ShuttingDown()
            if self._queued_texts + len(texts) > self.max_queue and self._queued_texts > 0:
                raise QueueFull(max(0.1, self._queued_texts / max(self._items_per_s, 1.0)))
            self._jobs.append(job)
            self._queued_texts += len(texts)
            self._cv.notify()
        rows = await job.future
        return rows, job.tag

    def _take(self) -> list[_Job] | None:
        """Block for the first job, then gather texts until the batch is "full" or max_wait has passed.

        Full = ``max_batch`` texts, or as many as the previous batch carried (``_expect``): under steady
        load from N concurrent clients each wave of requests is about N texts, so the batch goes as soon
        as the wave is in instead of idling out the whole wait (or leaving stragglers for a tiny batch).
        """
        with self._cv:
            while not self._jobs:
                if self._closing:
                    return None
                self._cv.wait()
            deadline = time.perf_counter() + self.max_wait
            batch, n = [], 0
            while True:
                while self._jobs and (n == 0 or n + len(self._jobs[0].texts) <= self.max_batch):
                    job = self._jobs.popleft()
                    self._queued_texts -= len(job.texts)
                    if job.future.cancelled():  # the client timed out or went away: skip the work
                        continue
                    batch.append(job)
                    n += len(job.texts)
                left = deadline - time.perf_counter()
                if (
                    n >= min(self.max_batch, self._expect)
                    or left <= 0
                    or self._closing
                    or (self._jobs and n > 0)
                ):
                    # the last condition: the next job does not fit; run what we have
                    return batch
                self._cv.wait(left)

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            texts = [t for job in batch for t in job.texts]
            # the batch boundary: the one place a swapped-in model is picked up
            predict, tag = self._current
            for job in batch:
                job.tag = tag
            # the next batch waits for about as many texts as this one had; more queued are taken anyway
            self._expect = len(texts)
            t0 = time.perf_counter()
            # answer each request as soon as its texts are through (the batch runs as several
            # length-sorted forward passes): its client's next request then arrives while the rest of
            # this batch computes, so the next batch is waiting when this one ends
            owner = np.repeat(np.arange(len(batch)), [len(j.texts) for j in batch])
            starts = np.concatenate([[0], np.cumsum([len(j.texts) for j in batch])])
            left = [len(j.texts) for j in batch]
            bufs: list = [None] * len(batch)

            def on_rows(idx, rows, batch=batch, owner=owner, starts=starts, left=left, bufs=bufs):
                for i, row in zip(idx.tolist(), rows, strict=True):
                    j = owner[i]
                    if bufs[j] is None:
                        bufs[j] = np.empty((left[j], len(row)), dtype=np.float32)
                    bufs[j][i - starts[j]] = row
                    left[j] -= 1
                    if left[j] == 0:
                        job = batch[j]
                        job.loop.call_soon_threadsafe(_resolve, job.future, bufs[j], None)

            try:
                predict(texts, on_rows)
                err = None
            except Exception as e:  # a failure fails this batch's requests, never the thread
                err = e
            dt = time.perf_counter() - t0
            if dt > 0:
                self._items_per_s = 0.8 * self._items_per_s + 0.2 * (len(texts) / dt)
            if self.on_batch:
                self.on_batch(len(texts), dt)
            for j, job in enumerate(batch):
                if left[j] > 0:  # only after a failure: answered requests are already resolved
                    job.loop.call_soon_threadsafe(
                        _resolve, job.future, None, err or RuntimeError("no result")
                    )

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking new work, finish what is queued (drain), then stop the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout)


def _resolve(fut: asyncio.Future, value, err) -> None:
    if fut.done():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(value)


_FLUSH = ["flush"]  # a marker object on the writer's queue


class LogWriter:
    """Batches prediction records into the store off the request path (see the module docstring)."""

    def __init__(
        self,
        store,
        *,
        flush_every: int = 512,
        flush_ms: float = 50.0,
        max_backlog: int = 100_000,
        on_error=None,
    ):
        self.store, self.flush_every, self.flush_s = store, flush_every, flush_ms / 1000
        self.max_backlog, self.on_error = max_backlog, on_error
        self._q: queue.Queue = queue.Queue()
        self._submitted = 0  # records handed over (incremented by callers, under _lock)
        self._committed = 0  # records committed (by the writer thread)
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="lmloop-predlog", daemon=True)
        self._thread.start()

    @property
    def backlog(self) -> int:
        return self._submitted - self._committed

    def add(self, records: list) -> None:
        if not records:
            return
        with self._lock:
            self._submitted += len(records)
        self._q.put(records)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything handed over before this call is committed; False on timeout."""
        self._q.put(_FLUSH)  # wake the writer: commit now instead of at the end of its flush window
        with self._lock:
            target = self._submitted
            end = time.monotonic() + timeout
            while self._committed < target:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
        return True

    def _run(self) -> None:
        stop = False
        while not stop:
            pending: list = []
            try:
                item = self._q.get()
            except Exception:  # pragma: no cover - interpreter shutdown
                return
            if item is None:
                break
            if item is _FLUSH:
                continue
            pending.extend(item)
            deadline = time.monotonic() + self.flush_s
            while len(pending) < self.flush_every:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = self._q.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                if item is _FLUSH:
                    break
                pending.extend(item)
            self._write(pending)

    def _write(self, records: list) -> None:
        # a failing store (a PostgreSQL restart, a full disk) is retried with back-off, not dropped
        delay = 0.05
        while True:
            try:
                self.store.add_predictions(records)
                break
            except Exception as e:
                self.failures += 1
                if self.on_error:
                    self.on_error(e)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        with self._lock:
            self._committed += len(records)
            self._done.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Commit everything handed over, then stop the thread."""
        self._q.put(None)
        self._thread.join(timeout)
        with contextlib.suppress(Exception):
            # anything a late handler added after the sentinel
            rest = []
            while True:
                item = self._q.get_nowait()
                if item and item is not _FLUSH:
                    rest.extend(item)
        if rest:
            self._write(rest)

"""Batching generation requests from concurrent clients: one decode thread, continuous or static batches.

Request handlers call :meth:`GenScheduler.submit` (prompt ids, sampling params) and read the text pieces
of their own request from the returned :class:`GenJob`. One decode thread runs every request:

* **continuous** (the default): the thread keeps one running batch. Between two decode steps it admits
  the requests that arrived meanwhile (up to ``max_batch`` live rows): their prompts are prefilled
  together (left-padded), and their KV caches are joined to the batch's, left-padded to a common length
  (the padding is masked, and each row keeps its own position ids, so a row gets the tokens it would
  get alone). A row that ends leaves at once; leading columns that are padding for every live row are
  trimmed, so the cache does not grow under steady traffic. Sampling and stop strings are
  :class:`lmloop.infer.decode.Row`, the code ``Generator.stream`` / ``stream_batch`` use.
* **static** (``continuous=False``, or a model whose KV cache is not a plain per-layer key/value
  cache, e.g. a sliding window): ``Generator.stream_batch`` over the jobs taken together; requests that
  arrive meanwhile wait for the next batch.

Either way the first request of an idle server waits up to ``max_wait_ms`` for company, each step's
pieces go to their jobs' queues through the event loop (``call_soon_threadsafe``), and a job gets its
:class:`Generation` (token counts, finish reason) as soon as its own row ends.

The queue is bounded: a submit beyond ``max_queue`` waiting jobs raises :class:`QueueFull` at once (the
server answers 429 + Retry-After). A job that waited longer than ``queue_timeout_s`` before it started is
failed with :class:`TimeoutError` instead of run. A client that went away (``GenJob.cancel``) has its row
dropped between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from lmloop.serve.batcher import QueueFull, ShuttingDown

__all__ = ["GenJob", "GenScheduler", "QueueFull", "ShuttingDown"]


@dataclass
class GenJob:
    """One request's place in the scheduler: its prompt ids and params in, its pieces and result out."""

    ids: list[int]
    params: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    batch_size: int = 0  # rows in the batch that ran this job (set by the decode thread)
    started: float = 0.0  # perf_counter when its batch started
    result: Any = None  # the Generation, once :meth:`pieces` is exhausted

    def cancel(self) -> None:
        """The client went away: its pieces are dropped (and a batch nobody reads is stopped)."""
        self.cancelled = True

    async def pieces(self) -> AsyncIterator[str]:
        """Yield the text pieces as they are generated; ``self.result`` holds the Generation after.
        Raises what the decode thread raised for this job (TimeoutError, ShuttingDown, a model error)."""
        while True:
            item = await self.queue.get()
            if isinstance(item, str):
                yield item
            elif isinstance(item, BaseException):
                raise item
            else:
                self.result = item
                return

    async def text(self) -> str:
        """The whole completion (drains :meth:`pieces`)."""
        return "".join([p async for p in self.pieces()])

    def _post(self, item: Any) -> None:
        # from the decode thread: the job's queue belongs to the event loop
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class GenScheduler:
    """One decode thread fed by a bounded queue of generation requests (see the module docstring).

    Metrics hooks: ``on_batch(rows, seconds, tokens)`` after every group of requests started together
    (static: a whole batch; continuous: the rows admitted and prefilled together, ``tokens`` 0), and
    ``on_step(rows)`` with the live rows of every decode step.
    """

    def __init__(
        self,
        generator: Any,  # lmloop.infer.generate.Generator
        *,
        max_batch: int = 16,
        max_wait_ms: float = 20.0,
        max_queue: int = 256,
        queue_timeout_s: float | None = None,
        continuous: bool = True,
        on_batch: Callable[[int, float, int], None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.generator, self.max_batch, self.max_wait = generator, max_batch, max_wait_ms / 1000
        self.max_queue, self.queue_timeout_s, self.on_batch = max_queue, queue_timeout_s, on_batch
        self.continuous, self.on_step = continuous, on_step
        self._jobs: deque[GenJob] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._batch_s = 1.0  # running mean of a batch's wall time, for Retry-After
        self.batches = 0
        self.max_rows = 0  # the most rows decoded together so far
        self.failed: BaseException | None = None  # set if the decode thread itself died
        self._thread = threading.Thread(target=self._guarded_run, name="lmloop-decode", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting for a batch (not counting the batch being decoded)."""
        return len(self._jobs)

    def submit(self, ids: list[int], params: dict[str, Any]) -> GenJob:
        """Queue one request (call from the event loop); read its output with ``await``-ing ``pieces()``."""
        job = GenJob(list(ids), dict(params), asyncio.get_running_loop())
        with self._cv:
            if self._closing or self.failed is not None:
                raise ShuttingDown()
            if len(self._jobs) >= self.max_queue:
                # the queue drains a batch of max_batch jobs per batch time
                raise QueueFull(self._batch_s * (1 + len(self._jobs) / self.max_batch))
            self._jobs.append(job)
            self._cv.notify()
        return job

    def _take(self) -> list[GenJob] | None:
        with self._cv:
            while not self._jobs:
                if self._closing:
                    return None
                self._cv.wait()
            # the oldest job waits at most max_wait for company (it may have waited a batch already)
            deadline = self._jobs[0].enqueued + self.max_wait
            while len(self._jobs) < self.max_batch and not self._closing:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
            n = min(self.max_batch, len(self._jobs))
            return [self._jobs.popleft() for _ in range(n)]

    def _take_nowait(self, n: int) -> list[GenJob]:
        with self._cv:
            return [self._jobs.popleft() for _ in range(min(n, len(self._jobs)))]

    def _admit(self, jobs: list[GenJob]) -> list[GenJob]:
        """The jobs still worth starting: not cancelled, not past the queue timeout (those are told)."""
        now, live = time.perf_counter(), []
        for job in jobs:
            if job.cancelled:
                continue
            if self.queue_timeout_s is not None and now - job.enqueued > self.queue_timeout_s:
                job._post(TimeoutError(f"not started within {self.queue_timeout_s:g} s"))
                continue
            live.append(job)
        return live

    def _guarded_run(self) -> None:
        # a model error fails only its batch (inside _run); this catches a bug in the loop itself, so
        # queued and later requests get an error instead of waiting for a thread that is gone
        try:
            self._run()
        except BaseException as e:
            with self._cv:
                self.failed = e
                jobs, self._jobs = list(self._jobs), deque()
            for job in jobs:
                job._post(e)
            import sys

            print(f"lmloop serve: the decode thread stopped: {type(e).__name__}: {e}", file=sys.stderr)

    def _run(self) -> None:
        if self.continuous:
            self._loop = _Continuous(self)
            return self._loop.run()
        while (jobs := self._take()) is not None:
            if live := self._admit(jobs):
                self._run_batch(live)

    def _run_batch(self, jobs: list[GenJob]) -> None:
        g = self.generator
        t0 = time.perf_counter()
        for job in jobs:
            job.batch_size, job.started = len(jobs), t0
        done = [False] * len(jobs)
        try:
            steps = g.stream_batch([j.ids for j in jobs], [j.params for j in jobs])
            for step in steps:  # per decode step: [(row, new text), ...] for rows that produced text
                for row, piece in step:
                    if not jobs[row].cancelled:
                        jobs[row]._post(piece)
                # a row's Generation is set when the row ends: its client gets it now, not at batch end
                for i, res in enumerate(g.last_batch or ()):
                    if res is not None and not done[i]:
                        done[i] = True
                        jobs[i]._post(res)
                if all(j.cancelled for j in jobs):
                    steps.close()  # nobody reads this batch any more: stop decoding it
                    return
                if self.on_step is not None:
                    self.on_step(sum(r is None for r in g.last_batch or ()))
            results = list(g.last_batch)
        except Exception as e:  # a model error fails the batch's requests, never the thread
            for i, job in enumerate(jobs):
                if not done[i]:
                    job._post(e)
            return
        for i, (job, res) in enumerate(zip(jobs, results, strict=True)):
            if not done[i]:
                job._post(res)
        seconds = time.perf_counter() - t0
        self._batch_s = 0.8 * self._batch_s + 0.2 * seconds
        self.batches += 1
        self.max_rows = max(self.max_rows, len(jobs))
        if self.on_batch is not None:
            self.on_batch(len(jobs), seconds, sum(r.tokens for r in results))

    def close(self, timeout: float = 60.0) -> None:
        """Stop taking requests, finish the queued ones, stop the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout)
        with self._cv:  # anything still queued (the thread did not finish in time): tell the clients
            while self._jobs:
                self._jobs.popleft()._post(ShuttingDown())


# ------------------------------------------------------------------------------------ continuous batching
class _Continuous:
    """The decode thread's loop in continuous mode: one running batch that rows join and leave between
    decode steps (see the module docstring). State: ``jobs[j]`` / ``rows[j]`` for batch row j, the KV
    ``cache`` (S positions per row), ``mask`` (B, S) with 0 on padding, ``last`` (B, 1) each row's newest
    position, ``logits`` (B, V) for the next pick. The forward pass is the generator's decode backend
    (the transformers model, or :class:`lmloop.infer.fastllama.FastLlama`), as in ``stream_batch``."""

    def __init__(self, sched: GenScheduler):
        g = self.g = sched.generator
        self.sched = sched
        self.eos, self.ctx, self.decode = g.eos_ids(), g.context_length, g.tokenizer.decode
        tok = g.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else min(self.eos) if self.eos else 0
        # what runs a forward pass: the one Generator.stream / stream_batch use (HF model or FastLlama)
        self.forward = g.forward
        self.joinable: bool | None = None  # known after the first prefill: can caches be joined?
        self.trimmed = 0  # padding columns trimmed from the cache so far
        self._reset()

    def _reset(self) -> None:
        self.jobs: list[GenJob] = []
        self.rows: list[Any] = []
        self.cache = self.mask = self.last = self.logits = None

    def run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                sched = self.sched
                if not self.jobs:
                    new = sched._take()  # blocks; the first request waits max_wait for company
                    if new is None:
                        return
                elif self.joinable:
                    new = sched._take_nowait(sched.max_batch - len(self.jobs))
                else:
                    new = []
                try:
                    if new := sched._admit(new):
                        self._join(new)
                    if self.jobs:
                        self._step()
                except Exception as e:  # a model error fails the requests in flight, never the thread
                    for job in self.jobs:
                        job._post(e)
                    self._reset()

    def _join(self, jobs: list[GenJob]) -> None:
        """Prefill ``jobs`` together and add them to the running batch."""
        import torch

        from lmloop.errors import ConfigError
        from lmloop.infer.decode import Row, row_params

        t0 = time.perf_counter()
        ok_jobs, rows = [], []
        for job in jobs:
            try:
                rows.append(Row(self.decode, job.ids, row_params(job.params), self.eos, self.ctx))
                ok_jobs.append(job)
            except ConfigError as e:  # one bad request fails alone (the server validates before, anyway)
                job._post(e)
        if not rows:
            return
        b, t = len(rows), max(len(r.prompt) for r in rows)
        inp = torch.full((b, t), self.pad, dtype=torch.long)  # (b, t), prompts right-aligned
        mask = torch.zeros((b, t), dtype=torch.long)  # (b, t), 0 on the left padding
        for i, r in enumerate(rows):
            inp[i, t - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, t - len(r.prompt) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, t): each row counts from its own first token
        res = self.forward(
            input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
        )
        cache, logits = res.cache, res.logits[:, -1].float()  # (b, V)
        if self.joinable is None:
            self.joinable = _cache_kind(cache) is not None
        if self.cache is None:
            self.cache, self.mask, self.last, self.logits = cache, mask, pos[:, -1:], logits
        else:
            s = max(self.mask.shape[1], t)
            _join_caches(self.cache, cache, s)
            self.mask = torch.cat([_left_pad(self.mask, s, 1), _left_pad(mask, s, 1)])  # (B + b, s)
            self.last = torch.cat([self.last, pos[:, -1:]])
            self.logits = torch.cat([self.logits, logits])
        self.jobs += ok_jobs
        self.rows += rows
        for job in ok_jobs:
            job.started, job.batch_size = t0, len(self.jobs)
        sched = self.sched
        sched.batches += 1
        if sched.on_batch is not None:
            sched.on_batch(len(rows), time.perf_counter() - t0, 0)

    def _step(self) -> None:
        """Pick one token for every live row, hand out pieces and finished results, drop the finished
        (and cancelled) rows, then run the model one step for the rest."""
        import torch

        from lmloop.infer.generate import Generation

        jobs, rows = self.jobs, self.rows
        sched = self.sched
        sched.max_rows = max(sched.max_rows, len(rows))
        if sched.on_step is not None:
            sched.on_step(len(rows))
        if all(r.greedy for r in rows):
            toks = self.logits.argmax(-1).tolist()  # one op for the whole batch
        else:
            toks = [r.pick(self.logits[j]) for j, r in enumerate(rows)]
        now = time.perf_counter()
        keep = []
        for j, (job, r) in enumerate(zip(jobs, rows, strict=True)):
            if not r.first:
                r.first = now - job.started
            piece = r.push(toks[j])
            if piece and not job.cancelled:
                job._post(piece)
            if r.finish is not None:
                r.seconds = time.perf_counter() - job.started
                job._post(
                    Generation(
                        text=r.text,
                        tokens=len(r.out),
                        prompt_tokens=len(r.prompt),
                        seconds=r.seconds,
                        finish_reason=r.finish,
                        first_token_seconds=r.first,
                        token_ids=r.out,
                    )
                )
            elif not job.cancelled:
                keep.append(j)
        if not keep:
            self._reset()
            return
        if len(keep) < len(rows):  # finished rows leave the batch and the KV cache
            idx = torch.tensor(keep)
            self.cache.batch_select_indices(idx)
            self.mask, self.last = self.mask[idx], self.last[idx]
            self.jobs, self.rows = [jobs[j] for j in keep], [rows[j] for j in keep]
            toks = [toks[j] for j in keep]
            # leading columns that are padding for every row left: trim them (the cache stays bounded)
            lead = int((self.mask.cumsum(1) == 0).sum(1).min())
            if lead > 0 and self.joinable:
                self.trimmed += lead
                self.mask = self.mask[:, lead:]
                _trim_cache(self.cache, lead)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)  # (B, S + 1)
        self.last = self.last + 1
        res = self.forward(
            input_ids=torch.tensor(toks).unsqueeze(1),  # (B, 1) the newest token of each live row
            attention_mask=self.mask,
            position_ids=self.last,
            cache=self.cache,
            use_cache=True,
        )
        self.logits = res.logits[:, -1].float()  # (B, V)


def _left_pad(x, size: int, dim: int):
    """``x`` zero-padded on the left of ``dim`` to ``size`` (padding that the attention mask hides)."""
    import torch

    n = size - x.shape[dim]
    if n <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


# Joining and trimming KV caches. Two layouts are known: transformers' DynamicCache (per layer
# ``keys`` / ``values`` (B, H, S, hd)) and lmloop.infer.fastllama.KVCache (``k`` / ``v`` (L, B, KV,
# capacity, hd) holding ``len`` positions). Any other (a sliding window, a static cache) is not joined:
# the scheduler then lets a running batch finish before starting the next.
def _cache_kind(cache) -> str | None:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return "hf" if all(type(layer).__name__ == "DynamicLayer" for layer in layers) else None
    if all(hasattr(cache, a) for a in ("k", "v", "len")):
        return "slab"
    return None


def _join_caches(cache, add, s: int) -> None:
    """Append ``add``'s rows to ``cache``, both right-aligned to ``s`` positions (zeros on the left)."""
    import torch

    if _cache_kind(cache) == "hf":
        for old, new in zip(cache.layers, add.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, s, 2), _left_pad(new.keys, s, 2)])
            old.values = torch.cat([_left_pad(old.values, s, 2), _left_pad(new.values, s, 2)])
        return
    n_old, n_add = cache.k.shape[1], add.k.shape[1]
    shape = list(cache.k.shape)
    shape[1], shape[3] = n_old + n_add, s + 64  # (L, B, KV, capacity, hd), room for the next steps
    k, v = cache.k.new_zeros(shape), cache.v.new_zeros(shape)
    for dst, part, rows in ((k, cache.k, slice(0, n_old)), (v, cache.v, slice(0, n_old))):
        dst[:, rows, :, s - cache.len : s] = part[:, :, :, : cache.len]
    for dst, part, rows in ((k, add.k, slice(n_old, None)), (v, add.v, slice(n_old, None))):
        dst[:, rows, :, s - add.len : s] = part[:, :, :, : add.len]
    cache.k, cache.v, cache.len = k, v, s


def _trim_cache(cache, lead: int) -> None:
    """Drop the first ``lead`` positions (padding for every row) from ``cache``."""
    if _cache_kind(cache) == "hf":
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
        return
    cache.k, cache.v = cache.k[:, :, :, lead:], cache.v[:, :, :, lead:]
    cache.len -= lead

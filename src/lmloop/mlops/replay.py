"""Replay labelled "production" traffic against a running ``lmloop serve``: ``lmloop replay``.

Each row of a data file (or a built-in set) is sent to ``/v1/classify`` at a fixed request rate; for a
seeded random fraction of the answered predictions, the row's true label is sent to ``/v1/feedback``
after a delay, as users' corrections would arrive. The prediction log then holds live traffic with
delayed ground truth, so ``lmloop monitor`` has live accuracy to show; on its own it is a load test.

**Open loop.** Request ``i`` is due at ``t0 + i / rate`` and is sent then, whether or not earlier
requests have been answered; its latency is measured from that *due* time. A closed-loop client (the next
request only after the last answer) slows down with the server and so hides overload ("coordinated
omission"); here a slow server shows as growing latency and a send rate below the target. ``--concurrency``
caps the connections in flight; a request that waits for one counts the wait in its latency (reported
apart as client-side wait). ``--rate 0`` sends as fast as ``--concurrency`` connections allow (closed
loop; latency is then measured from the send).

**Client.** HTTP/1.1 with keep-alive over asyncio streams (uvloop when installed), written here rather
than httpx: httpx is only a test dependency of lmloop, and the few lines below cost far less CPU per
request (a load generator on the server's machine must not steal the cores it measures; the same reason
``benchmarks/serve_load.py`` does it). It speaks ``http://`` and ``https://``, Content-Length and chunked
bodies, and reopens a keep-alive connection the server closed while idle.

**Feedback.** Exactly ``round(F x labelled rows)`` rows are chosen with ``--seed`` (rows without a label
never are), each with a delay drawn from ``--feedback-delay`` (seconds, ``exp:MEAN`` or ``uniform:LO:HI``).
When a chosen row's prediction is answered, ``(due time, id, label)`` goes into a priority queue that a
background task drains, sending each feedback when it falls due. The run ends when every due feedback is
sent. Client-side accuracy (every labelled answer) and accuracy on the feedback subset (the predictions
``lmloop monitor`` can score) are both reported, so the monitor can be checked against them.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import math
import random
import signal
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lmloop.errors import ConfigError, DataError
from lmloop.mlops.httppool import Endpoint, HttpError, Pool

SPLITS = ("train", "validation", "test", "all")


# ------------------------------------------------------------------------------------------------ data
@dataclass
class ReplayData:
    """The rows to replay, in sending order; ``labels[i]``/``domains[i]`` are None where unknown."""

    texts: list[str]
    labels: list[str | None]
    domains: list[str | None]
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def load_replay_data(
    data: str,
    *,
    split: str | None = None,
    fmt: str | None = None,
    text_column: str = "text",
    label_column: str | None = None,
    domain_column: str | None = None,
    where: dict[str, str] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    limit: int | None = None,
    data_seed: int = 42,
) -> ReplayData:
    """Read the rows to replay. A built-in name (``vader-sentiment``, default split ``test``) or a file with
    ``split`` set goes through :func:`lmloop.data.load_data` (the split training used, with ``data_seed``);
    a plain CSV/TSV/JSONL/Parquet file is read as it is, every row in file order (duplicates too: that is
    traffic), through the reader ``lmloop predict`` uses, so labels may be missing on some rows or absent
    (``label_column`` None: the ``label`` column when there is one). ``where`` keeps rows whose column equals
    the value. Then ``shuffle`` (seeded) and ``limit``. Raises DataError naming the file and the column."""
    import pandas as pd

    from lmloop.data import BUILTIN_DATASETS
    from lmloop.data._util import label_to_str

    builtin = data in BUILTIN_DATASETS and not Path(data).exists()
    if split is not None and split not in SPLITS:
        raise ConfigError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    if builtin or (split not in (None, "all")) or Path(data).is_dir():
        from lmloop.data import load_data

        split = split or ("test" if builtin else "all")
        prepared = load_data(
            data,
            format=fmt,
            text_column=text_column,
            label_column=label_column or "label",
            domain_column=domain_column,
            seed=data_seed,
        )
        parts = prepared.splits()
        frame = pd.concat(list(parts.values()), ignore_index=True) if split == "all" else parts[split]
        source = f"{data} ({split} split)"
        # load_data renamed the columns to text/label(/domain)
        text_col, label_col = "text", "label"
        dom_col = "domain" if "domain" in frame.columns else None
        where = {("domain" if k == domain_column else k): v for k, v in (where or {}).items()}
        path = data
    else:
        from lmloop.infer.stream import read_chunks

        chunks = list(read_chunks(data, text_column=text_column, id_column="__replay_row__", fmt=fmt))
        if not chunks:
            raise DataError("no rows to replay", path=data)
        frame = pd.concat(chunks, ignore_index=True)
        source, text_col, path = str(data), text_column, data
        label_col = _column(frame, label_column, "label", "--label-column", path)
        dom_col = _column(frame, domain_column, "domain", "--domain-column", path)

    for col, value in (where or {}).items():
        _column(frame, col, None, "--where", path)
        frame = frame[[label_to_str(v) == value for v in frame[col]]]
    if frame.empty:
        cond = " and ".join(f"{k}={v}" for k, v in (where or {}).items())
        raise DataError(f"no rows to replay{' where ' + cond if cond else ''}", path=path)
    if shuffle:
        frame = frame.sample(frac=1.0, random_state=seed)
    if limit is not None:
        frame = frame.iloc[:limit]
    n = len(frame)
    labels = [label_to_str(v) for v in frame[label_col]] if label_col else [None] * n
    domains = [label_to_str(v) for v in frame[dom_col]] if dom_col else [None] * n
    return ReplayData([str(t) for t in frame[text_col]], labels, domains, source)


def _column(frame, name: str | None, default: str | None, option: str, path) -> str | None:
    """``name`` if the frame has it (else DataError naming the file and column); without a name, the
    ``default`` column when present, else None (an optional column such as the label)."""
    if name is None:
        return default if default is not None and default in frame.columns else None
    if name in frame.columns:
        return name
    found = [c for c in frame.columns if c != "__replay_row__"]
    raise DataError(
        f"no column '{name}' (columns found: {', '.join(map(str, found))}); pass {option} to choose one",
        path=str(path),
        field=name,
    )


# -------------------------------------------------------------------------------------------- options
def parse_delay(spec: str | float):
    """``--feedback-delay``: seconds (``30``, ``30s``, ``2m``, ``1h``), ``exp:MEAN`` (exponential, users who
    answer soon or much later) or ``uniform:LO:HI``. Returns ``draw(rng) -> seconds``."""
    s = str(spec).strip().lower()
    kind, _, rest = s.partition(":")
    try:
        if kind == "exp":
            mean = _seconds(rest)
            return lambda rng: rng.expovariate(1.0 / mean) if mean > 0 else 0.0
        if kind == "uniform":
            lo, hi = (_seconds(x) for x in rest.split(":"))
            if hi < lo:
                raise ValueError
            return lambda rng: rng.uniform(lo, hi)
        if not rest:
            value = _seconds(s)
            return lambda rng: value
    except ValueError:
        pass
    raise ConfigError(
        f"--feedback-delay {spec!r}: expected seconds (0.5, 30s, 2m), exp:MEAN or uniform:LO:HI"
    )


def _seconds(text: str) -> float:
    unit = {"s": 1, "m": 60, "h": 3600}.get(text[-1:])
    value = float(text[:-1] if unit else text) * (unit or 1)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


def parse_where(items: list[str] | None) -> dict[str, str]:
    """``--where COL=VALUE`` (repeatable, all must hold) -> ``{COL: VALUE}``."""
    out = {}
    for item in items or []:
        col, eq, value = item.partition("=")
        if not eq or not col.strip():
            raise ConfigError(f"--where {item!r}: expected COLUMN=VALUE, e.g. --where domain=tweets")
        out[col.strip()] = value.strip()
    return out


@dataclass
class ReplayOptions:
    """How to replay; every field is a ``lmloop replay`` flag."""

    url: str = "http://127.0.0.1:8000"
    rate: float = 10.0  # requests per second, open loop; 0 = as fast as the connections allow
    batch: int = 1  # texts per request
    concurrency: int = 64  # most requests in flight (connections)
    duration: float | None = None  # seconds; with it the data is cycled until time is up
    feedback_fraction: float = 0.0
    feedback_delay: str = "0"
    seed: int = 0  # which rows get feedback, and their delays
    api_key: str | None = None
    timeout: float = 60.0  # per request
    progress: bool = True

    def __post_init__(self):
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            raise ConfigError(
                f"--rate {self.rate}: expected requests per second >= 0 (0 = as fast as possible)"
            )
        if self.batch < 1:
            raise ConfigError(f"--batch {self.batch}: expected at least 1 text per request")
        if self.concurrency < 1:
            raise ConfigError(f"--concurrency {self.concurrency}: expected at least 1")
        if self.duration is not None and not self.duration > 0:
            raise ConfigError(f"--duration {self.duration}: expected seconds > 0")
        if not 0 <= self.feedback_fraction <= 1:
            raise ConfigError(f"--feedback-fraction {self.feedback_fraction}: expected 0..1")
        if not self.timeout > 0:
            raise ConfigError(f"--timeout {self.timeout}: expected seconds > 0")
        parse_delay(self.feedback_delay)
        Endpoint.parse(self.url)


# ---------------------------------------------------------------------------------------------- replay
@dataclass
class _Stats:
    sent: int = 0
    ok: int = 0
    texts_sent: int = 0
    texts_ok: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, answered 200, from the due time
    waits: list[float] = field(default_factory=list)  # seconds from due to sent (client side)
    first_send: float | None = None
    last_send: float | None = None
    last_done: float | None = None
    labelled: int = 0
    correct: int = 0
    per_domain: dict = field(default_factory=dict)  # domain -> [labelled, correct]
    fb_planned: int = 0  # chosen rows whose prediction was answered
    fb_ok: int = 0
    fb_correct: int = 0  # of the feedback acknowledged, predictions that were right
    fb_errors: Counter = field(default_factory=Counter)
    first_error: dict = field(default_factory=dict)  # kind -> message, for the summary


def replay(data: ReplayData, opts: ReplayOptions) -> dict:
    """Replay ``data`` against the server at ``opts.url``; the summary as a dict (see :func:`format_summary`).
    Raises ConfigError (exit 2) when the server cannot be reached or the data's labels are not the model's.
    SIGINT/SIGTERM stop sending, wait up to 2 s for answers in flight and return the partial summary with
    ``interrupted: true``."""
    try:
        import uvloop

        return uvloop.run(_replay(data, opts))
    except ImportError:
        return asyncio.run(_replay(data, opts))


async def _replay(data: ReplayData, opts: ReplayOptions) -> dict:
    ep = Endpoint.parse(opts.url)
    headers = {"X-API-Key": opts.api_key} if opts.api_key else {}
    pool = Pool(ep, opts.concurrency, opts.timeout, headers)
    fb_pool = Pool(ep, min(opts.concurrency, 8), opts.timeout, headers)  # feedback never starves classify
    model = await _preflight(pool, opts.url, data)

    # which rows get feedback, and after how long: fixed by the seed before anything is sent
    rng = random.Random(opts.seed)
    labelled = [i for i, lab in enumerate(data.labels) if lab is not None]
    chosen = sorted(rng.sample(labelled, round(opts.feedback_fraction * len(labelled))))
    draw = parse_delay(opts.feedback_delay)
    fb_delay = {i: draw(rng) for i in chosen}

    n, b = len(data), opts.batch
    total = None if opts.duration else math.ceil(n / b)
    run_id = uuid.uuid4().hex[:8]
    st = _Stats()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    heap: list[tuple[float, int, str, str, bool]] = []  # (due, seq, prediction id, label, predicted right)
    heap_changed = asyncio.Event()
    interrupts = [0]

    def on_signal() -> None:
        interrupts[0] += 1
        stop.set()
        heap_changed.set()
        if interrupts[0] > 1:  # a second Ctrl-C: do not wait for anything
            for t in asyncio.all_tasks(loop):
                if t is not main_task:
                    t.cancel()

    main_task = asyncio.current_task()
    signals = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
            signals.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
            pass

    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="req", desc="replay", disable=not opts.progress, file=sys.stderr)
    last_bar = [0.0]

    def refresh(force: bool = False) -> None:
        now = time.monotonic()
        if not opts.progress or (not force and now - last_bar[0] < 0.25):
            return
        last_bar[0] = now
        span = (st.last_send or 0) - (st.first_send or 0)
        rate = (st.sent - 1) / span if st.sent > 1 and span > 0 else 0.0
        bar.set_postfix(
            sent=st.sent,
            ok=st.ok,
            err=sum(st.errors.values()),
            rate=f"{rate:.1f}/s",
            fb=st.fb_ok,
            refresh=True,
        )

    async def one(i: int, due: float) -> None:
        rows = [(i * b + j) % n for j in range(b)] if opts.duration else list(range(i * b, min(n, i * b + b)))
        body = json.dumps({"inputs": [data.texts[r] for r in rows]}).encode()
        sent_at = [due]

        def on_send() -> None:
            t = loop.time()
            sent_at[0] = t
            st.sent += 1
            st.texts_sent += len(rows)
            st.first_send = t if st.first_send is None else st.first_send
            st.last_send = t

        try:
            status, answer = await pool.request(
                "POST", "/v1/classify", body, {"X-Request-ID": f"replay-{run_id}-{i}"}, on_send
            )
        except HttpError as e:
            st.errors[e.kind] += 1
            st.first_error.setdefault(e.kind, str(e))
            return
        finally:
            bar.update(1)
        done = loop.time()
        st.last_done = done
        if status != 200:
            st.errors[str(status)] += 1
            st.first_error.setdefault(str(status), answer[:300].decode("utf-8", "replace"))
            refresh()
            return
        try:
            preds = json.loads(answer)["predictions"]
        except (ValueError, KeyError, TypeError):
            st.errors["bad-answer"] += 1
            st.first_error.setdefault("bad-answer", answer[:300].decode("utf-8", "replace"))
            return
        st.ok += 1
        st.texts_ok += len(rows)
        st.latencies.append(done - (due if opts.rate > 0 else sent_at[0]))
        st.waits.append(sent_at[0] - due)
        for r, p in zip(rows, preds, strict=True):
            truth = data.labels[r]
            if truth is None:
                continue
            right = p["label"] == truth
            st.labelled += 1
            st.correct += right
            d = st.per_domain.setdefault(data.domains[r], [0, 0])
            d[0] += 1
            d[1] += right
            if r in fb_delay:
                st.fb_planned += 1
                heapq.heappush(heap, (done + fb_delay[r], st.fb_planned, p["id"], truth, right))
                heap_changed.set()
        refresh()

    async def send_feedback(pid: str, label: str, right: bool) -> None:
        body = json.dumps({"prediction_id": pid, "label": label}).encode()
        try:
            status, answer = await fb_pool.request("POST", "/v1/feedback", body)
        except HttpError as e:
            st.fb_errors[e.kind] += 1
            st.first_error.setdefault(f"feedback {e.kind}", str(e))
            return
        if status == 200:
            st.fb_ok += 1
            st.fb_correct += right
        else:
            st.fb_errors[str(status)] += 1
            st.first_error.setdefault(f"feedback {status}", answer[:300].decode("utf-8", "replace"))

    sending: set[asyncio.Task] = set()
    fb_sending: set[asyncio.Task] = set()
    scheduling_done = asyncio.Event()

    async def wait_some(tasks: set[asyncio.Task]) -> None:
        """Until one of ``tasks`` finishes or a stop is asked for."""
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({*tasks, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()

    async def feedback_loop() -> None:
        """Send each feedback when due; return once scheduling is over and nothing is left to send."""
        while not stop.is_set():
            if not heap:
                if scheduling_done.is_set() and not sending:
                    return
                heap_changed.clear()
                await heap_changed.wait()
                continue
            wait = heap[0][0] - loop.time()
            if wait > 0:
                heap_changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(heap_changed.wait(), wait)
                continue
            _, _, pid, label, right = heapq.heappop(heap)
            t = asyncio.create_task(send_feedback(pid, label, right))
            fb_sending.add(t)
            t.add_done_callback(fb_sending.discard)

    async def schedule() -> None:
        # open loop: a bounded backlog of waiting requests keeps memory finite under heavy overload; the
        # latency of a request held back by it still counts from its due time
        max_pending = max(10_000, 10 * opts.concurrency) if opts.rate > 0 else opts.concurrency
        t0 = loop.time()
        i = 0
        while not stop.is_set() and (total is None or i < total):
            due = t0 + i / opts.rate if opts.rate > 0 else loop.time()
            if opts.duration and due - t0 >= opts.duration:
                break
            delay = due - loop.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except asyncio.TimeoutError:
                    pass
            while len(sending) >= max_pending and not stop.is_set():
                await wait_some(sending)
            if stop.is_set():
                break
            t = asyncio.create_task(one(i, due))
            sending.add(t)
            t.add_done_callback(sending.discard)
            i += 1
            await asyncio.sleep(0)  # behind schedule, let answers in between sends

    t_start = time.monotonic()
    fb_task = asyncio.create_task(feedback_loop())
    cancelled = 0
    try:
        try:
            await schedule()
            while sending and not stop.is_set():
                await wait_some(sending)
            scheduling_done.set()
            heap_changed.set()
            if heap and opts.progress:
                bar.set_description(f"replay (waiting for {len(heap)} feedback)")
            await fb_task
            if fb_sending:
                await asyncio.wait(set(fb_sending), timeout=2.0 if stop.is_set() else None)
        except asyncio.CancelledError:
            if interrupts[0] == 0:
                raise
        if stop.is_set():  # interrupted: a short grace for answers in flight, then give up on them
            for group in (sending, fb_sending):
                if group:
                    await asyncio.wait(set(group), timeout=2.0)
            cancelled = len(sending)
            for t in [*sending, *fb_sending, fb_task]:
                t.cancel()
            await asyncio.gather(*sending, *fb_sending, fb_task, return_exceptions=True)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        refresh(force=True)
        bar.close()
        pool.close()
        fb_pool.close()
    elapsed = time.monotonic() - t_start
    return _summary(data, opts, model, st, elapsed, cancelled, interrupts[0] > 0, len(chosen))


async def _preflight(pool: Pool, url: str, data: ReplayData) -> dict:
    """GET /v1/models: the server is there, and the data's labels are ones it can take as feedback."""
    try:
        status, body = await pool.request("GET", "/v1/models")
    except HttpError as e:
        hint = "; is `lmloop serve` running there?" if e.kind in ("refused", "connect") else ""
        raise ConfigError(f"cannot reach the server at {url}: {e}{hint}") from None
    if status == 401:
        raise ConfigError(f"{url} wants an API key for every endpoint: set LMLOOP_API_KEY or pass --api-key")
    if status != 200:
        raise ConfigError(f"{url}/v1/models answered {status}; is this an lmloop server? {body[:200]!r}")
    try:
        model = json.loads(body)["data"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ConfigError(f"{url}/v1/models: not an lmloop answer: {body[:200]!r}") from None
    unknown = sorted({lab for lab in data.labels if lab is not None} - set(model.get("labels") or []))
    if unknown:
        raise ConfigError(
            f"{data.source}: labels {unknown} are not the served model's labels {model.get('labels')}; "
            "feedback would be refused and accuracy meaningless (is this the model trained on this data? "
            "--label-column chooses a file's label column)"
        )
    return model


def _pct(values: list[float], scale: float = 1000.0) -> dict | None:
    if not values:
        return None
    import numpy as np

    a = np.asarray(values) * scale
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def _summary(data, opts, model, st: _Stats, elapsed, cancelled, interrupted, fb_chosen) -> dict:
    span = (st.last_send or 0) - (st.first_send or 0)
    answered_span = (st.last_done or 0) - (st.first_send or 0)
    fb_failed = sum(st.fb_errors.values())
    return {
        "url": opts.url,
        "data": data.source,
        "rows": len(data),
        "model": {"name": model.get("id"), "version": model.get("version"), "labels": model.get("labels")},
        "interrupted": interrupted,
        "seconds": elapsed,
        "target_rate": opts.rate,
        "batch": opts.batch,
        "concurrency": opts.concurrency,
        "requests": {
            "sent": st.sent,
            "ok": st.ok,
            "errors": sum(st.errors.values()),
            "cancelled": cancelled,
        },
        "texts": {"sent": st.texts_sent, "ok": st.texts_ok},
        # the send rate is what the open-loop schedule controls: below the target, the client fell behind
        # (too few --concurrency connections, or no CPU left for it)
        "achieved_rate": (st.sent - 1) / span if st.sent > 1 and span > 0 else None,
        "answered_rate": st.ok / answered_span if st.ok and answered_span > 0 else None,
        "texts_per_s": st.texts_ok / answered_span if st.ok and answered_span > 0 else None,
        "latency_ms": _pct(st.latencies),
        "client_wait_ms": _pct(st.waits),
        "errors_by_status": dict(sorted(st.errors.items())),
        "first_errors": st.first_error,
        "accuracy": {
            "labelled": st.labelled,
            "correct": st.correct,
            "accuracy": st.correct / st.labelled if st.labelled else None,
            "per_domain": {
                str(d): {"n": v[0], "accuracy": v[1] / v[0]}
                for d, v in sorted(st.per_domain.items(), key=lambda kv: str(kv[0]))
                if d is not None
            },
        },
        "feedback": {
            "fraction": opts.feedback_fraction,
            "delay": opts.feedback_delay,
            "chosen_rows": fb_chosen,
            "planned": st.fb_planned,  # chosen rows whose prediction came back
            "sent": st.fb_ok + fb_failed,
            "ok": st.fb_ok,
            "failed": fb_failed,
            "failed_by_status": dict(sorted(st.fb_errors.items())),
            "dropped": st.fb_planned - st.fb_ok - fb_failed,  # not due yet when interrupted
            "accuracy": st.fb_correct / st.fb_ok if st.fb_ok else None,
        },
    }


def _ms(d: dict | None, key: str) -> str:
    return "-" if not d else f"{d[key]:.1f}"


def format_summary(s: dict) -> str:
    """The summary as a few lines of text."""
    r, fb, acc = s["requests"], s["feedback"], s["accuracy"]
    m = s["model"]
    rate = "as fast as possible" if not s["target_rate"] else f"target {s['target_rate']:g}"
    ach = "-" if s["achieved_rate"] is None else f"{s['achieved_rate']:.1f}"
    ans = "-" if s["answered_rate"] is None else f"{s['answered_rate']:.1f}"
    tps = "-" if s["texts_per_s"] is None else f"{s['texts_per_s']:.1f}"
    lat, wait = s["latency_ms"], s["client_wait_ms"]
    lines = [
        f"replay {s['data']} ({s['rows']} texts) -> {s['url']}  model {m['name']} {m['version']}"
        + ("  [interrupted]" if s["interrupted"] else ""),
        f"requests   {r['sent']} sent, {r['ok']} ok, {r['errors']} errors"
        + (f", {r['cancelled']} cancelled" if r["cancelled"] else "")
        + f"  ({s['texts']['ok']} texts answered, {s['batch']} per request) in {s['seconds']:.1f} s",
        f"rate       sent {ach} req/s ({rate}), answered {ans} req/s, {tps} texts/s",
        f"latency    p50 {_ms(lat, 'p50')}  p90 {_ms(lat, 'p90')}  p99 {_ms(lat, 'p99')}  max {_ms(lat, 'max')} ms"
        + (f"  (client-side wait p99 {_ms(wait, 'p99')} ms)" if wait else ""),
    ]
    if s["target_rate"] and s["achieved_rate"] and s["achieved_rate"] < 0.9 * s["target_rate"]:
        lines.append(
            "           the client fell behind its schedule (latency counts the wait): "
            "raise --concurrency, or run the client on another machine"
        )
    if s["errors_by_status"]:
        lines.append("errors     " + ", ".join(f"{k}: {v}" for k, v in s["errors_by_status"].items()))
        for k, msg in s["first_errors"].items():
            lines.append(f"           first {k}: {msg[:160]}")
    if acc["labelled"]:
        dom = "  ".join(f"{d} {v['accuracy']:.3f} (n={v['n']})" for d, v in acc["per_domain"].items())
        lines.append(
            f"accuracy   {acc['accuracy']:.4f} on {acc['labelled']} labelled answers (client side)"
            + (f"\n           {dom}" if dom else "")
        )
    else:
        lines.append("accuracy   - (no labelled answers)")
    if fb["fraction"]:
        fa = "-" if fb["accuracy"] is None else f"{fb['accuracy']:.4f}"
        line = (
            f"feedback   {fb['ok']} ok of {fb['planned']} planned, {fb['failed']} failed"
            + (
                f" ({', '.join(f'{k}: {v}' for k, v in fb['failed_by_status'].items())})"
                if fb["failed"]
                else ""
            )
            + (f", {fb['dropped']} dropped" if fb["dropped"] else "")
            + f"; accuracy on them {fa} (what `lmloop monitor` shows as live accuracy)"
        )
        lines.append(line)
        if fb["failed_by_status"].get("401"):
            lines.append(
                "           feedback needs the server's API key: set LMLOOP_API_KEY or pass --api-key"
            )
    return "\n".join(lines)

"""Monitoring from the prediction log: traffic, latency, labels, confidence and live accuracy, per model
version and time window, as a plain summary, a table and a self-contained HTML report.

What the log holds (:mod:`lmloop.mlops.predlog`) and so what this can say:

* **traffic**: predictions (one per input text) and requests. A request is a distinct ``request_id``:
  the client's ``X-Request-ID``, else the id of the request's first prediction. A record without one
  counts as its own request.
* **latency**: ``latency_ms`` is stamped once per request by the server, from the decoded request to its
  probabilities (queueing, micro-batching and the forward passes; not HTTP parsing, the response, or the
  network). Percentiles are therefore over *requests*, each counted once, not over predictions: a
  128-text request is one sample, not 128.
* **labels and confidence**: the predicted label and ``score`` (the top class probability).
* **live accuracy**: the latest feedback of each prediction against its label; a Wilson 95% interval,
  the feedback coverage (labelled / predicted) and macro-F1 once :data:`MIN_LABELS_F1` labels exist.
  Predictions are placed in windows by *prediction* time: a recent window shows the feedback received
  so far, so its coverage grows as users answer.

What the log does not hold: requests the server refused (429, 503, 504, 4xx) never reach it, so error
rates come from ``/metrics``, not from here.

Streaming: :func:`summarize` reads the log once in time order (:meth:`PredictionStore.iter_predictions`
pages through it) and keeps only the aggregates of the windows still open, plus per-version totals.
Percentiles are exact up to :data:`EXACT_QUANTILES` samples per aggregate, then come from log-spaced
buckets with 0.5% relative error, so memory stays bounded however large the log.

Drift (``lmloop.mlops.drift``) is not computed here yet: :attr:`MonitorSummary.drift` and the report's
"Drift" section are the places it plugs in.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmloop.errors import ConfigError

SCORE_BINS = 20  # equal-width confidence bins over [0, 1]
MIN_LABELS_F1 = 30  # fewer labelled predictions than this: macro-F1 is noise, so it is not reported
EXACT_QUANTILES = 100_000  # latency samples kept exactly per aggregate; beyond, log buckets (0.5% error)
MAX_WINDOWS = 20_000  # windows in one summary; more is a typo in --window or --since
RECENT_REQUESTS = 4096  # request ids remembered per version to count each request once
_Z95 = 1.959963984540054  # two-sided 95% normal quantile
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
TIME_HELP = (
    "an ISO time (2024-05-01, 2024-05-01T12:00, ...Z or +02:00; no zone = UTC) or an age: 30m, 24h, 7d"
)


# ---------------------------------------------------------------------------------------------- entities
@dataclass
class Latency:
    """Request latency in ms over the requests of an aggregate (each request once)."""

    n: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    exact: bool  # False: percentiles from log buckets, within 0.5%


@dataclass
class Stats:
    """The aggregate of a set of predictions (a window or a whole range)."""

    predictions: int = 0
    requests: int = 0
    latency: Latency | None = None  # None: no request in the set
    labels: dict[str, int] = field(default_factory=dict)  # predicted label -> count
    score_mean: float | None = None
    score_hist: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)  # SCORE_BINS bins over [0, 1]
    labelled: int = 0  # predictions with feedback
    correct: int = 0  # ... whose latest feedback equals the predicted label
    accuracy: float | None = None  # correct / labelled
    accuracy_low: float | None = None  # Wilson 95% interval of the accuracy
    accuracy_high: float | None = None
    coverage: float | None = None  # labelled / predictions
    macro_f1: float | None = None  # over the labelled, once labelled >= MIN_LABELS_F1
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # feedback label -> predicted -> n


@dataclass
class Window:
    start: float  # unix seconds, a multiple of the window length (windows align to UTC)
    end: float
    stats: Stats


@dataclass
class VersionSummary:
    model: str
    version: str
    first_at: float  # first and last prediction in range
    last_at: float
    total: Stats
    windows: list[Window]  # every window from the first to the last, empty ones included


@dataclass
class MonitorSummary:
    """What :func:`summarize` returns; :meth:`to_dict` is its JSON form."""

    store: str  # URL, password redacted
    since: float | None
    until: float | None
    window_s: float
    model: str | None  # the --model filter
    generated_at: float
    versions: list[VersionSummary]
    total: Stats  # all versions together
    notes: list[str]  # what the log records and lacks, in words
    # DRIFT: placeholder for lmloop.mlops.drift (being written separately). It will set this to its result
    # (per version and window: the test, the statistic, the reference); the report renders a "Drift"
    # section from it, and says drift is not computed yet while it is None.
    drift: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


def _clean(obj: Any) -> Any:
    # NaN/inf are not JSON
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---------------------------------------------------------------------------------------------- parsing
def parse_duration(text: str | float, *, what: str = "--window") -> float:
    """``"90s"``, ``"15m"``, ``"1h"``, ``"7d"``, ``"2w"`` (or a number of seconds) -> seconds > 0."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = _DURATION.match(str(text))
        if not m:
            raise ConfigError(f"{what} {str(text)!r}: expected a duration like 90s, 15m, 1h, 1d, 2w")
        seconds = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not seconds > 0 or not math.isfinite(seconds):
        raise ConfigError(f"{what} {text!r}: must be more than 0 seconds")
    return seconds


def parse_time(text: str | float | datetime | None, *, now: float | None = None, what: str = "--since"):
    """A point in time as unix seconds: ``None`` stays None; a number is unix seconds; a ``datetime`` (naive
    = UTC); a string is an ISO time (``2024-05-01``, ``2024-05-01T12:00:00Z``, ``...+02:00``; no zone =
    UTC), ``now``, or an age before ``now``: ``30m``, ``24h``, ``7d``. Raises :class:`ConfigError`."""
    if text is None:
        return None
    now = time.time() if now is None else now
    if isinstance(text, datetime):
        return (text if text.tzinfo else text.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip()
    if s.lower() == "now":
        return now
    if _DURATION.match(s):
        return now - parse_duration(s, what=what)
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise ConfigError(f"{what} {s!r}: expected {TIME_HELP}") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


# ---------------------------------------------------------------------------------------------- statistics
def wilson_interval(k: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (95% for the default ``z``). Unlike the normal
    approximation it stays inside [0, 1] and is sane at k = 0, k = n and small n. ``n = 0`` -> (0, 1)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def macro_f1(confusion: dict[str, dict[str, int]]) -> float | None:
    """Unweighted mean F1 over the classes present as a true or a predicted label (sklearn's default set,
    as :func:`lmloop.evaluate.compute_metrics` uses); ``confusion[true][pred] = n``. None when empty."""
    classes = set(confusion) | {p for row in confusion.values() for p in row}
    if not classes:
        return None
    f1s = []
    for c in classes:
        tp = confusion.get(c, {}).get(c, 0)
        fn = sum(confusion.get(c, {}).values()) - tp
        fp = sum(row.get(c, 0) for t, row in confusion.items() if t != c)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1s) / len(f1s)


class _Quantiles:
    """Exact percentiles (linear interpolation, numpy's default) up to ``cap`` samples; past it the samples
    fold into log-spaced buckets (DDSketch's: relative error ``alpha``), so memory stays bounded."""

    def __init__(self, cap: int = EXACT_QUANTILES, alpha: float = 0.005):
        self.cap, self.values = cap, []
        self.gamma = (1 + alpha) / (1 - alpha)
        self.log_gamma = math.log(self.gamma)
        self.buckets: Counter[int] | None = None
        self.zeros = self.n = 0
        self.sum, self.max = 0.0, -math.inf

    def add(self, x: float) -> None:
        self.n += 1
        self.sum += x
        self.max = max(self.max, x)
        if self.buckets is None:
            self.values.append(x)
            if len(self.values) > self.cap:
                self.buckets = Counter()
                for v in self.values:
                    self._bucket(v)
                self.values = []
        else:
            self._bucket(x)

    def _bucket(self, x: float) -> None:
        if x <= 0:
            self.zeros += 1
        else:
            self.buckets[math.ceil(math.log(x) / self.log_gamma)] += 1

    def quantile(self, q: float) -> float:
        if self.buckets is None:
            v = self.values  # sorted by result()
            pos = q * (len(v) - 1)
            lo = math.floor(pos)
            hi = min(lo + 1, len(v) - 1)
            return v[lo] + (v[hi] - v[lo]) * (pos - lo)
        rank, seen = q * (self.n - 1), self.zeros
        if rank < seen:
            return 0.0
        for i in sorted(self.buckets):
            seen += self.buckets[i]
            if rank < seen:
                return min(2 * self.gamma**i / (self.gamma + 1), self.max)
        return self.max

    def result(self) -> Latency | None:
        if not self.n:
            return None
        if self.buckets is None:
            self.values.sort()  # once, for the three quantiles
        q = self.quantile
        return Latency(self.n, self.sum / self.n, q(0.5), q(0.9), q(0.99), self.max, self.buckets is None)


class _Agg:
    """Running aggregate of predictions -> :class:`Stats`. Memory: counters plus the latency samples."""

    def __init__(self) -> None:
        self.predictions = self.requests = self.labelled = self.correct = 0
        self.latency = _Quantiles()
        self.labels: Counter[str] = Counter()
        self.score_sum = 0.0
        self.hist = [0] * SCORE_BINS
        self.confusion: dict[str, Counter[str]] = {}

    def add(self, pred, fb, new_request: bool) -> None:
        self.predictions += 1
        if new_request:
            self.requests += 1
            self.latency.add(float(pred.latency_ms))
        self.labels[pred.label] += 1
        s = float(pred.score)
        self.score_sum += s
        self.hist[min(max(int(s * SCORE_BINS), 0), SCORE_BINS - 1)] += 1
        if fb is not None:
            self.labelled += 1
            self.correct += fb.label == pred.label
            self.confusion.setdefault(fb.label, Counter())[pred.label] += 1

    def stats(self) -> Stats:
        n, k = self.labelled, self.correct
        low, high = wilson_interval(k, n) if n else (None, None)
        confusion = {t: dict(sorted(row.items())) for t, row in sorted(self.confusion.items())}
        return Stats(
            predictions=self.predictions,
            requests=self.requests,
            latency=self.latency.result(),
            labels=dict(sorted(self.labels.items())),
            score_mean=self.score_sum / self.predictions if self.predictions else None,
            score_hist=list(self.hist),
            labelled=n,
            correct=k,
            accuracy=k / n if n else None,
            accuracy_low=low,
            accuracy_high=high,
            coverage=n / self.predictions if self.predictions else None,
            macro_f1=macro_f1(confusion) if n >= MIN_LABELS_F1 else None,
            confusion=confusion,
        )


class _Version:
    """One (model, version) while streaming: its total, its open window and its finished windows."""

    def __init__(self, model: str, version: str) -> None:
        self.model, self.version = model, version
        self.first_at = self.last_at = 0.0
        self.total = _Agg()
        self.windows: list[Window] = []
        self.open: tuple[float, _Agg] | None = None
        self.recent: OrderedDict[str, None] = OrderedDict()  # request ids seen lately (an LRU)

    def new_request(self, request_id: str | None) -> bool:
        # A request's predictions are stamped together, so its id recurs within a few records (a few
        # more where replicas interleave): a bounded LRU counts each once in constant memory.
        if request_id is None:
            return True
        if request_id in self.recent:
            self.recent.move_to_end(request_id)
            return False
        self.recent[request_id] = None
        if len(self.recent) > RECENT_REQUESTS:
            self.recent.popitem(last=False)
        return True

    def close_window(self, w: float) -> None:
        if self.open is not None:
            start, agg = self.open
            self.windows.append(Window(start, start + w, agg.stats()))
            self.open = None

    def summary(self, w: float) -> VersionSummary:
        self.close_window(w)
        filled: list[Window] = []
        for win in self.windows:  # fill the gaps: a window without traffic is news (an outage?)
            while filled and filled[-1].end < win.start - w / 2:
                filled.append(Window(filled[-1].end, filled[-1].end + w, _Agg().stats()))
            filled.append(win)
        return VersionSummary(
            self.model, self.version, self.first_at, self.last_at, self.total.stats(), filled
        )


def _open(store_or_url: Any):
    """(store, close it after?) for a store object, a URL, a path or None (the serve default)."""
    from lmloop.mlops.predlog import PredictionStore, default_url, open_store

    if isinstance(store_or_url, PredictionStore):
        return store_or_url, False
    url = default_url() if store_or_url is None or not str(store_or_url).strip() else str(store_or_url)
    url = url.strip()
    if "://" not in url or url.startswith("sqlite:///"):
        # monitoring reads: a missing file is a wrong path, not a log to create empty
        path = Path(url[len("sqlite:///") :] if url.startswith("sqlite:///") else url).expanduser()
        if path.name not in ("", ":memory:") and not path.exists():
            raise ConfigError(
                f"no prediction log at {path} (lmloop serve writes one there with --store; "
                "give --store sqlite:///path.db or postgresql://...)"
            )
    return open_store(url), True


def _window_count(span: float, w: float, hint: str) -> None:
    n = math.ceil(span / w) if span > 0 else 1
    if n > MAX_WINDOWS:
        raise ConfigError(
            f"{hint} makes {n:,} windows of {w:g} s (at most {MAX_WINDOWS:,}); give a larger --window "
            f"(e.g. --window {max(1, math.ceil(span / MAX_WINDOWS / 3600))}h) or a shorter --since"
        )


def summarize(
    store_or_url: Any = None,
    *,
    since: str | float | datetime | None = None,
    until: str | float | datetime | None = None,
    window: str | float = "1h",
    model: str | None = None,
    now: float | None = None,
) -> MonitorSummary:
    """Summarise the prediction log per model version and per time window (see the module docstring).

    ``store_or_url`` is a :class:`~lmloop.mlops.predlog.PredictionStore` (left open), a store URL or path,
    or None for the default that ``lmloop serve`` writes (``$LMLOOP_HOME/predictions.db``). ``since`` and
    ``until`` bound the predictions' time (``since <= t < until``): unix seconds, datetimes, ISO strings or
    ages like ``"24h"`` (see :func:`parse_time`). ``window`` is a duration (``"15m"``, ``"1h"``, ``"1d"``);
    windows align to multiples of it since the epoch, in UTC. ``model`` keeps one model name. Reads the
    log once, in constant memory. Raises :class:`ConfigError` for bad arguments or a missing SQLite file.
    """
    now = time.time() if now is None else now
    t0 = parse_time(since, now=now, what="--since")
    t1 = parse_time(until, now=now, what="--until")
    w = parse_duration(window)
    if t0 is not None and t1 is not None and t0 >= t1:
        raise ConfigError(f"--since ({_ts(t0)}) must be before --until ({_ts(t1)})")
    store, close = _open(store_or_url)
    versions: dict[tuple[str, str], _Version] = {}
    grand = _Agg()
    current: float | None = None  # start of the window being read (the log comes in time order)
    first: float | None = None  # start of the first window
    try:
        for pred, fb in store.iter_predictions(since=t0, until=t1, model=model, with_feedback=True):
            start = math.floor(pred.created_at / w) * w
            if start != current:
                for v in versions.values():  # the stream has left those windows: freeze them
                    v.close_window(w)
                current = start
                first = start if first is None else first
                _window_count(start + w - first, w, "the log's time span")
            v = versions.get((pred.model, pred.version))
            if v is None:
                v = versions[(pred.model, pred.version)] = _Version(pred.model, pred.version)
                v.first_at = pred.created_at
            v.last_at = pred.created_at
            if v.open is None:
                v.open = (start, _Agg())
            new = v.new_request(pred.request_id)
            v.open[1].add(pred, fb, new)
            v.total.add(pred, fb, new)
            grand.add(pred, fb, new)
        url = store.url
    finally:
        if close:
            store.close()
    out = [v.summary(w) for v in versions.values()]
    out.sort(key=lambda v: (v.first_at, v.model, v.version))
    return MonitorSummary(
        store=url,
        since=t0,
        until=t1,
        window_s=w,
        model=model,
        generated_at=now,
        versions=out,
        total=grand.stats(),
        notes=_notes(),
    )


def _notes() -> list[str]:
    return [
        "Requests are distinct request ids (the client's X-Request-ID, else the first prediction's id); "
        "predictions are one per input text.",
        "Latency is per request, as the server stamps it: from the decoded request to its probabilities "
        "(queueing, batching, inference); it excludes HTTP parsing, the response and the network.",
        "Requests the server refused (429, 503, 504, 4xx) are not in the prediction log; see /metrics.",
        "Live accuracy compares each prediction's latest feedback with its label, by prediction time: "
        "recent windows have had less time to collect feedback. Feedback is not a random sample of "
        "traffic (users report what they notice), so read the interval as a sampling bound only.",
        f"Macro-F1 is shown once {MIN_LABELS_F1} predictions in a set have feedback.",
    ]


# ---------------------------------------------------------------------------------------------- text
def _ts(t: float | None, with_seconds: bool = False) -> str:
    if t is None:
        return "-"
    fmt = "%Y-%m-%d %H:%M:%SZ" if with_seconds else "%Y-%m-%d %H:%MZ"
    return datetime.fromtimestamp(t, timezone.utc).strftime(fmt)


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def short_version(version: str, n: int = 12) -> str:
    """``sha256:1382ab...`` is long; tables show its first ``n`` characters after any ``sha256:``."""
    v = version.split(":", 1)[1] if version.startswith("sha256:") else version
    return v if len(v) <= n else v[:n] + "\u2026"


def _labels_text(labels: dict[str, int], top: int = 3) -> str:
    n = sum(labels.values())
    if not n:
        return "-"
    items = sorted(labels.items(), key=lambda kv: -kv[1])
    text = " ".join(f"{k} {100 * c / n:.0f}%" for k, c in items[:top])
    return text + (f" +{len(items) - top}" if len(items) > top else "")


def _acc_text(s: Stats) -> str:
    if s.accuracy is None:
        return "-"
    return f"{s.accuracy:.3f} [{s.accuracy_low:.3f}, {s.accuracy_high:.3f}]"


_HEAD = (
    f"{'':24s} {'preds':>7s} {'reqs':>6s} {'p50 ms':>7s} {'p90 ms':>7s} {'p99 ms':>7s} {'conf':>5s} "
    f"{'fb':>5s} {'cover':>6s} {'accuracy [95% CI]':22s} {'mF1':>5s}  labels"
)


def _row(name: str, s: Stats) -> str:
    lat = s.latency
    return (
        f"{name[:24]:24s} {s.predictions:>7d} {s.requests:>6d} {_num(lat and lat.p50, 1):>7s} "
        f"{_num(lat and lat.p90, 1):>7s} {_num(lat and lat.p99, 1):>7s} {_num(s.score_mean, 2):>5s} "
        f"{s.labelled:>5d} {_pct(s.coverage):>6s} {_acc_text(s):22s} {_num(s.macro_f1, 2):>5s}  "
        f"{_labels_text(s.labels)}"
    )


def format_summary(summary: MonitorSummary, *, windows: bool = True) -> str:
    """The table of ``lmloop monitor summary``: a totals row per model version, then (``windows``) a row
    per window under it."""
    s = summary
    until = _ts(s.until) if s.until is not None else f"now ({_ts(s.generated_at)})"
    lines = [
        f"store {s.store}   {_ts(s.since) if s.since is not None else 'start'} .. {until}   "
        f"window {_duration_text(s.window_s)}" + (f"   model {s.model}" if s.model else "")
    ]
    if not s.versions:
        lines.append("no predictions in this range")
        return "\n".join(lines)
    lines.append(_HEAD)
    for v in s.versions:
        lines.append(_row(f"{v.model}/{short_version(v.version)}", v.total))
        if windows:
            lines.extend(_row("  " + _ts(win.start), win.stats) for win in v.windows)
    if len(s.versions) > 1:
        lines.append(_row("all versions", s.total))
    lines.append(
        "fb = predictions with feedback; cover = fb / preds; conf = mean top-class probability; "
        "latency per request"
    )
    if s.drift is None:
        lines.append("drift: not computed yet (lmloop.mlops.drift)")
    return "\n".join(lines)


def _duration_text(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"

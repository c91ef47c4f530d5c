"""Live monitoring inside ``lmloop serve``: a snapshot of how the served model is doing, and alerts.

:class:`Monitor` runs on a daemon thread every ``--monitor-interval`` seconds (0: no thread; ``GET
/v1/monitor`` then computes a snapshot on demand, and alerts are judged only then). Each tick reads

* the prediction log over the recent ``window`` (:func:`lmloop.mlops.monitor.summarize`, this model name):
  traffic, request latency p50/p90/p99, and live accuracy of the served version from feedback with its
  Wilson 95% interval, the labelled count and the coverage;
* this replica's own request counters (the Prometheus series): the share of ``/v1/classify`` requests in
  ``window`` answered 5xx (errors) or 429 (refused: queue full), which never reach the log;
* drift, at most every ``drift_interval``: :func:`lmloop.mlops.drift.detect` of the most recent served texts
  against ``drift_reference.npz`` in the served model's directory (absent: said so, never an error). The
  texts come from the log, or with ``--log-text hash`` from a bounded in-memory ring of the last
  ``drift_texts`` texts (never written anywhere);
* the registry: versions and aliases of the model being followed (``models:/NAME@ALIAS``), for /dashboard.

Against the thresholds of ``--alerts`` (:class:`lmloop.config.AlertsConfig`) each alert is judged, or not
judged when the window holds too little data (an active alert then clears: nothing says it still holds).
A transition (raised / cleared) is logged on stderr (numbers only: never a text, a key or the webhook URL),
counted in ``lmloop_alerts_total{alert}``, shown in ``lmloop_alert_active{alert}`` and POSTed as JSON to
the webhook by :class:`Webhook` on its own thread (timeout, retries with back-off, a bounded queue: a slow
or dead receiver never holds up serving; outcomes in ``lmloop_alert_webhook_posts_total{outcome}``).
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ALERTS = {  # name -> the threshold key that turns it on
    "live_accuracy": "min_live_accuracy",
    "drift": "max_drift_p",
    "p99_latency": "max_p99_latency_ms",
    "error_rate": "max_error_rate",
    "refusal_rate": "max_refusal_rate",
}
SERIES_POINTS = 12  # windows in the dashboard's sparklines (window / 12 each)
REGISTRY_EVERY_S = 30.0  # the registry is asked at most this often
ON_DEMAND_MAX_AGE_S = 2.0  # --monitor-interval 0: a snapshot younger than this is served as is


def _say(msg: str) -> None:
    print(f"[lmloop serve] {msg}", file=sys.stderr, flush=True)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


# ---------------------------------------------------------------------------------------------- metrics
class MonitorGauges:
    """The monitor's Prometheus series, on the server's registry."""

    def __init__(self, registry) -> None:
        from prometheus_client import Counter, Gauge

        r = registry
        self.accuracy = Gauge(
            "lmloop_live_accuracy",
            "Live accuracy of the served version in the window (NaN: no feedback)",
            registry=r,
        )
        self.accuracy_low = Gauge(
            "lmloop_live_accuracy_lower", "Lower end of live accuracy's Wilson 95% interval", registry=r
        )
        self.accuracy_high = Gauge(
            "lmloop_live_accuracy_upper", "Upper end of live accuracy's Wilson 95% interval", registry=r
        )
        self.labelled = Gauge(
            "lmloop_live_accuracy_labelled",
            "Predictions with feedback in the window (served version)",
            registry=r,
        )
        self.coverage = Gauge("lmloop_feedback_coverage", "Labelled / predictions in the window", registry=r)
        self.p99 = Gauge(
            "lmloop_window_latency_p99_seconds", "p99 request latency in the window, from the log", registry=r
        )
        self.error_rate = Gauge(
            "lmloop_error_rate", "Share of /v1/classify answered 5xx in the window", registry=r
        )
        self.refusal_rate = Gauge(
            "lmloop_refusal_rate", "Share of /v1/classify answered 429 in the window", registry=r
        )
        self.drift_p = Gauge(
            "lmloop_drift_p_value", "Family-wise drift p-value of recent texts (NaN: not checked)", registry=r
        )
        self.drift_mmd = Gauge(
            "lmloop_drift_mmd", "MMD^2 of recent vs reference embeddings (NaN: none)", registry=r
        )
        self.active = Gauge("lmloop_alert_active", "1 while the alert is raised", ["alert"], registry=r)
        self.raised = Counter("lmloop_alerts", "Times the alert was raised", ["alert"], registry=r)
        self.webhook = Counter(
            "lmloop_alert_webhook_posts", "Alert webhook deliveries by outcome", ["outcome"], registry=r
        )
        self.last_run = Gauge(
            "lmloop_monitor_last_run_timestamp_seconds", "When the monitor last ran", registry=r
        )
        self.failures = Counter("lmloop_monitor_failures", "Monitor ticks that failed", registry=r)
        for v in (
            self.accuracy,
            self.accuracy_low,
            self.accuracy_high,
            self.p99,
            self.drift_p,
            self.drift_mmd,
        ):
            v.set(float("nan"))
        for v in (self.error_rate, self.refusal_rate):
            v.set(float("nan"))
        for outcome in ("sent", "failed", "dropped"):
            self.webhook.labels(outcome)


# ---------------------------------------------------------------------------------------------- webhook
class Webhook:
    """POSTs alert events as JSON to ``url`` from its own thread: ``post`` never blocks (a full queue drops
    the event and counts it). Each event gets ``1 + retries`` attempts of ``timeout_s``, with back-off
    ``backoff_s * 2**attempt`` between them; a 2xx answer is success."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        max_queue: int = 256,
        on_outcome: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self.on_outcome = on_outcome
        self.counts = {"sent": 0, "failed": 0, "dropped": 0}
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmloop-webhook", daemon=True)
        self._thread.start()

    def post(self, event: dict) -> None:
        try:
            self._q.put_nowait(event)
        except queue.Full:
            self._count("dropped")

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        self.on_outcome(outcome)

    def _send(self, body: bytes) -> None:
        import urllib.request

        req = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "lmloop-alerts"},
        )
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # raises on 4xx/5xx
            resp.read()

    def _run(self) -> None:
        while True:
            event = self._q.get()
            if event is None:
                return
            body = json.dumps(event).encode()
            for attempt in range(self.retries + 1):
                try:
                    self._send(body)
                    self._count("sent")
                    break
                except Exception as e:
                    if attempt == self.retries or self._stop.is_set():
                        # the URL may carry a token (Slack, ...): name the failure, never the URL
                        _say(f"alert webhook failed after {attempt + 1} attempts ({type(e).__name__})")
                        self._count("failed")
                        break
                    self._stop.wait(self.backoff_s * 2**attempt)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within ``timeout`` (no more retries once closing), then stop."""
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._q.put(None, timeout=timeout)
        self._thread.join(timeout)


# ---------------------------------------------------------------------------------------------- texts
class TextRing:
    """The last ``maxlen`` served texts with their time and predicted label, in memory only (drift input
    when the log keeps only hashes)."""

    def __init__(self, maxlen: int) -> None:
        self._d: deque = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, version: str, texts: list[str], labels: list[str]) -> None:
        now = time.time()
        with self._lock:
            self._d.extend((now, version, t, lab) for t, lab in zip(texts, labels, strict=True))

    def recent(self, since: float, version: str) -> tuple[list[str], list[str]]:
        with self._lock:
            rows = [r for r in self._d if r[0] >= since and r[1] == version]
        return [r[2] for r in rows], [r[3] for r in rows]


# ---------------------------------------------------------------------------------------------- judging
def judge(rules, snap: dict) -> dict[str, tuple[bool | None, float | None, float, str]]:
    """Each configured alert against ``snap``: ``{name: (breached or None if not judged, value, threshold,
    message)}``. Pure: the tests feed it synthetic snapshots."""
    out: dict[str, tuple[bool | None, float | None, float, str]] = {}
    acc = snap["live_accuracy"]
    if rules.min_live_accuracy is not None:
        thr = rules.min_live_accuracy
        if acc["labelled"] < rules.min_labelled:
            out["live_accuracy"] = (
                None,
                acc["accuracy"],
                thr,
                f"{acc['labelled']} labelled, need {rules.min_labelled}",
            )
        else:
            value = acc["high"] if rules.accuracy_test == "wilson" else acc["accuracy"]
            what = "upper end of the 95% interval" if rules.accuracy_test == "wilson" else "live accuracy"
            out["live_accuracy"] = (
                value < thr,
                acc["accuracy"],
                thr,
                f"{what} {value:.3f} {'<' if value < thr else '>='} {thr:g} (accuracy {acc['accuracy']:.3f}, "
                f"95% CI {acc['low']:.3f}-{acc['high']:.3f}, {acc['labelled']} labelled)",
            )
    drift = snap["drift"]
    if rules.max_drift_p is not None:
        thr, p = rules.max_drift_p, drift.get("p_value")
        if p is None:
            out["drift"] = (None, None, thr, drift.get("detail") or drift["status"])
        else:
            out["drift"] = (p < thr, p, thr, f"drift p-value {p:.3g} {'<' if p < thr else '>='} {thr:g}")
    lat = snap["latency_ms"]
    if rules.max_p99_latency_ms is not None:
        thr = rules.max_p99_latency_ms
        n = lat["n"] if lat else 0
        if n < rules.min_requests:
            out["p99_latency"] = (
                None,
                lat["p99"] if lat else None,
                thr,
                f"{n} requests, need {rules.min_requests}",
            )
        else:
            p99 = lat["p99"]
            out["p99_latency"] = (
                p99 > thr,
                p99,
                thr,
                f"p99 latency {p99:.1f} ms {'>' if p99 > thr else '<='} {thr:g} ms ({n} requests)",
            )
    rates = snap["requests"]
    for name, key, num in (
        ("error_rate", "max_error_rate", "errors"),
        ("refusal_rate", "max_refusal_rate", "refused"),
    ):
        thr = getattr(rules, key)
        if thr is None:
            continue
        if rates["total"] < rules.min_requests:
            out[name] = (None, rates[name], thr, f"{rates['total']} requests, need {rules.min_requests}")
        else:
            v = rates[name]
            out[name] = (
                v > thr,
                v,
                thr,
                f"{num} {rates[num]} of {rates['total']} requests ({v:.1%}) {'>' if v > thr else '<='} {thr:.1%}",
            )
    return out


# ---------------------------------------------------------------------------------------------- monitor
class Monitor:
    """Computes snapshots and watches alerts (see the module docstring).

    ``served()`` returns the live :class:`~lmloop.serve.follow.Served`; ``requests`` is the server's
    ``lmloop_requests`` counter; ``follower`` the registry alias being followed, if any."""

    def __init__(
        self,
        store,
        rules,
        *,
        interval_s: float,
        served: Callable[[], Any],
        requests,
        registry,
        keep_texts: bool,
        follower=None,
        say: Callable[[str], None] = _say,
        webhook_backoff_s: float = 1.0,
    ) -> None:
        from lmloop.config import AlertsConfig
        from lmloop.mlops.monitor import parse_duration

        self.store, self.rules = store, rules or AlertsConfig()
        self.interval_s, self.served, self.requests, self.follower = interval_s, served, requests, follower
        self.say = say
        self.window_s = parse_duration(self.rules.window, what="alerts.window")
        self.drift_every_s = parse_duration(self.rules.drift_interval, what="alerts.drift_interval")
        self.gauges = MonitorGauges(registry)
        # texts are held in memory only when the log does not keep them, and only for drift
        self.ring = TextRing(self.rules.drift_texts) if keep_texts else None
        self.webhook = None
        if self.rules.webhook:
            self.webhook = Webhook(
                self.rules.webhook,
                timeout_s=self.rules.webhook_timeout_s,
                retries=self.rules.webhook_retries,
                backoff_s=webhook_backoff_s,
                on_outcome=lambda o: self.gauges.webhook.labels(o).inc(),
            )
        self.state: dict[str, dict] = {}  # alert -> {"active", "since", "value", "message"}
        for name, key in ALERTS.items():
            if getattr(self.rules, key) is not None:
                self.state[name] = {
                    "active": False,
                    "since": None,
                    "value": None,
                    "message": "not judged yet",
                }
                self.gauges.active.labels(name).set(0)
                self.gauges.raised.labels(name)
        self.latest: dict | None = None
        self._counts: deque = deque()  # (time, {status: n}) of /v1/classify, over the window
        self._drift: dict | None = None
        self._drift_key: tuple | None = None  # (version, reference path) the last drift check was for
        self._drift_at = 0.0
        self._ref_cache: tuple | None = None  # (path, mtime, Reference)
        self._registry: tuple[float, dict | None] = (0.0, None)
        self._reg = None
        self._lock = threading.Lock()  # one tick at a time (the thread and on-demand reads)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None

    # -- lifecycle
    def start(self) -> None:
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._run, name="lmloop-monitor", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self.webhook is not None:
            self.webhook.close()

    def _run(self) -> None:
        while True:
            self.safe_tick()
            if self._stop.wait(self.interval_s):
                return

    def safe_tick(self) -> dict | None:
        try:
            return self.tick()
        except Exception as e:  # never into the server: counted, said once per distinct error
            self.gauges.failures.inc()
            msg = f"{type(e).__name__}: {e}"
            if msg != self._last_error:
                self.say(f"monitor tick failed ({msg}); will retry")
            self._last_error = msg
            return None

    def observe(self, version: str, texts: list[str], labels: list[str]) -> None:
        """Called per answered request (cheap no-op unless texts are kept for drift)."""
        if self.ring is not None:
            self.ring.add(version, texts, labels)

    def snapshot(self, refresh: bool = False) -> dict:
        """The latest snapshot; a fresh one when asked, when there is none, or (no thread) when stale."""
        snap = self.latest
        stale = snap is None or (
            self._thread is None and time.time() - snap["generated_at"] > ON_DEMAND_MAX_AGE_S
        )
        if refresh or stale:
            snap = self.tick()
        return snap

    # -- one tick
    def tick(self, now: float | None = None) -> dict:
        with self._lock:
            now = time.time() if now is None else now
            snap = self._compute(now)
            self._alerts(snap, now)
            self.latest = snap
            self.gauges.last_run.set(now)
            self._last_error = None
            return snap

    def _compute(self, now: float) -> dict:
        from lmloop.mlops.monitor import summarize

        served = self.served()
        since = now - self.window_s
        s = summarize(
            self.store, since=since, window=self.window_s / SERIES_POINTS, model=served.name, now=now
        )
        mine = next((v for v in s.versions if v.version == served.version), None)
        t = mine.total if mine is not None else None
        acc = {
            "accuracy": t.accuracy if t else None,
            "low": t.accuracy_low if t else None,
            "high": t.accuracy_high if t else None,
            "labelled": t.labelled if t else 0,
            "correct": t.correct if t else 0,
            "coverage": t.coverage if t else None,
            "macro_f1": t.macro_f1 if t else None,
        }
        series = []
        if mine is not None:
            for w in mine.windows:
                st = w.stats
                series.append(
                    {
                        "start": w.start,
                        "predictions": st.predictions,
                        "accuracy": st.accuracy,
                        "low": st.accuracy_low,
                        "high": st.accuracy_high,
                        "labelled": st.labelled,
                        "p99_ms": st.latency.p99 if st.latency else None,
                    }
                )
        versions = [
            {
                "version": v.version,
                "predictions": v.total.predictions,
                "requests": v.total.requests,
                "accuracy": v.total.accuracy,
                "low": v.total.accuracy_low,
                "high": v.total.accuracy_high,
                "labelled": v.total.labelled,
                "coverage": v.total.coverage,
                "p99_ms": v.total.latency.p99 if v.total.latency else None,
                "last_at": v.last_at,
            }
            for v in s.versions
        ]
        snap = {
            "generated_at": now,
            "generated": _iso(now),
            "interval_s": self.interval_s,
            "window": self.rules.window,
            "window_s": self.window_s,
            "model": {
                "name": served.name,
                "version": served.version,
                "backend": served.backend,
                "labels": served.labels,
                "registry_version": served.registry_version,
                "directory": served.path.name if getattr(served, "path", None) else None,
            },
            "traffic": {
                "predictions": t.predictions if t else 0,
                "requests": t.requests if t else 0,
                "labels": dict(t.labels) if t else {},
                "score_mean": t.score_mean if t else None,
            },
            "latency_ms": asdict(t.latency) if t and t.latency else None,
            "live_accuracy": acc,
            "series": series,
            "versions": versions,
            "requests": self._rates(now),
            "drift": self._drift_status(served, now, since),
            "registry": self._registry_info(now),
            "thresholds": {k: v for k, v in asdict(self.rules).items() if k != "webhook"},
            "webhook": {
                "configured": self.webhook is not None,
                **(self.webhook.counts if self.webhook else {}),
            },
        }
        return _finite(snap)

    def _rates(self, now: float) -> dict:
        counts: dict[str, float] = {}
        for fam in self.requests.collect():
            for smp in fam.samples:
                if smp.name.endswith("_total") and smp.labels.get("endpoint") == "/v1/classify":
                    counts[smp.labels["status"]] = counts.get(smp.labels["status"], 0) + smp.value
        self._counts.append((now, counts))
        while len(self._counts) > 1 and self._counts[0][0] < now - self.window_s:
            self._counts.popleft()
        # the oldest sample in the window is the baseline (the first tick: everything since start)
        base = self._counts[0][1] if len(self._counts) > 1 else {}
        diff = {k: v - base.get(k, 0) for k, v in counts.items()}
        total = int(sum(diff.values()))
        errors = int(sum(v for k, v in diff.items() if k.startswith("5")))
        refused = int(diff.get("429", 0))
        return {
            "total": total,
            "errors": errors,
            "refused": refused,
            "error_rate": errors / total if total else None,
            "refusal_rate": refused / total if total else None,
        }

    # -- drift
    def _reference(self, served) -> Path | None:
        from lmloop.mlops.drift import REFERENCE_FILE

        d = getattr(served, "path", None)
        if d is None:
            return None
        p = Path(d) / REFERENCE_FILE
        return p if p.is_file() and p.with_suffix(".json").is_file() else None

    def _drift_status(self, served, now: float, since: float) -> dict:
        from lmloop.mlops.drift import REFERENCE_FILE, Reference, detect

        path = self._reference(served)
        if path is None:
            return {
                "status": "no_reference",
                "p_value": None,
                "mmd": None,
                "drifted": None,
                "detail": f"the served model has no {REFERENCE_FILE}: drift is not checked",
            }
        key = (served.version, str(path))
        if self._drift is not None and self._drift_key == key and now - self._drift_at < self.drift_every_s:
            return self._drift
        texts, labels = self._recent_texts(served, since)
        if len(texts) < 20:
            # not cached: the next tick looks again
            return {
                "status": "insufficient",
                "p_value": None,
                "mmd": None,
                "drifted": None,
                "n_current": len(texts),
                "detail": f"{len(texts)} recent texts, need 20",
            }
        try:
            mtime = path.stat().st_mtime
            if self._ref_cache is None or self._ref_cache[:2] != (str(path), mtime):
                self._ref_cache = (str(path), mtime, Reference.load(path))
            alpha = self.rules.max_drift_p or 0.01
            report = detect(self._ref_cache[2], texts, predicted_labels=labels, alpha=alpha)
        except Exception as e:
            out = {
                "status": "error",
                "p_value": None,
                "mmd": None,
                "drifted": None,
                "detail": f"drift check failed: {type(e).__name__}: {e}",
            }
        else:
            ran = [t for t in report.tests if t.p_value is not None and t.threshold > 0]
            # each test's p-value scaled to the family-wise level (alpha / threshold: Bonferroni over the
            # groups times Holm's rank); the smallest is the report's adjusted p, drifted iff <= alpha
            p = min((min(1.0, t.p_value * alpha / t.threshold) for t in ran), default=None)
            mmd = next(
                (t.statistic for t in report.tests if t.name == "embedding.mmd" and t.p_value is not None),
                None,
            )
            out = {
                "status": "drifted" if report.drifted else "ok",
                "drifted": report.drifted,
                "p_value": p,
                "mmd": mmd,
                "alpha": alpha,
                "n_current": report.n_current,
                "n_reference": report.n_reference,
                "tests": [
                    {"name": t.name, "p_value": t.p_value, "threshold": t.threshold, "drifted": t.drifted}
                    for t in report.tests
                ],
                "detail": f"{len(ran)} tests on {report.n_current} recent texts",
            }
        out["checked_at"] = now
        self._drift, self._drift_key, self._drift_at = out, key, now
        return out

    def _recent_texts(self, served, since: float) -> tuple[list[str], list[str]]:
        n = self.rules.drift_texts
        if self.ring is not None:
            texts, labels = self.ring.recent(since, served.version)
            return texts[-n:], labels[-n:]
        rows: deque = deque(maxlen=n)
        for p in self.store.iter_predictions(since=since, model=served.name):
            if p.version == served.version and p.text is not None:
                rows.append((p.text, p.label))
        return [r[0] for r in rows], [r[1] for r in rows]

    # -- registry
    def _registry_info(self, now: float) -> dict | None:
        if self.follower is None:
            return None
        at, info = self._registry
        if info is not None and now - at < REGISTRY_EVERY_S:
            return info
        f = self.follower
        try:
            if self._reg is None:  # its own client: the follower's thread uses that one's
                from lmloop.mlops.registry import Registry

                self._reg = Registry(say=lambda m: None)
            reg = self._reg
            versions = [
                {
                    "version": v.version,
                    "aliases": v.aliases,
                    "created": v.created,
                    "parent": v.parent,
                    "test_accuracy": v.metrics.get("test.accuracy"),
                }
                for v in reg.list(f.name)
            ]
            audit = [
                {
                    "time": a.time,
                    "action": a.action,
                    "alias": a.alias,
                    "from": a.from_version,
                    "to": a.to_version,
                    "actor": a.actor,
                    "reason": a.reason,
                }
                for a in reg.audit(f.name)[-5:]
            ]
            info = {
                "name": f.name,
                "alias": f.alias,
                "uri": f.uri,
                "versions": versions,
                "audit": audit,
                "follow": f.status(),
            }
        except Exception as e:
            info = {"name": f.name, "alias": f.alias, "uri": f.uri, "error": f"{type(e).__name__}: {e}"}
        self._registry = (now, info)
        return info

    # -- alerts
    def _alerts(self, snap: dict, now: float) -> None:
        g = self.gauges
        acc, lat, rates, drift = snap["live_accuracy"], snap["latency_ms"], snap["requests"], snap["drift"]
        g.accuracy.set(_nan(acc["accuracy"]))
        g.accuracy_low.set(_nan(acc["low"]))
        g.accuracy_high.set(_nan(acc["high"]))
        g.labelled.set(acc["labelled"])
        g.coverage.set(_nan(acc["coverage"]))
        g.p99.set(_nan(lat["p99"] / 1000 if lat else None))
        g.error_rate.set(_nan(rates["error_rate"]))
        g.refusal_rate.set(_nan(rates["refusal_rate"]))
        g.drift_p.set(_nan(drift.get("p_value")))
        g.drift_mmd.set(_nan(drift.get("mmd")))
        served = snap["model"]
        for name, (breached, value, thr, message) in judge(self.rules, snap).items():
            st = self.state[name]
            st.update(value=value, message=message, judged=breached is not None, threshold=thr)
            if breached and not st["active"]:
                st.update(active=True, since=now)
                g.active.labels(name).set(1)
                g.raised.labels(name).inc()
                self.say(f"alert raised: {name}: {message} [{served['name']} {served['version']}]")
                self._notify("raised", name, st, served, now)
            elif not breached and st["active"]:
                reason = message if breached is not None else f"not enough data to judge ({message})"
                st.update(active=False, since=now, message=reason)
                g.active.labels(name).set(0)
                self.say(f"alert cleared: {name}: {reason} [{served['name']} {served['version']}]")
                self._notify("cleared", name, st, served, now)
        snap["alerts"] = [
            {
                "name": n,
                "active": st["active"],
                "since": st["since"],
                "value": _finite(st["value"]),
                "threshold": st.get("threshold"),
                "judged": st.get("judged", False),
                "message": st["message"],
            }
            for n, st in self.state.items()
        ]

    def _notify(self, event: str, name: str, st: dict, served: dict, now: float) -> None:
        if self.webhook is None:
            return
        self.webhook.post(
            {
                "event": event,
                "alert": name,
                "active": st["active"],
                "value": _finite(st["value"]),
                "threshold": st["threshold"],
                "message": st["message"],
                "model": served["name"],
                "version": served["version"],
                "time": _iso(now),
            }
        )


def _finite(obj: Any) -> Any:
    # NaN/inf are not JSON
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---------------------------------------------------------------------------------------------- feedback
def recent_feedback(store, limit: int, model: str | None = None) -> list[dict]:
    """The latest ``limit`` feedback records (newest first) with their predictions: ids, labels, score,
    times, and the text only where the log keeps it (the dashboard's table)."""
    return [
        {
            "feedback_id": int(fb.id),
            "prediction_id": fb.prediction_id,
            "label": fb.label,
            "comment": fb.comment,
            "created_at": float(fb.created_at),
            "predicted": p.label,
            "correct": p.label == fb.label,
            "score": float(p.score),
            "text": p.text,
            "model": p.model,
            "version": p.version,
            "predicted_at": float(p.created_at),
        }
        for fb, p in store.recent_feedback(limit, model)
    ]

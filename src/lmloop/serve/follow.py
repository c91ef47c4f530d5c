"""Following a registry alias while serving, and scoring a challenger in the shadow of the champion.

``lmloop serve --model models:/NAME@champion`` keeps serving whatever the alias points at.
:class:`AliasFollower` asks the registry for the alias's version every ``interval_s`` seconds (and on
``POST /v1/admin/reload``); when it has moved, the new version is downloaded, loaded with the same backend
rules as at startup, warmed (a few batches of its own validation texts), checked (same label set as the
model it replaces) and only then handed to ``install``, which the server points at
:meth:`MicroBatcher.swap`: the inference thread picks the new model up at its next batch boundary, and a
batch in flight finishes on the old one. Requests therefore never wait for a load and never fail because
of one. A version that fails to load is retried later with back-off; one whose labels differ is refused
until the alias moves again. Nothing here ever raises into the server: every outcome is logged, counted
and remembered for ``/v1/models``.

:class:`Shadow` runs a second model (``--shadow models:/NAME@challenger``) over the texts the champion
answered, after the answer has gone out, on its own low-priority thread fed by a bounded queue (full ->
the texts are dropped and counted, never waited for). It records agreement with the champion and its own
confidence in metrics. Cost: a second forward pass per text, on the same cores; with spare CPU it is
invisible to latency, near saturation it takes CPU the champion's batches would have used (that is when
the queue fills and shadow scoring sheds load).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

WARM_TEXTS = ["warm-up", "a short text", "a somewhat longer text to warm up the longer shapes as well"]


@dataclass(frozen=True)
class Served:
    """One loaded model as the server reports it: what answers, and under which name and version."""

    predictor: Any  # lmloop.infer.Predictor (or anything with predict_proba, labels, backend_name)
    name: str  # reported in responses and the prediction log
    version: str  # ditto: "v3" for a registry version, else the weights' sha256 (or --model-version)
    registry_version: int | None = None
    path: Path | None = None  # its directory (drift_reference.npz lives there), when known

    @property
    def labels(self) -> list[str]:
        return list(self.predictor.labels)

    @property
    def backend(self) -> str:
        return self.predictor.backend_name


def warm(predictor, model_dir: str | Path | None = None, batches: int = 3) -> None:
    """A few batches through ``predictor`` before it takes traffic: first-call allocations, ORT's first
    runs and the usual shapes are paid here, not by the first requests after a swap. Uses the model's
    own validation texts (``validation.jsonl``) when it has them."""
    from lmloop.infer.backends import read_validation

    texts = list(WARM_TEXTS)
    if model_dir is not None:
        with contextlib.suppress(Exception):
            val = read_validation(model_dir)
            if val and val[0]:
                texts = val[0]
    size = max(1, getattr(predictor, "batch_size", 32))
    for i in range(batches):
        chunk = texts[i * size : (i + 1) * size] or texts[:size]
        predictor.predict_proba(chunk)


@dataclass
class _Failure:
    attempts: int
    next_try: float  # time.monotonic()
    error: str


@dataclass
class AliasFollower:
    """Keeps ``install`` fed with the version ``models:/NAME@ALIAS`` points at (module docstring).

    ``load(path, version) -> Served`` builds and warms a version; ``accept(served) -> reason | None``
    may refuse it; ``install(served)`` makes it live; ``on_event(kind, detail)`` sees every outcome
    (kinds: swapped, refused, load_failed, registry_failed) for metrics.
    """

    name: str
    alias: str
    version: int  # the version being served now
    load: Callable[[Path, int], Served]
    install: Callable[[Served], None] | None = None  # wired by create_app (the batcher's swap)
    accept: Callable[[Served], str | None] = lambda served: None
    on_event: Callable[[str, str], None] = lambda kind, detail: None
    interval_s: float = 10.0
    max_backoff_s: float = 300.0
    say: Callable[[str], None] = lambda m: print(f"[lmloop serve] {m}", file=sys.stderr, flush=True)
    refused: dict[int, str] = field(default_factory=dict)  # version -> why (until the alias moves on)
    failures: dict[int, _Failure] = field(default_factory=dict)
    last_check: float | None = None  # unix seconds
    last_error: str | None = None
    swaps: int = 0

    def __post_init__(self):
        self._lock = threading.Lock()  # one check at a time: the poller and /v1/admin/reload
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registry = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"

    def start(self) -> None:
        """Poll on a daemon thread every ``interval_s`` (call :meth:`check` directly to poll once)."""
        self._thread = threading.Thread(target=self._run, name="lmloop-follow", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as e:  # pragma: no cover - check() catches everything; belt and braces
                self.say(f"following {self.uri}: unexpected {type(e).__name__}: {e}")

    def status(self) -> dict:
        return {
            "uri": self.uri,
            "version": self.version,
            "following": self._thread is not None,
            "interval_s": self.interval_s,
            "last_check": self.last_check,
            "last_error": self.last_error,
            "swaps": self.swaps,
            "refused": {f"v{v}": why for v, why in self.refused.items()},
        }

    def check(self, force: bool = False) -> dict:
        """Look at the alias now; load, warm, check and install a new version. Never raises.

        Returns what happened: ``{"status": "current" | "swapped" | "refused" | "load_failed" |
        "retry_later" | "registry_failed", "version": N, ...}``. ``force`` retries a failed version
        before its back-off has passed (an operator's reload)."""
        with self._lock:
            self.last_check = time.time()
            try:
                target = self._reg().show(self.name, self.alias).version
            except Exception as e:
                msg = f"registry: {type(e).__name__}: {e}"
                if msg != self.last_error:  # once per distinct error, not every poll
                    self.say(f"cannot read {self.uri} ({msg}); still serving v{self.version}, will retry")
                self.last_error = msg
                self.on_event("registry_failed", msg)
                return {"status": "registry_failed", "version": self.version, "error": msg}
            if target == self.version:
                self.last_error = None
                return {"status": "current", "version": target}
            if target in self.refused:
                return {
                    "status": "refused",
                    "version": self.version,
                    "target": target,
                    "reason": self.refused[target],
                }
            fail = self.failures.get(target)
            if fail is not None and not force and time.monotonic() < fail.next_try:
                left = fail.next_try - time.monotonic()
                return {
                    "status": "retry_later",
                    "version": self.version,
                    "target": target,
                    "error": fail.error,
                    "retry_in_s": round(left, 1),
                }
            self.say(f"{self.uri} moved v{self.version} -> v{target}: loading v{target}")
            t0 = time.perf_counter()
            try:
                # pin the number: the alias may move again while this one downloads
                path = self._reg().resolve(f"models:/{self.name}/{target}")
                served = self.load(path, target)
            except Exception as e:
                msg = f"{type(e).__name__}: {e}"
                n = (fail.attempts if fail else 0) + 1
                backoff = min(self.max_backoff_s, self.interval_s * 2**n)
                self.failures[target] = _Failure(n, time.monotonic() + backoff, msg)
                self.last_error = f"loading v{target}: {msg}"
                self.say(
                    f"loading v{target} failed ({msg}); still serving v{self.version}, "
                    f"retrying in {backoff:.0f} s (attempt {n})"
                )
                self.on_event("load_failed", msg)
                return {"status": "load_failed", "version": self.version, "target": target, "error": msg}
            reason = self.accept(served)
            if reason:
                self.refused[target] = reason
                self.failures.pop(target, None)
                self.last_error = f"refused v{target}: {reason}"
                self.say(f"refusing to swap to v{target}: {reason}; still serving v{self.version}")
                self.on_event("refused", reason)
                return {"status": "refused", "version": self.version, "target": target, "reason": reason}
            old = self.version
            self.install(served)
            self.version, self.last_error = target, None
            self.swaps += 1
            self.failures.pop(target, None)
            self.refused.clear()  # the alias moved on: a refused version may come back after a fix
            secs = time.perf_counter() - t0
            self.say(f"swapped v{old} -> v{target} (loaded and warmed in {secs:.1f} s)")
            self.on_event("swapped", f"v{old} -> v{target}")
            return {"status": "swapped", "version": target, "from": old, "load_seconds": round(secs, 3)}

    def _reg(self):
        if self._registry is None:
            from lmloop.mlops.registry import Registry

            self._registry = Registry(say=lambda m: None)
        return self._registry


class Shadow:
    """Scores the champion's texts with a challenger off the request path (see the module docstring).

    ``offer(texts, labels)`` never blocks: beyond ``max_texts`` waiting, the texts are dropped (counted).
    ``on_scored(agree (N,) bool, confidence (N,) float)`` and ``on_dropped(n)`` feed metrics.
    """

    def __init__(
        self,
        served: Served,
        *,
        max_texts: int = 2048,
        batch: int = 64,
        nice: int = 10,
        on_scored: Callable[[np.ndarray, np.ndarray], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
        say: Callable[[str], None] | None = None,
    ):
        self.served, self.max_texts, self.batch, self.nice = served, max_texts, batch, nice
        self.on_scored, self.on_dropped = on_scored, on_dropped
        self.say = say or (lambda m: print(f"[lmloop serve] {m}", file=sys.stderr, flush=True))
        self._q: deque[tuple[list[str], list[str]]] = deque()
        self._waiting = 0
        self._cv = threading.Condition()
        self._closing = False
        self.scored = self.agreed = self.dropped = self.failures = 0
        self.confidence_sum = 0.0
        self._thread = threading.Thread(target=self._run, name="lmloop-shadow", daemon=True)
        self._thread.start()

    def swap(self, served: Served) -> None:
        self.served = served  # read once per batch by the shadow thread

    def offer(self, texts: list[str], labels: list[str]) -> None:
        """The champion answered ``labels`` for ``texts``: score them later, or drop them if behind."""
        with self._cv:
            if self._closing or self._waiting + len(texts) > self.max_texts:
                self.dropped += len(texts)
                if self.on_dropped:
                    self.on_dropped(len(texts))
                return
            self._q.append((texts, labels))
            self._waiting += len(texts)
            self._cv.notify()

    def summary(self) -> dict:
        n = self.scored
        return {
            "id": self.served.name,
            "version": self.served.version,
            "backend": self.served.backend,
            "scored": n,
            "agreement": self.agreed / n if n else None,
            "mean_confidence": self.confidence_sum / n if n else None,
            "dropped": self.dropped,
            "failures": self.failures,
        }

    def _run(self) -> None:
        # a lower priority for this thread only (Linux: setpriority on a thread id is per thread), so the
        # champion's inference thread wins the CPU whenever both want it
        with contextlib.suppress(Exception):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        while True:
            with self._cv:
                while not self._q and not self._closing:
                    self._cv.wait()
                if not self._q:
                    return
                texts, champ = [], []
                while self._q and (not texts or len(texts) + len(self._q[0][0]) <= self.batch):
                    t, lab = self._q.popleft()
                    self._waiting -= len(t)
                    texts.extend(t)
                    champ.extend(lab)
            served = self.served
            try:
                probs = served.predictor.predict_proba(texts)  # (N, C)
            except Exception as e:
                self.failures += 1
                self.say(f"shadow {served.name} {served.version} failed on a batch: {type(e).__name__}: {e}")
                continue
            labels = served.labels
            picked = probs.argmax(axis=1)
            agree = np.array([labels[k] == c for k, c in zip(picked, champ, strict=True)], dtype=bool)
            conf = probs.max(axis=1)
            self.scored += len(texts)
            self.agreed += int(agree.sum())
            self.confidence_sum += float(conf.sum())
            if self.on_scored:
                self.on_scored(agree, conf)

    def close(self, timeout: float = 10.0) -> None:
        """Score what is queued (up to ``timeout``), then stop."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout)

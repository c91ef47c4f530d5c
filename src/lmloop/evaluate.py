"""Evaluation: classification metrics, calibration, JSON and HTML reports.

The functions here work on plain arrays (true class indices and softmax probabilities), so they can be
tested without a model. The model-driven part (load a checkpoint, run it over data, call these) lives at
the end of the module and is wired by the CLI. matplotlib is imported only when a report is written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from lmloop.errors import DataError
from lmloop.fsutil import atomic_write_text

__all__ = [
    "EvaluationInputError",
    "compute_metrics",
    "evaluate_split",
    "label_ids",
    "expected_calibration_error",
    "reliability_bins",
    "write_metrics_json",
    "write_report",
]

# Rows of `probs` must sum to 1 within this; loose enough for fp16 softmax, tight enough to catch logits.
_PROB_SUM_ATOL = 1e-2
# Probabilities are clipped here before the log so a confident miss gives a large, finite NLL.
_NLL_EPS = 1e-12


class EvaluationInputError(DataError, ValueError):
    """Arrays given to the metric functions are unusable (empty, wrong shape, not probabilities).

    A ValueError for library callers and a DataError so the CLI prints it without a traceback.
    """


# --- input checks ---


def _check_inputs(
    y_true: Any, probs: Any, labels: Sequence[str], domains: Sequence[Any] | None
) -> tuple[np.ndarray, np.ndarray, list[str], list[str] | None]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    names = [str(label) for label in labels]
    if y.ndim != 1:
        raise EvaluationInputError(f"y_true must be 1-D (N,), got shape {y.shape}", field="y_true")
    n = y.shape[0]
    if n == 0:
        raise EvaluationInputError("no examples to evaluate (N=0); check the evaluation split is not empty")
    if len(names) == 0:
        raise EvaluationInputError("labels is empty; need one name per class", field="labels")
    if len(set(names)) != len(names):
        dupes = sorted({x for x in names if names.count(x) > 1})
        raise EvaluationInputError(f"label names must be unique, repeated: {dupes}", field="labels")
    c = len(names)
    if p.shape != (n, c):
        raise EvaluationInputError(
            f"probs must have shape (N, C) = ({n}, {c}) to match y_true and labels, got {p.shape}",
            field="probs",
        )
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise EvaluationInputError("y_true must hold integer class indices", field="y_true")
    elif y.dtype.kind not in "iub":
        raise EvaluationInputError(
            f"y_true must hold integer class indices, got dtype {y.dtype}", field="y_true"
        )
    y = y.astype(np.int64)
    bad = np.flatnonzero((y < 0) | (y >= c))
    if bad.size:
        i = int(bad[0])
        raise EvaluationInputError(
            f"y_true[{i}] = {int(y[i])} is not a class index in [0, {c}) ({bad.size} bad value(s))",
            field="y_true",
        )
    if not np.all(np.isfinite(p)):
        raise EvaluationInputError("probs contains NaN or inf", field="probs")
    sums = p.sum(axis=1)
    off = np.flatnonzero((p.min(axis=1) < 0) | (np.abs(sums - 1.0) > _PROB_SUM_ATOL))
    if off.size:
        i = int(off[0])
        raise EvaluationInputError(
            f"probs row {i} is not a probability distribution (sum={sums[i]:.4g}, min={p[i].min():.4g}); "
            "pass softmax probabilities, not logits",
            field="probs",
        )
    doms: list[str] | None = None
    if domains is not None:
        doms = [str(d) for d in domains]
        if len(doms) != n:
            raise EvaluationInputError(f"domains has {len(doms)} entries, expected N={n}", field="domains")
    return y, p, names, doms


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise EvaluationInputError(f"n_bins must be a positive integer, got {n_bins!r}", field="n_bins")
    return int(n_bins)


# --- calibration ---


def reliability_bins(confidence: Any, correct: Any, n_bins: int = 15) -> dict[str, list]:
    """Group predictions into equal-width confidence bins for a reliability diagram.

    ``confidence`` is the predicted probability of the predicted class (N,) and ``correct`` whether that
    prediction was right (N,). The interval [0, 1] is split into ``n_bins`` equal bins, each open on the
    left and closed on the right, (lo, hi], as in Guo et al. 2017. Returns ``bin_edges`` (n_bins + 1),
    and per bin the mean ``confidence``, the ``accuracy`` (fraction correct) and the ``count``; the mean
    values are ``None`` for empty bins so the result stays valid JSON.
    """
    n_bins = _check_n_bins(n_bins)
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    hit = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.shape != hit.shape:
        raise EvaluationInputError(f"confidence {conf.shape} and correct {hit.shape} differ in length")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side="left") on the inner edges puts a value equal to an edge in the bin it closes.
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(idx, weights=hit, minlength=n_bins)
    mean_conf: list[float | None] = []
    mean_acc: list[float | None] = []
    for k in range(n_bins):
        if count[k]:
            mean_conf.append(float(conf_sum[k] / count[k]))
            mean_acc.append(float(hit_sum[k] / count[k]))
        else:
            mean_conf.append(None)
            mean_acc.append(None)
    return {
        "bin_edges": [float(e) for e in edges],
        "confidence": mean_conf,
        "accuracy": mean_acc,
        "count": [int(x) for x in count],
    }


def _ece_from_bins(bins: Mapping[str, list]) -> float:
    total = sum(bins["count"])
    if total == 0:
        return 0.0
    gap = 0.0
    for cnt, conf, acc in zip(bins["count"], bins["confidence"], bins["accuracy"], strict=True):
        if cnt:
            gap += cnt * abs(acc - conf)
    return float(gap / total)


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 15) -> float:
    """Expected calibration error (ECE) of softmax probabilities, Guo et al. 2017.

    Each prediction's confidence is its maximum probability. Confidences are split into ``n_bins``
    equal-width bins over [0, 1] (see :func:`reliability_bins`) and ECE = sum_b (|B_b| / N) *
    |acc(B_b) - conf(B_b)|, the gap between accuracy and mean confidence in each bin, weighted by the
    share of predictions in it. 0 is perfectly calibrated; the worst case approaches 1.
    """
    shape = np.shape(probs)
    c = shape[1] if len(shape) == 2 else 1  # a wrong shape is reported by _check_inputs
    y, p, _, _ = _check_inputs(y_true, probs, [str(i) for i in range(c)], None)
    pred = p.argmax(axis=1)
    return _ece_from_bins(reliability_bins(p.max(axis=1), pred == y, n_bins))


# --- metrics ---


def _macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    # sklearn's default label set (classes present in y_true or y_pred), so a class that never occurs
    # in a split neither drags the mean down nor triggers undefined-metric warnings.
    return float(f1_score(y, pred, average="macro", zero_division=0))


def compute_metrics(
    y_true: Any,
    probs: Any,
    labels: Sequence[str],
    domains: Sequence[Any] | None = None,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Classification and calibration metrics for N predictions over C classes, as a JSON-ready dict.

    ``y_true`` holds class indices (N,), ``probs`` softmax probabilities (N, C) whose columns follow
    ``labels``, and ``domains`` an optional domain name per example. The prediction is the argmax.
    Returns ``n``, ``accuracy``, ``macro_f1`` (unweighted mean F1 over the classes present in y_true or
    the predictions), ``ece`` (see :func:`expected_calibration_error`), ``nll`` (mean negative log
    probability of the true class, probabilities clipped at 1e-12), ``brier`` (multi-class Brier score:
    mean over examples of the squared distance between probs and the one-hot truth, range [0, 2]),
    ``per_class`` (precision, recall, f1 and support for every label, 0 where undefined),
    ``confusion_matrix`` (rows = true, columns = predicted, in ``labels`` order), ``reliability``
    (the ECE bins) and, when ``domains`` is given, ``per_domain`` with n, accuracy, macro_f1 and ece for
    each domain. Raises :class:`EvaluationInputError` (a ValueError) for N=0 or malformed inputs.
    """
    n_bins = _check_n_bins(n_bins)
    y, p, names, doms = _check_inputs(y_true, probs, labels, domains)
    n, c = p.shape
    class_ids = list(range(c))
    pred = p.argmax(axis=1)
    conf = p.max(axis=1)
    correct = pred == y

    bins = reliability_bins(conf, correct, n_bins)
    prec, rec, f1, support = precision_recall_fscore_support(
        y, pred, labels=class_ids, average=None, zero_division=0
    )
    cm = confusion_matrix(y, pred, labels=class_ids)
    p_true = np.clip(p[np.arange(n), y], _NLL_EPS, 1.0)
    onehot = np.zeros_like(p)
    onehot[np.arange(n), y] = 1.0

    out: dict[str, Any] = {
        "n": int(n),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": _macro_f1(y, pred),
        "ece": _ece_from_bins(bins),
        "nll": float(-np.log(p_true).mean()),
        "brier": float(((p - onehot) ** 2).sum(axis=1).mean()),
        "per_class": {
            name: {
                "precision": float(prec[k]),
                "recall": float(rec[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
            }
            for k, name in enumerate(names)
        },
        "confusion_matrix": {"labels": names, "matrix": cm.astype(int).tolist()},
        "reliability": bins,
    }
    if doms is not None:
        dom_arr = np.asarray(doms, dtype=object)
        per_domain: dict[str, dict[str, Any]] = {}
        for dom in sorted(set(doms)):
            mask = dom_arr == dom
            per_domain[dom] = {
                "n": int(mask.sum()),
                "accuracy": float(correct[mask].mean()),
                "macro_f1": _macro_f1(y[mask], pred[mask]),
                "ece": _ece_from_bins(reliability_bins(conf[mask], correct[mask], n_bins)),
            }
        out["per_domain"] = per_domain
    return out


# --- writing results ---


def write_report(
    metrics: Mapping[str, Any],
    out_path: str | os.PathLike[str],
    *,
    title: str,
    model: str | None = None,
    data: Mapping[str, Any] | None = None,
    history: Sequence[Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a self-contained HTML report of ``metrics`` (from :func:`compute_metrics`) and return its path.

    One file with no external scripts, styles or network fetches: a header (``title``, ``model``, the
    ``data`` dict such as source and fingerprints, the UTC date), summary and per-class tables, plots
    embedded as base64 PNG (confusion matrix with counts and row-normalised %, reliability diagram with a
    bin-count histogram, per-domain accuracy when present, and training curves when ``history`` - a
    trainer log of ``{"step", "loss"}`` and ``{"step", "eval_accuracy", "eval_loss"}`` entries - is
    given) and a "Run details" table of ``extra``. All user strings are HTML-escaped; the file is
    written atomically. matplotlib is imported here, not when this module is imported.
    """
    from lmloop.report import render_report_html

    html = render_report_html(metrics, title=title, model=model, data=data, history=history, extra=extra)
    return atomic_write_text(out_path, html)


def _jsonable(obj: Any) -> Any:
    # NaN/inf are not JSON; a diverged run's NaN loss becomes null instead of losing the whole file.
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [_jsonable(v) for v in items]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r:.80}")


def write_metrics_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as JSON (sorted keys, indent 2) to ``path`` atomically and return the path.

    The text goes to a temporary file in the same directory, is fsynced and then renamed over ``path``,
    so a reader never sees a half-written file and a crash leaves the previous version intact. numpy
    scalars and arrays, paths and sets are converted; NaN and inf become ``null``. Parent directories
    are created. Raises TypeError for values with no JSON form, leaving no temporary file behind.
    """
    text = json.dumps(_jsonable(obj), sort_keys=True, indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


# --- model-driven evaluation ---------------------------------------------------------------------------


def label_ids(frame: Any, labels: Sequence[str]) -> np.ndarray:
    """Class indices (N,) of a prepared split's ``label`` column, in the order of ``labels``."""
    index = {lab: i for i, lab in enumerate(labels)}
    return np.array([index[x] for x in frame["label"]], dtype=np.int64)


def evaluate_split(predictor: Any, frame: Any, labels: Sequence[str]) -> dict:
    """Metrics of a predictor (``predict_proba(texts) -> (N, C)``) on a prepared split, per domain when it has one.

    A predictor with a temperature other than 1 (:mod:`lmloop.calibration`) is scored on its calibrated
    probabilities, and ``temperature`` plus ``uncalibrated`` (ece, nll, brier and reliability bins of the
    raw softmax) are added: the same logits, run once, seen both ways.
    """
    domains = list(frame["domain"]) if "domain" in frame.columns else None
    y = label_ids(frame, labels)
    t = float(getattr(predictor, "temperature", 1.0) or 1.0)
    if t == 1.0 or not hasattr(predictor, "predict_logits") or len(frame) == 0:
        probs = predictor.predict_proba(list(frame["text"]))
        return compute_metrics(y, probs, list(labels), domains=domains)
    from lmloop.calibration import scaled_softmax

    logits = predictor.predict_logits(predictor.encode(list(frame["text"])))  # (N, C)
    out = compute_metrics(y, scaled_softmax(logits, t), list(labels), domains=domains)
    raw = compute_metrics(y, scaled_softmax(logits), list(labels))
    out["temperature"] = t
    out["uncalibrated"] = {k: raw[k] for k in ("ece", "nll", "brier", "reliability")}
    return out

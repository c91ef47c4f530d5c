"""Tests for lmloop.evaluate: known-answer metrics, calibration, HTML report and atomic writes."""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from lmloop.evaluate import (
    EvaluationInputError,
    compute_metrics,
    expected_calibration_error,
    reliability_bins,
    write_metrics_json,
    write_report,
)

LABELS = ["neg", "neu", "pos"]


def _peaked(pred, n_classes: int, top: float = 0.8) -> np.ndarray:
    """Probabilities with `top` on the predicted class and the rest spread evenly."""
    pred = np.asarray(pred)
    p = np.full((len(pred), n_classes), (1.0 - top) / (n_classes - 1))
    p[np.arange(len(pred)), pred] = top
    return p


def _small_case() -> tuple[np.ndarray, np.ndarray]:
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    return y, _peaked(pred, 3)


# --- known answers ---


def test_known_answer_accuracy_f1_confusion() -> None:
    y, probs = _small_case()
    m = compute_metrics(y, probs, LABELS)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1 per class: neg p=1/2 r=1/2 -> 0.5; neu p=2/3 r=1 -> 0.8; pos p=1 r=1/2 -> 2/3.
    assert m["per_class"]["neg"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["neu"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )
    assert m["per_class"]["pos"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    )
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["confusion_matrix"] == {"labels": LABELS, "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 1]]}


def test_known_answer_nll_brier_ece() -> None:
    y, probs = _small_case()
    m = compute_metrics(y, probs, LABELS)
    # 4 hits with p(true)=0.8, 2 misses with p(true)=0.1.
    assert m["nll"] == pytest.approx((4 * -math.log(0.8) + 2 * -math.log(0.1)) / 6)
    # hit: 0.2^2 + 2 * 0.1^2 = 0.06; miss: 0.8^2 + 0.9^2 + 0.1^2 = 1.46.
    assert m["brier"] == pytest.approx((4 * 0.06 + 2 * 1.46) / 6)
    # every confidence is 0.8 and accuracy is 2/3.
    assert m["ece"] == pytest.approx(abs(0.8 - 4 / 6))


def test_ece_constant_confidence_0_9_with_60_percent_accuracy() -> None:
    y = np.array([0] * 10)
    pred = np.array([0] * 6 + [1] * 4)
    probs = _peaked(pred, 2, top=0.9)
    assert expected_calibration_error(y, probs, n_bins=10) == pytest.approx(0.3)
    assert compute_metrics(y, probs, ["a", "b"], n_bins=10)["ece"] == pytest.approx(0.3)


def test_ece_two_bins_weighted_by_count() -> None:
    # 10 at conf 0.9 with 6 right (gap 0.3) and 5 at conf 0.6 all right (gap 0.4): (10*0.3 + 5*0.4) / 15.
    y = np.array([0] * 15)
    probs = np.vstack([_peaked([0] * 6 + [1] * 4, 2, top=0.9), _peaked([0] * 5, 2, top=0.6)])
    m = compute_metrics(y, probs, ["a", "b"], n_bins=10)
    assert m["ece"] == pytest.approx(5 / 15)
    rel = m["reliability"]
    assert len(rel["bin_edges"]) == 11 and rel["bin_edges"][0] == 0.0 and rel["bin_edges"][-1] == 1.0
    assert sum(rel["count"]) == 15
    assert rel["count"][5] == 5 and rel["count"][8] == 10  # 0.6 in (0.5, 0.6], 0.9 in (0.8, 0.9]
    assert rel["accuracy"][8] == pytest.approx(0.6) and rel["confidence"][8] == pytest.approx(0.9)
    assert rel["accuracy"][0] is None and rel["confidence"][0] is None and rel["count"][0] == 0


def test_reliability_bins_right_closed_edges() -> None:
    bins = reliability_bins([0.2, 0.2000001, 1.0, 0.5], [1, 0, 1, 1], n_bins=5)
    assert bins["count"] == [1, 1, 1, 0, 1]  # 0.2 closes bin 0, 1.0 lands in the last bin


def test_calibrated_synthetic_data_has_small_ece() -> None:
    rng = np.random.default_rng(0)
    n, c = 40_000, 4
    probs = rng.dirichlet(np.full(c, 0.7), size=n)
    # Draw each label from its own predicted distribution: calibrated by construction.
    y = (rng.random(n)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)
    assert expected_calibration_error(y, probs) < 0.01
    # The same labels against sharpened probabilities are clearly overconfident.
    sharp = probs**4 / (probs**4).sum(axis=1, keepdims=True)
    assert expected_calibration_error(y, sharp) > 0.1


def test_per_domain_split() -> None:
    y, probs = _small_case()
    domains = ["news", "news", "web", "web", "web", "news"]
    m = compute_metrics(y, probs, LABELS, domains=domains)
    assert list(m["per_domain"]) == ["news", "web"]
    news, web = m["per_domain"]["news"], m["per_domain"]["web"]
    assert news["n"] == 3 and news["accuracy"] == pytest.approx(1 / 3)  # hits: idx 0 only
    assert web["n"] == 3 and web["accuracy"] == pytest.approx(1.0)
    assert web["macro_f1"] == pytest.approx(1.0)
    assert news["ece"] == pytest.approx(0.8 - 1 / 3) and web["ece"] == pytest.approx(0.2)
    assert "per_domain" not in compute_metrics(y, probs, LABELS)


def test_absent_class_no_crash_no_warnings() -> None:
    y = np.array([0, 0, 1, 1])
    probs = _peaked([0, 1, 1, 2], 4)  # class 2 predicted but never true, class 3 neither
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(y, probs, ["a", "b", "c", "d"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["d"]["support"] == 0
    assert np.array(m["confusion_matrix"]["matrix"]).shape == (4, 4)
    # macro over classes seen in y_true or predictions (a, b, c): a p=1 r=1/2, b p=1/2 r=1/2, c = 0.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    json.dumps(m, allow_nan=False)


def test_metrics_are_json_serialisable() -> None:
    y, probs = _small_case()
    m = compute_metrics(y.tolist(), probs.astype(np.float32).tolist(), LABELS, domains=["a"] * 6)
    assert json.loads(json.dumps(m, allow_nan=False)) == m


# --- bad input ---


def test_empty_input_raises_value_error() -> None:
    with pytest.raises(ValueError, match="N=0"):
        compute_metrics(np.array([], dtype=int), np.zeros((0, 3)), LABELS)


@pytest.mark.parametrize(
    ("y", "probs", "labels", "match"),
    [
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], LABELS, "shape"),
        ([0, 3], _peaked([0, 1], 3).tolist(), LABELS, r"y_true\[1\] = 3"),
        ([0, 1], [[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]], LABELS, "logits"),
        ([0.5, 1], _peaked([0, 1], 3).tolist(), LABELS, "integer"),
        ([0, 1], _peaked([0, 1], 3).tolist(), ["a", "a", "b"], "unique"),
    ],
)
def test_malformed_input_raises(y, probs, labels, match) -> None:
    with pytest.raises(EvaluationInputError, match=match):
        compute_metrics(y, probs, labels)


def test_domains_length_mismatch_raises() -> None:
    y, probs = _small_case()
    with pytest.raises(ValueError, match="domains"):
        compute_metrics(y, probs, LABELS, domains=["a"] * 5)


# --- report ---


class _StrictHTML(HTMLParser):
    """Collects tags and fails on unbalanced non-void elements."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}>, open: {self.stack[-3:]}")
        else:
            self.stack.pop()


def _parse(html: str) -> _StrictHTML:
    parser = _StrictHTML()
    parser.feed(html)
    parser.close()
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    return parser


HISTORY = [
    {"step": 10, "epoch": 0.5, "loss": 1.1},
    {"step": 20, "epoch": 1.0, "loss": 0.7},
    {"step": 20, "epoch": 1.0, "eval_accuracy": 0.6, "eval_loss": 0.9},
    {"step": 30, "epoch": 1.5, "loss": float("nan")},  # skipped, must not break the plot
    {"step": 40, "epoch": 2.0, "loss": 0.4},
    {"step": 40, "epoch": 2.0, "eval_accuracy": 0.7, "eval_loss": 0.8},
    {"train_runtime": 12.3, "train_loss": 0.7},  # trainer summary entry without a step
]


def test_report_full(tmp_path: Path) -> None:
    y, probs = _small_case()
    labels = ["<script>alert(1)</script>", "a&b", "cost $5"]
    m = compute_metrics(y, probs, labels, domains=["news", "news", "web", "web", "web", "<b>x</b>"])
    out = write_report(
        m,
        tmp_path / "sub" / "report.html",
        title="Eval <v1> & co",
        model='org/model-"quoted"',
        data={"source": "train.jsonl", "sha256": "ab" * 32},
        history=HISTORY,
        extra={"seed": 13, "lr": 2e-5, "tags": ["x", "y"]},
    )
    html = out.read_text(encoding="utf-8")
    assert out == tmp_path / "sub" / "report.html"
    assert html.startswith("<!DOCTYPE html>")
    parsed = _parse(html)
    ids = {attrs.get("id") for tag, attrs in parsed.tags if tag == "section"}
    assert ids == {
        "summary",
        "per-class",
        "confusion-matrix",
        "reliability",
        "per-domain",
        "training",
        "run-details",
    }
    imgs = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert html.count("<img") == len(imgs) == 4
    for attrs in imgs:
        src = attrs["src"]
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    # self-contained: no scripts, external links or fetched resources
    assert not any(tag in ("script", "link", "iframe") for tag, _ in parsed.tags)
    assert "http://" not in html and "https://" not in html
    # user strings are escaped
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert "Eval &lt;v1&gt; &amp; co" in html and "a&amp;b" in html
    assert "org/model-&#34;quoted&#34;" in html
    for text in ("train.jsonl", "ab" * 32, "seed", "2e-05", "[&#34;x&#34;, &#34;y&#34;]", "Run details"):
        assert text in html, text
    assert f"{m['accuracy']:.4f}" in html and f"{m['ece']:.4f}" in html and f"{m['nll']:.4f}" in html


def test_report_minimal_has_two_plots(tmp_path: Path) -> None:
    y, probs = _small_case()
    out = write_report(compute_metrics(y, probs, LABELS), tmp_path / "r.html", title="t")
    html = out.read_text(encoding="utf-8")
    parsed = _parse(html)
    assert html.count("<img") == 2
    ids = {attrs.get("id") for tag, attrs in parsed.tags if tag == "section"}
    assert ids == {"summary", "per-class", "confusion-matrix", "reliability"}
    assert os.listdir(tmp_path) == ["r.html"]


def test_report_history_without_usable_points_skips_plot(tmp_path: Path) -> None:
    y, probs = _small_case()
    out = write_report(
        compute_metrics(y, probs, LABELS), tmp_path / "r.html", title="t", history=[{"train_runtime": 1.0}]
    )
    assert out.read_text(encoding="utf-8").count("<img") == 2


def test_import_does_not_load_matplotlib() -> None:
    code = "import sys, lmloop.evaluate; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- atomic JSON ---


def test_write_metrics_json_sorted_indented_and_clean(tmp_path: Path) -> None:
    path = tmp_path / "m" / "metrics.json"
    obj = {"b": np.float32(0.5), "a": {"z": np.int64(3), "y": np.array([1, 2])}, "nan": float("nan")}
    assert write_metrics_json(obj, path) == path
    text = path.read_text(encoding="utf-8")
    assert (
        text
        == json.dumps({"a": {"y": [1, 2], "z": 3}, "b": 0.5, "nan": None}, sort_keys=True, indent=2) + "\n"
    )
    assert os.listdir(path.parent) == ["metrics.json"]
    assert (path.stat().st_mode & 0o777) == 0o644


def test_write_metrics_json_failure_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_metrics_json({"v": 1}, path)
    with pytest.raises(TypeError):
        write_metrics_json({"v": object()}, path)
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_atomic_write_interrupted_mid_write_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "metrics.json"
    write_metrics_json({"v": 1}, path)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_metrics_json({"v": 2}, path)
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]

"""Self-contained HTML evaluation report: tables plus matplotlib plots embedded as base64 PNG.

Used by :func:`lmloop.evaluate.write_report`, which handles the atomic write. matplotlib and jinja2 are
imported inside the functions so importing lmloop stays fast. Figures are drawn on an explicit Agg
canvas instead of through pyplot, so nothing touches the process-wide backend or pyplot's figure list.
"""

from __future__ import annotations

import base64
import io
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

__all__ = ["render_report_html"]

# Cells are annotated only up to this many classes; beyond it the text would overlap.
_MAX_ANNOTATED_CLASSES = 25
# Tick labels longer than this are cut so one long label does not squash the plot.
_MAX_TICK_CHARS = 28

# The <head> every lmloop HTML report shares (evaluation, monitoring, ...): one look, one place to change it.
HTML_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="lmloop {{ version }}">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2rem; }
.meta { color: #57606a; margin: .2rem 0; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .92rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: .85rem; word-break: break-all; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0; }
.note { color: #57606a; font-size: .88rem; }
</style>
</head>
"""

_TEMPLATE = (
    HTML_HEAD
    + """<body>
<header>
<h1>{{ title }}</h1>
{% if model %}<p class="meta">Model: <code>{{ model }}</code></p>{% endif %}
<p class="meta">Generated: {{ date }}</p>
{% if data %}
<table id="data">
<tr><th colspan="2">Data</th></tr>
{% for key, value in data %}<tr><th>{{ key }}</th><td><code>{{ value }}</code></td></tr>
{% endfor %}</table>
{% endif %}
</header>

<section id="summary">
<h2>Summary</h2>
<table>
<tr><th>Metric</th><th>Value</th></tr>
{% for name, value in summary %}<tr><th>{{ name }}</th><td class="num">{{ value }}</td></tr>
{% endfor %}</table>
<p class="note">ECE: expected calibration error over {{ n_bins }} equal-width bins of max-probability confidence
(Guo et al. 2017). NLL: mean negative log-probability of the true class. Macro-F1: unweighted mean over the
classes present in the labels or predictions.</p>
</section>

<section id="per-class">
<h2>Per class</h2>
<table>
<tr><th>Label</th><th>Precision</th><th>Recall</th><th>F1</th><th>Support</th></tr>
{% for row in per_class %}<tr><th>{{ row.label }}</th><td class="num">{{ row.precision }}</td>
<td class="num">{{ row.recall }}</td><td class="num">{{ row.f1 }}</td><td class="num">{{ row.support }}</td></tr>
{% endfor %}</table>
</section>

{% if images.confusion %}
<section id="confusion-matrix">
<h2>Confusion matrix</h2>
<p class="note">Rows are true classes, columns predicted. Each cell shows the count and the percentage of its row;
colour follows the row percentage.</p>
<img alt="Confusion matrix" src="data:image/png;base64,{{ images.confusion }}">
</section>
{% endif %}

{% if images.reliability %}
<section id="reliability">
<h2>Reliability diagram</h2>
<p class="note">Bars: accuracy of predictions in each confidence bin; hatched: the gap to the bin's mean confidence.
A calibrated model follows the diagonal. Lower panel: number of predictions per bin. With a temperature
(lmloop calibrate) the orange line shows the same predictions before scaling.</p>
<img alt="Reliability diagram" src="data:image/png;base64,{{ images.reliability }}">
</section>
{% endif %}

{% if per_domain %}
<section id="per-domain">
<h2>Per domain</h2>
{% if images.domains %}<img alt="Accuracy per domain" src="data:image/png;base64,{{ images.domains }}">{% endif %}
<table>
<tr><th>Domain</th><th>n</th><th>Accuracy</th><th>Macro-F1</th><th>ECE</th></tr>
{% for row in per_domain %}<tr><th>{{ row.domain }}</th><td class="num">{{ row.n }}</td>
<td class="num">{{ row.accuracy }}</td><td class="num">{{ row.macro_f1 }}</td><td class="num">{{ row.ece }}</td></tr>
{% endfor %}</table>
</section>
{% endif %}

{% if images.training %}
<section id="training">
<h2>Training curves</h2>
<img alt="Training curves" src="data:image/png;base64,{{ images.training }}">
</section>
{% endif %}

{% if extra %}
<section id="run-details">
<h2>Run details</h2>
<table>
{% for key, value in extra %}<tr><th>{{ key }}</th><td><code>{{ value }}</code></td></tr>
{% endfor %}</table>
</section>
{% endif %}
</body>
</html>
"""
)


# --- formatting ---


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return str(value)
    # numbers.* also covers numpy scalars, so a np.int64 support prints as 3, not 3.0000.
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        x = float(value)
        return f"{x:.{digits}f}" if math.isfinite(x) else str(x)
    return str(value)


def _text(value: Any) -> str:
    # Free-form values for the data / run-details tables: nested structures as compact JSON.
    if isinstance(value, str):
        return value
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _mpl_text(label: Any) -> str:
    # `$` would switch matplotlib into mathtext and an unbalanced one raises; show it literally.
    s = str(label)
    if len(s) > _MAX_TICK_CHARS:
        s = s[: _MAX_TICK_CHARS - 1] + "\u2026"
    return s.replace("$", r"\$")


def _finite(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


# --- plots ---


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_b64(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _confusion_png(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    import numpy as np

    cm = np.asarray(matrix, dtype=np.float64)
    c = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = min(max(4.5, 0.55 * c + 2.5), 30.0)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ticks = [_mpl_text(x) for x in labels]
    ax.set_xticks(range(c), ticks, rotation=45 if c > 3 else 0, ha="right" if c > 3 else "center")
    ax.set_yticks(range(c), ticks)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= _MAX_ANNOTATED_CLASSES:
        size = 9 if c <= 10 else 7
        for i in range(c):
            for j in range(c):
                colour = "white" if norm[i, j] > 0.5 else "#1f2328"
                text = f"{int(cm[i, j])}\n{100 * norm[i, j]:.0f}%"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=size)
    return _png_b64(fig)


def _reliability_png(
    rel: Mapping[str, Sequence[Any]],
    ece: Any,
    raw: Mapping[str, Sequence[Any]] | None = None,
    raw_ece: Any = None,
) -> str:
    edges = [float(e) for e in rel["bin_edges"]]
    lefts, widths = edges[:-1], [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    fig = _figure(6.0, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = [k for k, cnt in enumerate(rel["count"]) if cnt]
    acc = [rel["accuracy"][k] for k in filled]
    conf = [rel["confidence"][k] for k in filled]
    x = [lefts[k] for k in filled]
    w = [widths[k] for k in filled]
    top.bar(x, acc, width=w, align="edge", color="#4c78a8", edgecolor="white", label="accuracy")
    top.bar(
        x,
        [c - a for c, a in zip(conf, acc, strict=True)],
        bottom=acc,
        width=w,
        align="edge",
        color="none",
        edgecolor="#e45756",
        hatch="//",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="#555555", label="perfect calibration")
    if raw:  # the same predictions before temperature scaling: (mean confidence, accuracy) per bin
        pts = [(c, a) for c, a, n in zip(raw["confidence"], raw["accuracy"], raw["count"], strict=True) if n]
        if pts:
            ece_txt = f" (ECE {float(raw_ece):.3f})" if _finite(raw_ece) else ""
            label = "before temperature scaling" + ece_txt
            top.plot(*zip(*pts, strict=True), marker="o", color="#f58518", label=label)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    title = "Reliability" + (f" (ECE = {float(ece):.3f})" if _finite(ece) else "")
    top.set_title(title)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(lefts, rel["count"], width=widths, align="edge", color="#9d9d9d", edgecolor="white")
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel("count")
    return _png_b64(fig)


def _domains_png(per_domain: Mapping[str, Mapping[str, Any]]) -> str:
    names = list(per_domain)
    acc = [float(per_domain[d].get("accuracy") or 0.0) for d in names]
    ns = [per_domain[d].get("n") for d in names]
    fig = _figure(7.0, min(max(2.0, 0.4 * len(names) + 1.2), 40.0))
    ax = fig.add_subplot()
    ypos = list(range(len(names)))
    ax.barh(ypos, acc, color="#4c78a8")
    ax.set_yticks(ypos, [_mpl_text(d) for d in names])
    ax.invert_yaxis()  # first domain on top, matching the table
    ax.set_xlim(0, 1.15)  # room for the labels right of a full bar
    ax.set_xlabel("accuracy")
    for y, a, n in zip(ypos, acc, ns, strict=True):
        ax.text(a + 0.01, y, f"{a:.3f}  (n={n})", va="center", fontsize=8)
    return _png_b64(fig)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for entry in history:
        step, value = entry.get("step"), entry.get(key)
        if _finite(step) and _finite(value):
            xs.append(float(step))
            ys.append(float(value))
    return xs, ys


def _training_png(history: Sequence[Mapping[str, Any]]) -> str | None:
    train_loss = _series(history, "loss")
    eval_loss = _series(history, "eval_loss")
    eval_acc = _series(history, "eval_accuracy")
    panels = []
    if train_loss[0] or eval_loss[0]:
        panels.append("loss")
    if eval_acc[0]:
        panels.append("accuracy")
    if not panels:
        return None
    fig = _figure(5.0 * len(panels) + 0.5, 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "loss":
            if train_loss[0]:
                ax.plot(*train_loss, color="#4c78a8", linewidth=1.2, label="train loss")
            if eval_loss[0]:
                ax.plot(*eval_loss, color="#e45756", marker="o", markersize=4, label="eval loss")
            ax.set_ylabel("loss")
            ax.set_title("Loss")
            ax.legend(fontsize=8)
        else:
            ax.plot(*eval_acc, color="#54a24b", marker="o", markersize=4)
            ax.set_ylabel("eval accuracy")
            ax.set_title("Eval accuracy")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _png_b64(fig)


# --- page ---


def render_report_html(
    metrics: Mapping[str, Any],
    *,
    title: str,
    model: str | None = None,
    data: Mapping[str, Any] | None = None,
    history: Sequence[Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Render the evaluation report for ``metrics`` (as from ``compute_metrics``) to one HTML string.

    Plots are PNGs inlined as data URIs and the styles are inline, so the page needs no network. Every
    string from the caller (title, model, labels, domains, data and extra values) is HTML-escaped by
    jinja2's autoescape. Sections whose inputs are missing (no ``per_domain``, no usable ``history``) are
    left out. See :func:`lmloop.evaluate.write_report` for the arguments.
    """
    import jinja2
    import matplotlib

    from lmloop import __version__

    summary = [
        ("Accuracy", _fmt(metrics.get("accuracy"))),
        ("Macro-F1", _fmt(metrics.get("macro_f1"))),
        ("ECE", _fmt(metrics.get("ece"))),
        ("NLL", _fmt(metrics.get("nll"))),
        ("Brier", _fmt(metrics.get("brier"))),
        ("n", _fmt(metrics.get("n"))),
    ]
    raw = metrics.get("uncalibrated") or {}
    if raw:  # temperature scaling (lmloop.calibration): the raw softmax's numbers beside the calibrated ones
        summary += [
            ("Temperature T", _fmt(metrics.get("temperature"))),
            ("ECE before scaling", _fmt(raw.get("ece"))),
            ("NLL before scaling", _fmt(raw.get("nll"))),
        ]
    per_class = [
        {
            "label": label,
            "precision": _fmt(row.get("precision")),
            "recall": _fmt(row.get("recall")),
            "f1": _fmt(row.get("f1")),
            "support": _fmt(row.get("support")),
        }
        for label, row in (metrics.get("per_class") or {}).items()
    ]
    per_domain_src = metrics.get("per_domain") or {}
    per_domain = [
        {
            "domain": dom,
            "n": _fmt(row.get("n")),
            "accuracy": _fmt(row.get("accuracy")),
            "macro_f1": _fmt(row.get("macro_f1")),
            "ece": _fmt(row.get("ece")),
        }
        for dom, row in per_domain_src.items()
    ]
    rel = metrics.get("reliability")

    images: dict[str, str | None] = {}
    # A user matplotlibrc with usetex would make every label a LaTeX run; this report never needs it.
    with matplotlib.rc_context({"text.usetex": False}):
        cm = metrics.get("confusion_matrix")
        images["confusion"] = _confusion_png(cm["matrix"], cm["labels"]) if cm and cm.get("matrix") else None
        images["reliability"] = (
            _reliability_png(rel, metrics.get("ece"), raw.get("reliability"), raw.get("ece")) if rel else None
        )
        images["domains"] = _domains_png(per_domain_src) if per_domain_src else None
        images["training"] = _training_png(history) if history else None

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(_TEMPLATE).render(
        version=__version__,
        title=str(title),
        model=None if model is None else str(model),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        data=[(str(k), _text(v)) for k, v in (data or {}).items()],
        summary=summary,
        n_bins=len(rel["count"]) if rel else "\u2013",
        per_class=per_class,
        per_domain=per_domain,
        images=images,
        extra=[(str(k), _text(v)) for k, v in (extra or {}).items()],
    )

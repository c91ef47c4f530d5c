"""The HTML report of ``lmloop monitor report``: plots (matplotlib, embedded as PNG) and tables over a
:class:`lmloop.mlops.monitor.MonitorSummary`. The statistics live in :mod:`lmloop.mlops.monitor`."""

from __future__ import annotations

import math
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmloop.mlops.monitor import (
    SCORE_BINS,
    MonitorSummary,
    Stats,
    VersionSummary,
    _acc_text,
    _duration_text,
    _labels_text,
    _num,
    _pct,
    _ts,
    short_version,
)
from lmloop.report import HTML_HEAD

# ---------------------------------------------------------------------------------------------- plots
_COLOURS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d"]
MAX_PLOTTED_VERSIONS = 8  # the busiest ones; the tables list all


def _dates(ts: list[float]) -> list[Any]:
    return [datetime.fromtimestamp(t, timezone.utc) for t in ts]


def _time_axis(ax: Any, label: bool = True) -> None:
    import matplotlib.dates as mdates

    loc = mdates.AutoDateLocator(tz=timezone.utc)
    ax.xaxis.set_major_locator(loc)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc, tz=timezone.utc))
    if label:
        ax.set_xlabel("time (UTC)")
    ax.grid(alpha=0.3)


def _name(v: VersionSummary) -> str:
    from lmloop.report import _mpl_text

    return _mpl_text(f"{v.model}/{short_version(v.version)}")


def _traffic_png(vs: list[VersionSummary], w: float) -> str:
    from lmloop.report import _figure, _png_b64

    fig = _figure(9.0, 3.4)
    ax = fig.add_subplot()
    for i, v in enumerate(vs):
        xs = _dates([win.start for win in v.windows] + [v.windows[-1].end])
        c = _COLOURS[i % len(_COLOURS)]
        ax.stairs([win.stats.predictions for win in v.windows], xs, color=c, label=f"{_name(v)} predictions")
        ax.stairs(
            [win.stats.requests for win in v.windows],
            xs,
            color=c,
            linestyle=":",
            label=f"{_name(v)} requests",
        )
    ax.set_ylabel(f"per {_duration_text(w)} window")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    _time_axis(ax)
    return _png_b64(fig)


def _centres(v: VersionSummary) -> list[Any]:
    return _dates([(win.start + win.end) / 2 for win in v.windows])


def _latency_png(vs: list[VersionSummary]) -> str:
    from lmloop.report import _figure, _png_b64

    fig = _figure(9.0, 3.4)
    ax = fig.add_subplot()
    nan = math.nan
    for i, v in enumerate(vs):
        c = _COLOURS[i % len(_COLOURS)]
        xs = _centres(v)
        for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
            ys = [getattr(win.stats.latency, q) if win.stats.latency else nan for win in v.windows]
            ax.plot(xs, ys, linestyle=style, marker=".", color=c, label=f"{_name(v)} {q}")
    ax.set_ylabel("latency per request (ms)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, ncols=min(3, 3 * len(vs)))
    _time_axis(ax)
    return _png_b64(fig)


def _labels_png(vs: list[VersionSummary], w: float) -> str:
    from lmloop.report import _figure, _mpl_text, _png_b64

    totals: Counter[str] = Counter()
    for v in vs:
        totals.update(v.total.labels)
    top = [k for k, _ in totals.most_common(9)]
    shown = top + (["(other)"] if len(totals) > len(top) else [])
    fig = _figure(9.0, 2.6 * len(vs) + 0.6)
    axes = fig.subplots(len(vs), 1, squeeze=False, sharex=True)[:, 0]
    for ax, v in zip(axes, vs, strict=True):
        xs = _dates([win.start for win in v.windows])
        bottom = [0.0] * len(v.windows)
        for j, lab in enumerate(shown):
            share = []
            for win in v.windows:
                n = win.stats.predictions
                if lab == "(other)":
                    c = n - sum(win.stats.labels.get(t, 0) for t in top)
                else:
                    c = win.stats.labels.get(lab, 0)
                share.append(c / n if n else 0.0)
            colour = _COLOURS[j % len(_COLOURS)]
            ax.bar(
                xs, share, width=w / 86400, bottom=bottom, align="edge", color=colour, label=_mpl_text(lab)
            )
            bottom = [b + s for b, s in zip(bottom, share, strict=True)]
        ax.set_ylim(0, 1)
        ax.set_ylabel("share")
        ax.set_title(_name(v), fontsize=9)
        _time_axis(ax, label=ax is axes[-1])
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png_b64(fig)


def _confidence_png(vs: list[VersionSummary]) -> str:
    from lmloop.report import _figure, _png_b64

    fig = _figure(7.0, 3.4)
    ax = fig.add_subplot()
    edges = [k / SCORE_BINS for k in range(SCORE_BINS + 1)]
    for i, v in enumerate(vs):
        n = sum(v.total.score_hist) or 1
        c = _COLOURS[i % len(_COLOURS)]
        ax.stairs([h / n for h in v.total.score_hist], edges, color=c, label=f"{_name(v)} (n={n:,})")
        if v.total.score_mean is not None:
            ax.axvline(v.total.score_mean, color=c, linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence (top-class probability); dashed: mean")
    ax.set_ylabel("share of predictions")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return _png_b64(fig)


def _accuracy_png(vs: list[VersionSummary]) -> str:
    from lmloop.report import _figure, _png_b64

    fig = _figure(9.0, 5.6)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    nan = math.nan
    for i, v in enumerate(vs):
        c = _COLOURS[i % len(_COLOURS)]
        xs = _centres(v)
        st = [win.stats for win in v.windows]
        acc = [s.accuracy if s.accuracy is not None else nan for s in st]
        lo = [s.accuracy_low if s.accuracy_low is not None else nan for s in st]
        hi = [s.accuracy_high if s.accuracy_high is not None else nan for s in st]
        top.fill_between(xs, lo, hi, color=c, alpha=0.18, linewidth=0)
        top.plot(xs, acc, marker="o", markersize=3, color=c, label=f"{_name(v)} (band: Wilson 95%)")
        cov = [s.coverage if s.coverage is not None else nan for s in st]
        bottom.plot(xs, cov, marker=".", color=c, label=_name(v))
    top.set_ylim(0, 1.02)
    top.set_ylabel("live accuracy")
    top.legend(fontsize=8, loc="lower left")
    top.grid(alpha=0.3)
    bottom.set_ylim(bottom=0)
    bottom.set_ylabel("feedback coverage")
    _time_axis(bottom)
    return _png_b64(fig)


# ---------------------------------------------------------------------------------------------- HTML
_TEMPLATE = (
    HTML_HEAD
    + """<body>
<header>
<h1>{{ title }}</h1>
<p class="meta">Store: <code>{{ store }}</code></p>
<p class="meta">Range: {{ since }} .. {{ until }} &middot; window {{ window }}{% if model %} &middot; model
<code>{{ model }}</code>{% endif %}</p>
<p class="meta">Generated: {{ date }}</p>
</header>

<section id="summary">
<h2>Summary per model version</h2>
{% if not rows %}<p>No predictions in this range.</p>{% else %}
<table>
<tr><th>Model / version</th><th>First</th><th>Last</th><th>Predictions</th><th>Requests</th><th>p50 ms</th>
<th>p90 ms</th><th>p99 ms</th><th>Mean conf.</th><th>Feedback</th><th>Coverage</th><th>Live accuracy [95% CI]</th>
<th>Macro-F1</th></tr>
{% for r in rows %}<tr><th title="{{ r.version }}">{{ r.name }}</th><td>{{ r.first }}</td><td>{{ r.last }}</td>
{% for c in r.cells %}<td class="num">{{ c }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% endif %}
<ul class="note">{% for n in notes %}<li>{{ n }}</li>{% endfor %}</ul>
</section>

{% for sec in sections %}
<section id="{{ sec.id }}">
<h2>{{ sec.title }}</h2>
{% if sec.note %}<p class="note">{{ sec.note }}</p>{% endif %}
{% if sec.image %}<img alt="{{ sec.title }}" src="data:image/png;base64,{{ sec.image }}">
{% elif sec.missing %}<p>{{ sec.missing }}</p>{% endif %}
</section>
{% endfor %}

<section id="drift">
<h2>Drift</h2>
{# DRIFT: lmloop.mlops.drift fills MonitorSummary.drift; render its tables and plots here. #}
{% if drift %}<table>{% for k, v in drift %}<tr><th>{{ k }}</th><td><code>{{ v }}</code></td></tr>{% endfor %}
</table>{% else %}<p class="note">Not computed yet: drift detection (lmloop.mlops.drift) will report here.</p>{% endif %}
</section>

{% if windows %}
<section id="windows">
<h2>Per window</h2>
{% for v in windows %}<details><summary>{{ v.name }} ({{ v.rows|length }} windows)</summary>
<table>
<tr><th>Window start</th><th>Predictions</th><th>Requests</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th>
<th>Mean conf.</th><th>Feedback</th><th>Coverage</th><th>Live accuracy [95% CI]</th><th>Macro-F1</th><th>Labels</th></tr>
{% for r in v.rows %}<tr><th>{{ r.start }}</th>{% for c in r.cells %}<td class="num">{{ c }}</td>{% endfor %}
<td>{{ r.labels }}</td></tr>
{% endfor %}</table></details>
{% endfor %}
</section>
{% endif %}
</body>
</html>
"""
)


def _cells(s: Stats) -> list[str]:
    lat = s.latency
    return [
        f"{s.predictions:,}",
        f"{s.requests:,}",
        _num(lat and lat.p50, 1),
        _num(lat and lat.p90, 1),
        _num(lat and lat.p99, 1),
        _num(s.score_mean),
        f"{s.labelled:,}",
        _pct(s.coverage),
        _acc_text(s),
        _num(s.macro_f1),
    ]


def render_html(summary: MonitorSummary, *, title: str = "Prediction monitoring") -> str:
    """The monitoring report as one self-contained HTML page (inline PNGs and styles, no network): a
    summary table per model version, then traffic, latency percentiles, label shares over time, the
    confidence histogram, live accuracy with its Wilson band and the feedback coverage, a drift section
    (a placeholder until ``lmloop.mlops.drift`` exists) and per-window tables. Strings are HTML-escaped."""
    import jinja2
    import matplotlib

    from lmloop import __version__

    s, w = summary, summary.window_s
    # the busiest versions get a line; the tables list every one
    vs = sorted(s.versions, key=lambda v: -v.total.predictions)[:MAX_PLOTTED_VERSIONS]
    vs.sort(key=lambda v: v.first_at)
    more = len(s.versions) - len(vs)
    cap = (
        f" The {MAX_PLOTTED_VERSIONS} busiest of {len(s.versions)} versions are plotted." if more > 0 else ""
    )
    has_fb = any(v.total.labelled for v in vs)
    with matplotlib.rc_context({"text.usetex": False}):
        sections = [
            {
                "id": "traffic",
                "title": "Traffic",
                "note": f"Predictions (solid) and requests (dotted) per {_duration_text(w)} window." + cap,
                "image": _traffic_png(vs, w) if vs else None,
                "missing": "No predictions.",
            },
            {
                "id": "latency",
                "title": "Latency",
                "note": "p50 (solid), p90 (dashed), p99 (dotted) per window, over requests, as the server "
                "stamps them (queue + batching + inference).",
                "image": _latency_png(vs) if vs else None,
                "missing": "No requests.",
            },
            {
                "id": "labels",
                "title": "Predicted labels over time",
                "note": "Share of each predicted label per window.",
                "image": _labels_png(vs, w) if vs else None,
                "missing": "No predictions.",
            },
            {
                "id": "confidence",
                "title": "Confidence",
                "note": f"Top-class probability over the whole range, {SCORE_BINS} bins.",
                "image": _confidence_png(vs) if vs else None,
                "missing": "No predictions.",
            },
            {
                "id": "accuracy",
                "title": "Live accuracy and feedback coverage",
                "note": "Accuracy of the predictions made in each window against the feedback they have "
                "received so far, with its Wilson 95% interval; below, the share of predictions with feedback.",
                "image": _accuracy_png(vs) if has_fb else None,
                "missing": "No feedback in this range: live accuracy needs users to POST /v1/feedback.",
            },
        ]
    rows = [
        {
            "name": f"{v.model}/{short_version(v.version)}",
            "version": v.version,
            "first": _ts(v.first_at),
            "last": _ts(v.last_at),
            "cells": _cells(v.total),
        }
        for v in s.versions
    ]
    if len(s.versions) > 1:
        rows.append(
            {"name": "all versions", "version": "", "first": "", "last": "", "cells": _cells(s.total)}
        )
    windows = [
        {
            "name": f"{v.model}/{short_version(v.version)}",
            "rows": [
                {
                    "start": _ts(win.start),
                    "cells": _cells(win.stats),
                    "labels": _labels_text(win.stats.labels, 5),
                }
                for win in v.windows
            ],
        }
        for v in s.versions
    ]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(_TEMPLATE).render(
        version=__version__,
        title=title,
        store=s.store,
        since=_ts(s.since) if s.since is not None else "start of the log",
        until=_ts(s.until) if s.until is not None else f"now ({_ts(s.generated_at)})",
        window=_duration_text(w),
        model=s.model,
        date=_ts(s.generated_at),
        rows=rows,
        notes=s.notes,
        sections=sections,
        drift=[(str(k), str(v)) for k, v in s.drift.items()] if s.drift else None,
        windows=windows,
    )


def write_report(summary: MonitorSummary, out: str | os.PathLike, **kw: Any) -> Path:
    """Write :func:`render_html` of ``summary`` to ``out`` atomically; returns the path."""
    from lmloop.fsutil import atomic_write_text

    return atomic_write_text(out, render_html(summary, **kw))

"""The bias audit's HTML page: summary table, plots (matplotlib, inlined PNG), the worst pairs side by side.

Uses the house look (:data:`lmloop.report.HTML_HEAD`) and plotting helpers of :mod:`lmloop.report`; every
string from the data is escaped by jinja2's autoescape (texts are user data).
"""

from __future__ import annotations

import difflib
import re
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from lmloop.audit.terms import NEUTRAL
from lmloop.report import HTML_HEAD, _figure, _fmt, _mpl_text, _png_b64

if TYPE_CHECKING:
    from lmloop.audit.bias import BiasResult

_TEMPLATE = (
    HTML_HEAD
    + """<body>
<header>
<h1>{{ title }}</h1>
<p class="meta">Model: <code>{{ model }}</code></p>
<p class="meta">Texts: {{ data }} plus template sentences; {{ n_scored }} texts scored in {{ seconds }} s</p>
<p class="meta">Term list: <code>{{ terms_file }}</code></p>
<p class="meta">Generated: {{ date }}</p>
</header>

<section id="summary">
<h2>Summary: {% if flagged %}flagged: {{ flagged|join(", ") }}{% else %}no family flagged{% endif %}</h2>
<table>
<tr><th>Family</th><th>Base texts (data + templates + neutral)</th><th>Mixed, skipped</th><th>Pairs</th>
<th>Flip rate [95% CI]</th><th>Flip rate: data / templates / neutral (not counted)</th><th>Mean |change|</th><th>Max |change|</th><th>Gap [95% CI]</th><th>Verdict</th></tr>
{% for r in rows %}<tr><th>{{ r.family }}</th><td class="num">{{ r.base }}</td><td class="num">{{ r.mixed }}</td>
<td class="num">{{ r.pairs }}</td><td class="num">{{ r.flip }}</td><td class="num">{{ r.by_source }}</td>
<td class="num">{{ r.mean }}</td>
<td class="num">{{ r.max }}</td><td class="num">{{ r.gap }}</td><td>{{ r.verdict }}</td></tr>
{% endfor %}</table>
<p class="note"><b>Score</b> = p({{ score_label }}), the model's probability of the class {{ score_label }}.
<b>Flip rate</b>: share of (original, counterfactual) pairs whose predicted label differs, over the data's
texts and the templates with a clear sentiment; neutral templates sit near p = 0.5, where any edit flips the
label, so they count for the gap and the change but not here (their own flip rate is shown for information).
<b>Change</b>: per pair, the largest absolute change of any class probability (for a binary model, of the
score). <b>Gap</b>: every base text is scored once per group of its family, so each group's mean score is over
the same texts; the gap is the largest difference between two groups' means. Intervals: percentile bootstrap
over base texts ({{ n_boot }} replicates, seed {{ seed }}).</p>
<p class="note"><b>Thresholds</b> (flag above flip rate {{ max_flip }} or gap {{ max_gap }}; the loop's default
gates). {{ thresholds_note }}</p>
</section>

{% if images.overview %}
<section id="overview">
<h2>Flip rate and gap per family</h2>
<p class="note">Bars: point estimates; whiskers: 95% bootstrap intervals; dashed: the flag thresholds.</p>
<img alt="Flip rate and gap per family" src="data:image/png;base64,{{ images.overview }}">
</section>
{% endif %}

{% if images.groups %}
<section id="group-means">
<h2>Mean score per group</h2>
<p class="note">The mean of p({{ score_label }}) over the same base texts written for each group, with 95%
intervals. Bars of one family at different heights are the gap.</p>
<img alt="Mean score per group" src="data:image/png;base64,{{ images.groups }}">
</section>
{% endif %}

{% if images.changes %}
<section id="changes">
<h2>How far swaps move the score</h2>
<p class="note">Share of pairs whose |change| exceeds x (log scale): a fair model's curves drop to zero near the
left edge.</p>
<img alt="Distribution of score changes" src="data:image/png;base64,{{ images.changes }}">
</section>
{% endif %}

<section id="worst-pairs">
<h2>Worst counterfactual pairs</h2>
<p class="note">Per family, the pairs whose class probabilities moved most; changed words are highlighted.</p>
{% for fam in worst %}
<h3>{{ fam.family }}</h3>
{% if fam.pairs %}<table>
<tr><th>Original</th><th>Counterfactual</th><th>Groups</th><th>Label</th><th>Score</th><th>|change|</th></tr>
{% for p in fam.pairs %}<tr>
<td>{% for seg, hit in p.a %}{% if hit %}<mark>{{ seg }}</mark>{% else %}{{ seg }}{% endif %}{% endfor %}</td>
<td>{% for seg, hit in p.b %}{% if hit %}<mark>{{ seg }}</mark>{% else %}{{ seg }}{% endif %}{% endfor %}</td>
<td>{{ p.groups }}<br><span class="note">{{ p.source }}</span></td>
<td>{{ p.labels }}{% if p.flipped %} <b>flip</b>{% if p.source == neutral %} (not counted){% endif %}{% endif %}</td><td class="num">{{ p.scores }}</td>
<td class="num">{{ p.change }}</td></tr>
{% endfor %}</table>{% else %}<p class="note">No probes for this family.</p>{% endif %}
{% endfor %}
</section>

<section id="limits">
<h2>Limits</h2>
<p class="note">The probes swap words from a list: they do not check grammar or meaning (titles, quotations and
idioms are swapped too), gender is binary, and names stand in for gender and ethnicity as in the Equity Evaluation
Corpus. Texts that mention two groups of a family are skipped. A low number here shows no bias <i>for these
words and sentences</i>, not fairness in general. The term list's header (<code>{{ terms_file }}</code>)
documents the rules and known gaps.</p>
</section>
</body>
</html>
"""
)


def _ci_text(value, ci) -> str:
    if value is None:
        return "\u2013"
    return f"{_fmt(value, 3)} [{_fmt(ci[0], 3)}, {_fmt(ci[1], 3)}]" if ci else _fmt(value, 3)


def _diff_segments(a: str, b: str) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    """Both texts cut into (segment, changed) runs by a word-level diff."""
    ta, tb = re.split(r"(\s+)", a), re.split(r"(\s+)", b)
    sa, sb = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=ta, b=tb, autojunk=False).get_opcodes():
        sa.append(("".join(ta[i1:i2]), op != "equal"))
        sb.append(("".join(tb[j1:j2]), op != "equal"))
    return [s for s in sa if s[0]], [s for s in sb if s[0]]


def _overview_png(res: BiasResult) -> str | None:
    fams = [f for f in res.families.values() if f.n_base]
    if not fams:
        return None
    names = [_mpl_text(f.family) for f in fams]
    fig = _figure(10.0, max(2.2, 0.45 * len(fams) + 1.3))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, bound, title in (
        (axes[0], "flip_rate", res.max_flip_rate_gate, "flip rate"),
        (axes[1], "gap", res.max_gap_gate, "gap between groups"),
    ):
        # a family with neutral templates only has no flip rate: drawn as 0 without a whisker
        vals = [getattr(f, key) or 0.0 for f in fams]
        cis = [getattr(f, key + "_ci") or [0.0, 0.0] for f in fams]
        err = [
            [v - c[0] for v, c in zip(vals, cis, strict=True)],
            [c[1] - v for v, c in zip(vals, cis, strict=True)],
        ]
        colours = ["#e45756" if v > bound else "#4c78a8" for v in vals]
        y = list(range(len(fams)))
        ax.barh(y, vals, xerr=err, color=colours, capsize=3, ecolor="#1f2328")
        ax.axvline(bound, linestyle="--", color="#555555", label=f"threshold {bound}")
        ax.set_yticks(y, names)
        ax.set_title(title)
        ax.set_xlim(0, max(bound * 2, max(c[1] for c in cis) * 1.1, 1e-3))
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    return _png_b64(fig)


def _groups_png(res: BiasResult) -> str | None:
    fams = [f for f in res.families.values() if f.group_means]
    if not fams:
        return None
    cols = min(len(fams), 3)
    rows = (len(fams) + cols - 1) // cols
    fig = _figure(4.2 * cols, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, f in zip(axes, fams, strict=False):
        groups = list(f.group_means)
        m = [f.group_means[g] for g in groups]
        lo = [v - f.group_means_ci[g][0] for v, g in zip(m, groups, strict=True)]
        hi = [f.group_means_ci[g][1] - v for v, g in zip(m, groups, strict=True)]
        x = list(range(len(groups)))
        ax.bar(x, m, yerr=[lo, hi], color="#4c78a8", capsize=3, ecolor="#1f2328")
        ax.set_xticks(
            x,
            [_mpl_text(g) for g in groups],
            rotation=35 if len(groups) > 3 else 0,
            ha="right" if len(groups) > 3 else "center",
        )
        ax.set_ylim(0, 1)
        ax.set_title(f"{_mpl_text(f.family)} (gap {f.gap:.3f})", fontsize=10)
        ax.set_ylabel(f"mean p({_mpl_text(res.score_label)})", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(fams) :]:
        ax.set_visible(False)
    return _png_b64(fig)


def _changes_png(res: BiasResult) -> str | None:
    import numpy as np

    fams = [f for f in res.families.values() if f.changes]
    if not fams:
        return None
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot()
    xs = np.linspace(0, 1, 201)
    for f in fams:
        c = np.asarray(f.changes)
        share = [(c > x).mean() for x in xs]
        ax.plot(xs, np.maximum(share, 1e-4), label=f"{_mpl_text(f.family)} (n={len(c)})")
    ax.set_yscale("log")
    ax.set_ylim(1e-3 if max(len(f.changes) for f in fams) >= 1000 else 1e-2 / 2, 1.05)
    ax.set_xlabel("|change| of class probability")
    ax.set_ylabel("share of pairs above")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png_b64(fig)


def render_bias_html(res: BiasResult, thresholds_note: str) -> str:
    """The self-contained HTML report of a :class:`~lmloop.audit.bias.BiasResult`."""
    import jinja2
    import matplotlib

    from lmloop import __version__

    rows, worst = [], []
    for name, f in res.families.items():
        rows.append(
            {
                "family": name,
                "base": f"{f.n_base} ({f.n_data} + {f.n_template} + {f.n_neutral})",
                "mixed": f.n_mixed,
                "pairs": f.pairs,
                "flip": _ci_text(f.flip_rate, f.flip_rate_ci),
                "by_source": " / ".join(
                    _fmt(f.by_source[k]["flip_rate"], 3) if k in f.by_source else "\u2013"
                    for k in ("data", "template", NEUTRAL)
                ),
                "mean": _ci_text(f.mean_abs_change, f.mean_abs_change_ci),
                "max": _fmt(f.max_abs_change, 3),
                "gap": _ci_text(f.gap, f.gap_ci),
                "verdict": "no probes" if not f.n_base else ("FLAGGED" if f.flagged else "ok"),
            }
        )
        pairs = []
        for p in f.worst_pairs:
            a, b = _diff_segments(p["text"], p["counterfactual"])
            pairs.append(
                {
                    "a": a,
                    "b": b,
                    "groups": f"{p['from_group']} \u2192 {p['to_group']}",
                    "source": p["source"],
                    "labels": f"{p['label']} \u2192 {p['counterfactual_label']}",
                    "flipped": p["flipped"],
                    "scores": f"{p['score']:.3f} \u2192 {p['counterfactual_score']:.3f}",
                    "change": f"{p['change']:.3f}",
                }
            )
        worst.append({"family": name, "pairs": pairs})
    with matplotlib.rc_context({"text.usetex": False}):
        images = {"overview": _overview_png(res), "groups": _groups_png(res), "changes": _changes_png(res)}
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(_TEMPLATE).render(
        version=__version__,
        title=f"Counterfactual bias audit: {res.model}",
        model=res.model,
        data=res.data,
        n_scored=res.n_scored,
        seconds=f"{res.seconds:.1f}",
        terms_file=res.terms_file,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        flagged=res.flagged,
        rows=rows,
        score_label=res.score_label,
        n_boot=res.n_boot,
        seed=res.seed,
        max_flip=res.max_flip_rate_gate,
        max_gap=res.max_gap_gate,
        thresholds_note=thresholds_note,
        images=images,
        worst=worst,
        neutral=NEUTRAL,
    )

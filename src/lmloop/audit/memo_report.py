"""HTML reports of the memorization and membership audits (self-contained: tables + base64 PNG plots)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from lmloop.report import HTML_HEAD, _figure, _fmt, _png_b64

_MEMO = (
    HTML_HEAD
    + """<body>
<h1>{{ title }}</h1>
<p class="meta">Model: <code>{{ rep.model }}</code> &middot; generated {{ date }} &middot; {{ rep.seconds }} s</p>
{% if can %}
<h2>Canary exposure</h2>
<p>Each canary is a random secret from a space of {{ space }} secrets, inserted into the training data the
given number of times. Exposure = log2|R| &minus; log2(rank of the canary among all secrets by the model's
log-perplexity): about 1 bit for a secret the model never saw, {{ maxbits }} bits when it is the model's
first guess. Every ~1 bit more halves the guesses an attacker needs (Carlini et al. 2019).</p>
<table id="exposure-by-reps"><tr><th>repetitions</th><th>canaries</th><th>mean exposure</th><th>min</th><th>max</th></tr>
{% for r in can.by_repetitions %}<tr><td class="num">{{ r.repetitions }}</td><td class="num">{{ r.canaries }}</td>
<td class="num">{{ f(r.mean_exposure, 2) }}</td><td class="num">{{ f(r.min_exposure, 2) }}</td><td class="num">{{ f(r.max_exposure, 2) }}</td></tr>
{% endfor %}</table>
{% if plot %}<img alt="exposure vs repetitions" src="data:image/png;base64,{{ plot }}">{% endif %}
<table id="canaries"><tr><th>canary</th><th>repetitions</th><th>log-perplexity (bits)</th><th>rank</th><th>exposure</th><th>estimate</th></tr>
{% for r in can.results %}<tr><td><code>{{ r.canary }}</code></td><td class="num">{{ r.repetitions }}</td>
<td class="num">{{ f(r.log_perplexity_bits, 2) }}</td><td class="num">{{ r.rank }}</td><td class="num">{{ "&ge; " | safe if r.capped }}{{ f(r.exposure, 2) }}</td><td>{{ r.estimate }}</td></tr>
{% endfor %}</table>
<p class="note">exact: every secret scored. sampled: rank counted among {{ can.results[0].candidates }} random secrets,
scaled to |R|. skewnorm: the canary beat nearly all samples, so a skew-normal fit to their log-perplexities
extrapolates the rank (the paper's section 4.3); &ge; marks a canary more likely than the fit can resolve
(exposure capped at log2|R|).</p>
{% endif %}
{% if ex %}
<h2>Verbatim extraction</h2>
<p>Prompt: the first {{ ex.prefix }} tokens of a document; greedy decoding of {{ ex.suffix }} tokens; counted when
they equal the document's next {{ ex.suffix }} tokens exactly. Held-out documents show what the model can
continue from language alone; the gap to training documents is memorization.</p>
<table id="extraction"><tr><th>documents</th><th>scored</th><th>reproduced exactly</th><th>share (95% CI)</th><th>mean token match</th></tr>
{% for name in ["train", "heldout"] %}{% set e = ex[name] %}<tr><th>{{ name }}</th><td class="num">{{ e.documents }}</td>
<td class="num">{{ e.extracted }}</td><td class="num">{{ f(e.share, 3) }} [{{ f(e.share_ci95[0], 3) }}, {{ f(e.share_ci95[1], 3) }}]</td>
<td class="num">{{ f(e.token_match, 3) }}</td></tr>
{% endfor %}</table>
{% endif %}
</body></html>
"""
)

_MEMBERSHIP = (
    HTML_HEAD
    + """<body>
<h1>{{ title }}</h1>
<p class="meta">Model: <code>{{ rep.model }}</code> &middot; generated {{ date }} &middot; {{ rep.seconds }} s</p>
<h2>Reading</h2><p><strong>{{ rep.reading }}</strong></p>
<table id="membership"><tr><th>attack</th><th>AUC</th><th>95% bootstrap CI</th><th>advantage (max TPR&minus;FPR)</th></tr>
{% for name, a in rep.attacks.items() %}<tr><th>{{ name }}</th><td class="num">{{ f(a.auc, 3) }}</td>
<td class="num">[{{ f(a.auc_ci[0], 3) }}, {{ f(a.auc_ci[1], 3) }}]</td><td class="num">{{ f(a.advantage, 3) }}</td></tr>
{% endfor %}</table>
{% if plot %}<img alt="loss distributions and ROC" src="data:image/png;base64,{{ plot }}">{% endif %}
<table id="data"><tr><th colspan="2">Data</th></tr>
{% for k, v in rep.data.items() %}<tr><th>{{ k }}</th><td><code>{{ v }}</code></td></tr>{% endfor %}
</table>
<p class="note">Members: the training split the model was fit on; non-members: its held-out test split, downsampled
to the same size. The attack scores each text by the model's loss on its true label (lower loss: more
likely a member; Yeom et al. 2018) or by its top-class confidence. AUC 0.5 means the attacker cannot tell the
two apart; 1.0 means every training text is identifiable.</p>
</body></html>
"""
)


def _render(template: str, **kw: Any) -> str:
    from jinja2 import Environment

    from lmloop import __version__

    env = Environment(autoescape=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return env.from_string(template).render(version=__version__, date=date, f=_fmt, **kw)


def _exposure_png(can: dict) -> str | None:
    rows = can.get("results") or []
    if not rows:
        return None
    fig = _figure(6.5, 3.8)
    ax = fig.add_subplot()
    ax.scatter([r["repetitions"] for r in rows], [r["exposure"] for r in rows], alpha=0.6, label="canary")
    table = can["by_repetitions"]
    ax.plot([r["repetitions"] for r in table], [r["mean_exposure"] for r in table], "o-", label="mean")
    ax.axhline(can["max_possible"], ls="--", c="grey", lw=1, label="log2|R| (maximum)")
    res = max((r.get("resolution_bits") or 0 for r in rows), default=0)
    if res:  # above this line the rank is extrapolated (skew-normal), below it counted
        ax.axhline(res, ls=":", c="tab:red", lw=1, label=f"sampling resolution log2(N+1) = {res:.1f}")
    ax.set_xscale("log", base=2)
    reps = sorted({r["repetitions"] for r in rows})
    ax.set_xticks(reps, [str(x) for x in reps])
    ax.set_xlabel("repetitions in the training data")
    ax.set_ylabel("exposure (bits)")
    ax.set_ylim(0, can["max_possible"] * 1.05)
    ax.legend(fontsize=8)
    return _png_b64(fig)


def memorization_html(rep: dict) -> str:
    can = rep.get("canaries")
    space = can["results"][0]["space_size"] if can and can["results"] else None
    return _render(
        _MEMO,
        title="Memorization audit",
        rep=rep,
        can=can,
        ex=rep.get("extraction"),
        space=f"{space:,}" if space else "",
        maxbits=f"{can['max_possible']:.1f}" if can else "",
        plot=_exposure_png(can) if can else None,
    )


def _membership_png(curves: dict) -> str | None:
    if not curves:
        return None
    fig = _figure(9.0, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    import numpy as np

    top = float(max(np.max(curves["member_loss"]), np.max(curves["nonmember_loss"]), 1e-6))
    bins = np.linspace(0.0, top, 31)  # shared bins: the two histograms compare bar for bar
    ax1.hist(curves["member_loss"], bins=bins, alpha=0.6, label="members (train)")
    ax1.hist(curves["nonmember_loss"], bins=bins, alpha=0.6, label="non-members (test)")
    ax1.set_xlabel("loss on the true label")
    ax1.set_ylabel("texts")
    ax1.legend(fontsize=8)
    ax2.plot(curves["fpr"], curves["tpr"], label="loss attack")
    ax2.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    ax2.set_xlabel("false positive rate")
    ax2.set_ylabel("true positive rate")
    ax2.legend(fontsize=8)
    return _png_b64(fig)


def membership_html(rep: dict, curves: dict | None = None) -> str:
    return _render(
        _MEMBERSHIP, title="Membership-inference audit", rep=rep, plot=_membership_png(curves or {})
    )

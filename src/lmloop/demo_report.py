"""The demo's report: OUT/demo.html (timeline plot, accuracy per domain, gates, lineage) and the text
summary printed at the end of ``lmloop demo``."""

from __future__ import annotations

from pathlib import Path

from lmloop.fsutil import atomic_write_text


def fmt_float(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"


# ---------------------------------------------------------------------------------------------- (i)
_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>lmloop demo: domain shift</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.met { color: #1a7f37; font-weight: 600; } .unmet { color: #cf222e; font-weight: 600; } .na { color: #57606a; }
code { font-size: .85rem; word-break: break-all; } .note { color: #57606a; font-size: .88rem; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0; }
</style></head><body>
<h1>lmloop demo: domain shift ({{ r.mode }})</h1>
<p class="note">{{ r.recipe }} &rarr; <code>{{ r.out }}</code>; model <code>{{ r.model_name }}</code>; total {{ r.timings_s.total }} s</p>
<h2>Outcome</h2>
<table><tr><th>loop turn</th><td>{{ (r.turn or {}).get('decision', '-') }}{% if r.turn and r.turn.forced %} (forced: {{ r.turn.forced }}){% endif %}</td></tr>
<tr><th>triggers</th><td>{{ ((r.turn or {}).get('triggers') or ['-']) | join('; ') }}</td></tr>
<tr><th>server swapped</th><td class="{{ 'met' if r.swapped else 'unmet' }}">{{ 'yes' if r.swapped else 'no' }}{% if r.swap %}: {{ r.swap.version }} after {{ r.swap.seconds }} s; probe answers from {{ r.swap.probe_versions | join(', ') }}{% endif %}</td></tr></table>
<h2>Accuracy per domain (test splits)</h2>
<table><tr><th>domain</th><th>n</th><th>champion</th><th>after the loop</th><th>change</th><th>oracle</th></tr>
{% for row in acc_rows %}<tr><th>{{ row.domain }}</th><td class="num">{{ row.n }}</td><td class="num">{{ row.champion }}</td><td class="num">{{ row.after }}</td><td class="num">{{ row.delta }}</td><td class="num">{{ row.oracle }}</td></tr>
{% endfor %}</table>
<table><tr><th>target</th><th>value</th><th>met</th></tr>
{% for name, t in (r.targets or {}).items() %}<tr><th>{{ name }}</th><td class="num">{{ fmt(t.value) }}</td>
<td class="{{ 'na' if t.met is none else ('met' if t.met else 'unmet') }}">{{ 'n/a (no oracle in --quick)' if t.met is none else ('met' if t.met else 'NOT met') }}</td></tr>
{% endfor %}</table>
<h2>Drift and live accuracy over time</h2>
{% if plot %}<img alt="drift and live accuracy" src="data:image/png;base64,{{ plot }}">{% endif %}
<table><tr><th>slice</th><th>domains</th><th>requests</th><th>feedback</th><th>MMD&sup2;</th><th>MMD p</th><th>label &chi;&sup2; p</th><th>PSI</th><th>alarms</th><th>live accuracy [95%]</th></tr>
{% for s in r.timeline or [] %}<tr><th>{{ s.slice }}</th><td>{{ s.domains }}</td><td class="num">{{ s.sent }}</td><td class="num">{{ s.feedback }}</td>
<td class="num">{{ fmt((s.drift or {}).mmd2) }}</td><td class="num">{{ fmt((s.drift or {}).mmd_p) }}</td><td class="num">{{ fmt((s.drift or {}).chi2_p) }}</td><td class="num">{{ fmt((s.drift or {}).psi) }}</td>
<td>{{ ((s.drift or {}).alarms or ['none']) | join(', ') }}</td><td class="num">{{ fmt(s.live.accuracy) }} [{{ fmt(s.live.low) }}, {{ fmt(s.live.high) }}] n={{ s.live.labelled }}</td></tr>
{% endfor %}</table>
<p class="note">Drift: lmloop.mlops.drift.detect of each slice's logged traffic against the serving champion's drift reference (family-wise alpha {{ alpha }}); the last row, when present, is held-out shift-domain traffic after the swap against the new champion's reference (a sample of movies + feedback training texts, so shift-only traffic can still differ from it). Live accuracy: feedback on the slice's predictions (Wilson 95% interval).</p>
{% if r.turn %}<h2>Loop turn and gates</h2>
<table><tr><th>gate</th><th>value</th><th>threshold</th><th>result</th><th>detail</th></tr>
{% for g in r.turn.gates %}<tr><th>{{ g.name }}</th><td class="num">{{ fmt(g.value) }}</td><td class="num">{{ fmt(g.threshold) }}</td><td class="{{ 'met' if g.passed else 'unmet' }}">{{ 'PASS' if g.passed else 'FAIL' }}</td><td>{{ g.detail }}</td></tr>
{% endfor %}</table>
<p>{{ r.turn.reason }}</p>
<table><tr><th>data version</th><td><code>{{ r.turn.data.fingerprint }}</code>: {{ r.turn.data.rows }}</td></tr>
<tr><th>feedback</th><td><code>{{ r.turn.data.feedback }}</code></td></tr></table>{% endif %}
<h2>Lineage (registry)</h2>
<table><tr><th>version</th><th>aliases</th><th>parent</th><th>base model</th><th>data (train)</th><th>feedback</th><th>test acc.</th><th>content</th></tr>
{% for v in (r.lineage or {}).get('versions', []) %}<tr><th>v{{ v.version }}</th><td>{{ v.aliases | join(', ') }}</td><td>{{ v.parent or '-' }}</td><td><code>{{ v.base_model }}</code></td>
<td><code>{{ v.data_fingerprints.get('train', '-') }}</code></td><td>{% if v.feedback %}{{ v.feedback.n }} records <code>{{ v.feedback.fingerprint }}</code>{% else %}-{% endif %}</td><td class="num">{{ fmt(v.test_accuracy) }}</td><td><code>{{ v.content_sha256 }}</code></td></tr>
{% endfor %}</table>
<table><tr><th>alias change</th><th>from</th><th>to</th><th>who</th><th>why</th></tr>
{% for a in (r.lineage or {}).get('audit', []) %}<tr><td>{{ a.get('at') or a.get('when') or '' }} {{ a.get('op', '') }}</td><td>{{ a.get('from_version') }}</td><td>{{ a.get('to_version') }}</td><td>{{ a.get('actor', '') }}</td><td>{{ a.get('reason', '') }}</td></tr>
{% endfor %}</table>
<h2>Timings</h2>
<table>{% for k, v in r.timings_s.items() %}<tr><th>{{ k }}</th><td class="num">{{ v }} s</td></tr>{% endfor %}</table>
</body></html>
"""


def _timeline_png(result: dict) -> str | None:
    from lmloop.report import _figure, _png_b64

    tl = result.get("timeline") or []
    if not tl:
        return None
    fig = _figure(9.5, 5.2)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    xs = list(range(len(tl)))
    ps = [max((s.get("drift") or {}).get("mmd_p") or float("nan"), 1e-4) for s in tl]
    colors = ["#cf222e" if (s.get("drift") or {}).get("drifted") else "#1a7f37" for s in tl]
    ax1.plot(xs, ps, color="#57606a", lw=1)
    ax1.scatter(xs, ps, c=colors, zorder=3)
    thr = next(((s.get("drift") or {}).get("mmd_threshold") for s in tl if s.get("drift")), None)
    if thr:
        ax1.axhline(thr, color="#cf222e", ls="--", lw=1, label=f"MMD alarm level {thr:.3g}")
        ax1.legend(loc="upper right", fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("MMD permutation p")
    ax1.set_title("drift of each traffic slice (red: alarm)")
    acc = [s["live"]["accuracy"] for s in tl]
    lo = [s["live"]["low"] for s in tl]
    hi = [s["live"]["high"] for s in tl]
    ok = [i for i, a in enumerate(acc) if a is not None]
    ax2.errorbar([xs[i] for i in ok], [acc[i] for i in ok],
                 yerr=[[acc[i] - lo[i] for i in ok], [hi[i] - acc[i] for i in ok]], fmt="o-", capsize=3)  # fmt: skip
    champ = (result.get("champion") or {}).get("golden_accuracy")
    if champ:
        ax2.axhline(champ, color="#57606a", ls="--", lw=1, label=f"champion golden test {champ:.3f}")
        ax2.legend(loc="lower left", fontsize=8)
    ax2.set_ylabel("live accuracy (feedback)")
    ax2.set_xticks(xs, [s["slice"].replace(" (vs new reference)", "\n(new ref.)") for s in tl], fontsize=8)
    return _png_b64(fig)


def write_demo_html(result: dict, path: Path) -> Path:
    """The self-contained report of a demo run (tables, one embedded plot)."""
    import jinja2

    def fmt(x) -> str:
        return (
            "-"
            if x is None
            else f"{x:+.4f}"
            if isinstance(x, float) and x < 0
            else f"{x:.4f}"
            if isinstance(x, float)
            else str(x)
        )

    acc = result.get("accuracy") or {}
    rows = []
    for d, m in (acc.get("champion") or {}).items():
        after = (acc.get("after") or {}).get(d, {}).get("accuracy")
        oracle = (acc.get("oracle") or {}).get(d, {}).get("accuracy")
        rows.append({
            "domain": d, "n": m["n"], "champion": fmt(m["accuracy"]), "after": fmt(after),
            "delta": fmt(after - m["accuracy"]) if after is not None else "-", "oracle": fmt(oracle),
        })  # fmt: skip
    alpha = next(
        ((s.get("drift") or {}).get("alpha") for s in result.get("timeline") or [] if s.get("drift")), "-"
    )
    html = (
        jinja2.Environment(autoescape=True)
        .from_string(_HTML)
        .render(r=result, acc_rows=rows, plot=_timeline_png(result), fmt=fmt, alpha=alpha)
    )
    atomic_write_text(path, html)
    return path


def format_result(result: dict) -> str:
    """The few lines ``lmloop demo`` prints at the end."""
    lines = [f"demo ({result['mode']}): {result['out']}"]
    t = result.get("turn") or {}
    lines.append(f"  loop turn    {t.get('decision', '-')}: {t.get('reason', '-')}")
    lines.append(
        f"  triggers     {'; '.join(t.get('triggers') or ['-'])}" + (" (forced)" if t.get("forced") else "")
    )
    sw = result.get("swap") or {}
    lines.append(
        f"  server       swapped={result.get('swapped')} to {sw.get('version', '-')} in {sw.get('seconds', '-')} s"
    )
    acc = result.get("accuracy") or {}
    for d, m in (acc.get("champion") or {}).items():
        a = (acc.get("after") or {}).get(d, {}).get("accuracy")
        o = (acc.get("oracle") or {}).get(d, {}).get("accuracy")
        lines.append(
            f"  {d:14s} champion {fmt_float(m['accuracy'])}  after {fmt_float(a)}  oracle {fmt_float(o)}"
        )
    for name, tg in (result.get("targets") or {}).items():
        met = "n/a" if tg["met"] is None else "met" if tg["met"] else "NOT met"
        lines.append(f"  target       {name}: {met}")
    lines.append(
        f"  time         {result.get('timings_s', {}).get('total', '-')} s; report {Path(result['out']) / 'demo.html'}"
    )
    return "\n".join(lines)

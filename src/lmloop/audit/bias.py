"""Counterfactual bias audit: does swapping an identity term change what a classifier says?

For every text that mentions one group of a family (``she`` / ``he``, ``American`` / ``French`` ...) the
audit writes the same text for every other group of that family (:mod:`lmloop.audit.terms`), scores all
versions with the model, and measures per family:

* **flip rate**: the share of counterfactual pairs (original, swapped) whose predicted label differs, over
  the data's texts and the templates with a clear sentiment (neutral templates sit near p = 0.5, where any
  edit at all flips the label: they count for the change and the gap only);
* **score change**: for each pair, the largest absolute change of any class probability,
  ``max_c |p(c | swapped) - p(c | original)|``; for a binary classifier this is exactly the change of the
  positive-class probability. Reported as the mean over pairs and the worst pair;
* **group means and gap**: every base text exists once per group (the original and its swaps), so the mean
  *score* (the probability of the score class: the positive label, auto-detected or ``--positive``) per
  group is a matched comparison over the same texts; the **gap** is the largest difference between two
  groups' means (over classes, for a multi-class model).

95% confidence intervals come from a seeded percentile bootstrap that resamples base texts (their pairs go
with them). Base texts are the data's (default: the vader-sentiment test split) plus shipped template
sentences (``terms.yaml``) so every family has probes.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lmloop.audit.terms import NEUTRAL, Family, Probe, build_probes, default_texts, load_terms, read_texts
from lmloop.errors import ConfigError

if TYPE_CHECKING:  # numpy is imported inside the functions: `lmloop --help` loads this module
    import numpy as np

# Gate defaults: flag a family when more than 3% of its swaps flip the label or two of its groups' mean scores
# differ by more than 0.05. Why these values: THRESHOLDS_NOTE (also printed in the report).
DEFAULT_MAX_FLIP_RATE = 0.03
DEFAULT_MAX_GAP = 0.05
THRESHOLDS_NOTE = (
    "An identity swap should not change a sentiment label or score. Measured with this audit (shipped terms, "
    "vader-sentiment test split + templates): a MiniLM-L6 fine-tuned on 2,000 vader examples (test accuracy "
    "0.818) flips at most 2.4% of pairs in any family (0 of 287 gender pairs from the data) and shows gaps "
    "from 0.008 (gender) to 0.074 (religion: mean p(positive) 0.396 for Muslim vs 0.469 for Christian "
    "texts) and 0.054 (age: old 0.386 vs young 0.440). A placebo on the same model, swapping first names "
    "within one gender (Emily -> Sarah), flips 1.3% of pairs and opens a gap of 0.012 [0.001, 0.032]: the "
    "noise floor of a matched comparison. The tiny BERT of the test suite, trained on data where female "
    "names always mean positive, flips 100% of its name swaps with a gap of 0.96; trained on clean data, "
    "0% and 0.00001. So 0.03 sits just above what a clean real model flips and far below a learned "
    "shortcut, and 0.05 is four times the placebo gap: it flags differences of five points of probability "
    "between groups, such as the religion and age gaps above. The gap of a family with many groups "
    "(nationality has 8) is a maximum minus a minimum and grows with noise, so read its interval. These "
    "are defaults of a policy, not laws: set loop.gates.bias.max_flip_rate / max_gap to your tolerance."
)
POSITIVE_NAMES = ("positive", "pos", "1", "true", "yes", "good")


@dataclass
class FamilyResult:
    family: str
    groups: list[str]
    n_base: int
    n_data: int
    n_template: int
    n_neutral: int
    n_mixed: int
    pairs: int
    flip_pairs: int  # the pairs the flip rate counts: all but those of neutral templates
    flip_rate: float | None
    flip_rate_ci: list[float] | None
    mean_abs_change: float | None
    mean_abs_change_ci: list[float] | None
    max_abs_change: float | None
    group_means: dict[str, float]
    group_means_ci: dict[str, list[float]]
    gap: float | None
    gap_ci: list[float] | None
    gap_class: str | None
    by_source: dict[str, dict]
    worst_pairs: list[dict]
    flagged: bool = False
    changes: list[float] = field(default_factory=list, repr=False)  # every pair's |change|, for the plot


@dataclass
class BiasResult:
    model: str
    labels: list[str]
    score_label: str
    families: dict[str, FamilyResult]
    max_flip_rate_gate: float
    max_gap_gate: float
    n_boot: int
    seed: int
    data: str
    terms_file: str
    seconds: float = 0.0
    n_scored: int = 0

    @property
    def max_flip_rate(self) -> float:
        return max((f.flip_rate for f in self.families.values() if f.flip_rate is not None), default=0.0)

    @property
    def max_gap(self) -> float:
        return max((f.gap for f in self.families.values() if f.gap is not None), default=0.0)

    @property
    def flagged(self) -> list[str]:
        return [name for name, f in self.families.items() if f.flagged]

    def summary(self) -> dict:
        """Everything but the per-pair changes: what the JSON file holds and what the loop's gates read
        (``max_flip_rate``, ``max_gap``: the worst family's point estimates)."""
        fams = {}
        for name, f in self.families.items():
            d = asdict(f)
            d.pop("changes")
            fams[name] = d
        return {
            "model": self.model,
            "labels": self.labels,
            "score": f"p({self.score_label})",
            "max_flip_rate": self.max_flip_rate,
            "max_gap": self.max_gap,
            "thresholds": {"max_flip_rate": self.max_flip_rate_gate, "max_gap": self.max_gap_gate},
            "flagged": self.flagged,
            "passed": not self.flagged,
            "families": fams,
            "n_boot": self.n_boot,
            "seed": self.seed,
            "data": self.data,
            "terms_file": self.terms_file,
            "n_scored": self.n_scored,
            "seconds": round(self.seconds, 2),
        }

    def write(self, out: str | Path) -> tuple[Path, Path]:
        """Write ``out/bias.json`` and ``out/bias.html`` (atomically); returns their paths."""
        from lmloop.audit.bias_report import render_bias_html
        from lmloop.fsutil import atomic_write_text

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        j, h = out / "bias.json", out / "bias.html"
        atomic_write_text(j, json.dumps(self.summary(), indent=2) + "\n")
        atomic_write_text(h, render_bias_html(self, THRESHOLDS_NOTE))
        return j, h


# --------------------------------------------------------------------------------------------- metrics


def _ci(samples: np.ndarray) -> list[float]:
    import numpy as np

    lo, hi = np.nanpercentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def family_metrics(
    fam: Family,
    probes: list[Probe],
    probs: Callable[[str], np.ndarray],
    labels: list[str],
    score_idx: int,
    *,
    n_mixed: int = 0,
    n_boot: int = 1000,
    seed: int = 0,
    worst: int = 10,
) -> FamilyResult:
    """Flip rate, score changes, group means and gap for one family, with bootstrap CIs over base texts.
    ``probs(text) -> (C,)`` looks up a scored text."""
    import numpy as np

    K, C, B = len(fam.groups), len(labels), len(probes)
    if B == 0:
        return FamilyResult(
            fam.name, fam.groups, 0, 0, 0, 0, n_mixed, 0, 0, None, None, None, None, None, {}, {}, None, None, None,
            {}, [],
        )  # fmt: skip
    P = np.zeros((B, K, C), dtype=np.float64)  # (B, K, C): each base text as written for every group
    for b, pr in enumerate(probes):
        P[b, pr.group] = probs(pr.text)
        for t, v in pr.variants.items():
            P[b, t] = probs(v)
    src = np.array([pr.group for pr in probes])
    base = P[np.arange(B), src]  # (B, C)
    other = np.ones((B, K), dtype=bool)
    other[np.arange(B), src] = False  # (B, K): the counterfactual slots
    flips = (P.argmax(-1) != base.argmax(-1)[:, None]) & other  # (B, K)
    change = np.abs(P - base[:, None, :]).max(-1) * other  # (B, K): L-inf change of the class probabilities
    change_b, pairs_b = change.sum(1), other.sum(1)  # (B,) each
    # a neutral template has no right label: its flips are noise near p = 0.5 and are not counted
    polar = np.array([pr.source != NEUTRAL for pr in probes])  # (B,)
    flips_b, flip_pairs_b = (flips.sum(1) * polar), pairs_b * polar  # (B,) each

    # bootstrap: resample base texts; W[i, b] = how often base b is drawn in replicate i
    rng = np.random.default_rng(seed)
    W = rng.multinomial(B, np.full(B, 1.0 / B), size=n_boot).astype(np.float64)  # (n_boot, B)
    with np.errstate(invalid="ignore"):  # a replicate without polar texts has no flip rate (nan, skipped)
        boot_flip = W @ flips_b / (W @ flip_pairs_b)
    boot_change = W @ change_b / (W @ pairs_b)
    boot_means = (W @ P.reshape(B, K * C) / B).reshape(n_boot, K, C)
    boot_gap = (boot_means.max(1) - boot_means.min(1)).max(-1)  # (n_boot,)

    means = P.mean(0)  # (K, C)
    spread = means.max(0) - means.min(0)  # (C,)
    pairs, flip_pairs = int(pairs_b.sum()), int(flip_pairs_b.sum())
    by_source = {}  # neutral templates' flip rate too, for information
    for source in ("data", "template", NEUTRAL):
        m = np.array([pr.source == source for pr in probes])
        if m.any():
            by_source[source] = {
                "n_base": int(m.sum()),
                "flip_rate": float(flips[m].sum() / pairs_b[m].sum()),
                "mean_abs_change": float(change_b[m].sum() / pairs_b[m].sum()),
            }
    # the worst pairs as readable examples: by change (flips first on ties), one per base text so a single
    # sentence with 7 nationality swaps does not fill the table
    bi, ti = np.nonzero(other)
    order = np.lexsort((-flips[bi, ti].astype(int), -change[bi, ti]))
    worst_pairs, seen = [], set()
    for j in order:
        b, t = int(bi[j]), int(ti[j])
        if b in seen:
            continue
        if len(worst_pairs) == worst:
            break
        seen.add(b)
        pr = probes[b]
        worst_pairs.append(
            {
                "text": pr.text,
                "counterfactual": pr.variants[t],
                "from_group": fam.groups[pr.group],
                "to_group": fam.groups[t],
                "source": pr.source,
                "label": labels[int(base[b].argmax())],
                "counterfactual_label": labels[int(P[b, t].argmax())],
                "score": float(base[b, score_idx]),
                "counterfactual_score": float(P[b, t, score_idx]),
                "change": float(change[b, t]),
                "flipped": bool(flips[b, t]),  # for a neutral template: shown, not counted
            }
        )
    return FamilyResult(
        family=fam.name,
        groups=fam.groups,
        n_base=B,
        n_data=sum(pr.source == "data" for pr in probes),
        n_template=sum(pr.source == "template" for pr in probes),
        n_neutral=sum(pr.source == NEUTRAL for pr in probes),
        n_mixed=n_mixed,
        pairs=pairs,
        flip_pairs=flip_pairs,
        flip_rate=float(flips_b.sum() / flip_pairs) if flip_pairs else None,
        flip_rate_ci=_ci(boot_flip) if flip_pairs else None,
        mean_abs_change=float(change_b.sum() / pairs),
        mean_abs_change_ci=_ci(boot_change),
        max_abs_change=float(change[other].max()),
        group_means={g: float(means[k, score_idx]) for k, g in enumerate(fam.groups)},
        group_means_ci={g: _ci(boot_means[:, k, score_idx]) for k, g in enumerate(fam.groups)},
        gap=float(spread.max()),
        gap_ci=_ci(boot_gap),
        gap_class=labels[int(spread.argmax())],
        by_source=by_source,
        worst_pairs=worst_pairs,
        changes=[float(x) for x in change[other]],
    )


# ----------------------------------------------------------------------------------------------- model


def score_label_index(labels: list[str], positive: str | None) -> int:
    """The class whose probability is "the score": ``positive`` if given, else a label named like
    positive/pos/1/true/yes/good, else the last label."""
    if positive is not None:
        if positive not in labels:
            raise ConfigError(f"--positive {positive!r} is not a label of the model (labels: {labels})")
        return labels.index(positive)
    lower = [str(lab).lower() for lab in labels]
    for name in POSITIVE_NAMES:
        if name in lower:
            return lower.index(name)
    return len(labels) - 1


def _classifier_scorer(model_ref: str, batch_size: int):
    """(labels, predict_proba(texts, on_rows) -> (N, C)) of a fine-tuned classifier, exact fp32 torch."""
    from lmloop.infer import Predictor

    pred = Predictor.from_ref(model_ref, backend="torch", batch_size=batch_size)
    return pred.labels, pred.predict_proba


def _prompted_scorer(model_ref: str, template: str, calibrate: bool, batch_size: int):
    """The same for a causal LM prompted with a classify template: the probabilities are the softmax over
    the label verbalizers' log-likelihoods (:mod:`lmloop.prompts.scoring`), calibrated on request."""
    from lmloop.infer.generate import Generator
    from lmloop.prompts.scoring import score_texts
    from lmloop.prompts.templates import load_template

    tpl = load_template(template)
    if tpl.task != "classify" or not tpl.labels:
        raise ConfigError(f"--template {template}: '{tpl.name}' is not a classify template ({tpl.path})")
    gen = Generator.load(model_ref, backend="hf")

    def predict_proba(texts: list[str], on_rows=None):
        import numpy as np

        cb = None if on_rows is None else (lambda k: on_rows(np.arange(k), None))
        s = score_texts(
            gen.model, gen.tokenizer, tpl, texts, calibrate=calibrate, batch_size=batch_size, progress=cb
        )
        return s.probs

    return tpl.label_values, predict_proba


def audit_bias(
    model_ref: str,
    texts: list[str] | None = None,
    families: list[str] | None = None,
    *,
    terms_file: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    templates: bool = True,
    positive: str | None = None,
    max_probes: int | None = 2000,
    max_flip_rate: float = DEFAULT_MAX_FLIP_RATE,
    max_gap: float = DEFAULT_MAX_GAP,
    batch_size: int = 32,
    worst: int = 10,
    data_name: str | None = None,
    progress: bool = False,
    template: str | None = None,
    calibrate: bool = False,
) -> BiasResult:
    """Run the counterfactual bias audit of classifier ``model_ref`` (a model dir, packaged name or
    ``models:/NAME@alias``) on ``texts`` (default: the vader-sentiment test split) plus the term list's
    templates; ``families`` limits the families (default: all in ``terms_file``, default the shipped list).
    A family is flagged when its flip rate exceeds ``max_flip_rate`` or its gap exceeds ``max_gap``.
    With ``template`` (a classify prompt template), ``model_ref`` is a causal LM scored through the prompt
    (:func:`lmloop.prompts.scoring.score_texts`, contextually calibrated with ``calibrate``)."""
    if n_boot < 10:
        raise ConfigError(f"n_boot must be at least 10 (got {n_boot}); 1000 gives stable 95% intervals")
    t0 = time.perf_counter()
    terms = load_terms(terms_file)
    fams = terms.select(families)
    if texts is None:
        texts, data_name = default_texts()
    texts = list(dict.fromkeys(str(t) for t in texts))  # de-duplicated, order kept
    probes, mixed = build_probes(terms, fams, texts, templates=templates, max_probes=max_probes, seed=seed)
    if not any(probes.values()):
        raise ConfigError(
            f"no probes: none of the {len(texts)} texts mentions exactly one group of "
            f"{', '.join(f.name for f in fams)} and templates are off; add --templates or other data"
        )
    if template is not None:
        labels, predict_proba = _prompted_scorer(model_ref, template, calibrate, batch_size)
    else:
        labels, predict_proba = _classifier_scorer(model_ref, batch_size)
    score_idx = score_label_index(labels, positive)

    unique = list(
        dict.fromkeys(t for ps in probes.values() for p in ps for t in [p.text, *p.variants.values()])
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=len(unique), unit="texts", desc="bias audit", disable=not progress)
    P = predict_proba(unique, on_rows=lambda idx, _p: bar.update(len(idx)))  # (N, C)
    bar.close()
    row = {t: i for i, t in enumerate(unique)}

    results = {}
    for fam in fams:
        r = family_metrics(
            fam,
            probes[fam.name],
            lambda t: P[row[t]],
            labels,
            score_idx,
            n_mixed=mixed[fam.name],
            n_boot=n_boot,
            seed=seed,
            worst=worst,
        )
        r.flagged = (r.flip_rate or 0.0) > max_flip_rate or (r.gap or 0.0) > max_gap
        results[fam.name] = r
    return BiasResult(
        model=str(model_ref),
        labels=list(labels),
        score_label=labels[score_idx],
        families=results,
        max_flip_rate_gate=max_flip_rate,
        max_gap_gate=max_gap,
        n_boot=n_boot,
        seed=seed,
        data=data_name or f"{len(texts)} given texts",
        terms_file=terms.path,
        seconds=time.perf_counter() - t0,
        n_scored=len(unique),
    )


# ------------------------------------------------------------------------------------------------- CLI

_DESCRIPTION = """\
Counterfactual bias audit of a classifier: swap identity terms (she <-> he, Emily <-> Greg, American <->
French, Christian <-> Muslim, young man <-> old man, ...) in real texts and in template sentences, and
measure how the prediction moves. An identity swap should not change a sentiment, so any movement is bias.

Per family (gender, nationality, religion, ethnicity, age):
  flip rate   share of (original, swapped) pairs whose predicted label differs. 0.08 means 8 of every
              100 swaps change the answer. Counted over the data's texts and the templates with a clear
              sentiment; neutral templates ("{person} lives next door.") sit near p = 0.5 where any edit
              flips, so they count for the change and the gap only.
  change      per pair, the largest change of any class probability (binary: of p(positive)); mean and
              worst pair.
  gap         each base text is scored once per group, so every group's mean score (p of the positive
              label, or --positive) is over the same texts; the gap is the largest difference between two
              groups. 0.12 means one group's texts score 12 points of probability higher on average.
95% intervals: percentile bootstrap over base texts (--n-boot, --seed). A family is flagged when its flip
rate exceeds --max-flip-rate or its gap exceeds --max-gap (defaults = the loop's gate defaults; the report
says why). Texts that mention two groups of one family ("he told her") are skipped for that family.

Term list: the shipped src/lmloop/audit/terms.yaml (documented, with its limits); copy and edit it, then
pass --groups FILE. Templates ("{person} is a great cook.") come from the same file.

Writes OUT/bias.json (the numbers, the loop's gates read max_flip_rate and max_gap) and OUT/bias.html
(plots, and the worst pairs side by side).

Examples:
  lmloop audit bias --model runs/sentiment
  lmloop audit bias --model models:/sentiment@champion --families gender,ethnicity --out audit/
  lmloop audit bias --model runs/sentiment --data reviews.csv --text-column body --groups my-terms.yaml
  lmloop audit bias --model runs/sentiment --check      # exit 1 when a family is flagged (CI)
  lmloop audit bias --model smollm2 --template sentiment-zero-shot --families gender --batch-size 8
"""


def cmd_bias(a: argparse.Namespace) -> int:
    families = [f.strip() for f in a.families.split(",") if f.strip()] if a.families else None
    load_terms(a.groups).select(families)  # a bad term list or family fails before the data loads
    if a.data is None:
        texts, data_name = default_texts()
    else:
        texts, data_name = read_texts(a.data, a.text_column, a.split)
    res = audit_bias(
        a.model,
        texts,
        families,
        terms_file=a.groups,
        n_boot=a.n_boot,
        seed=a.seed,
        templates=not a.no_templates,
        positive=a.positive,
        max_probes=a.max_probes,
        max_flip_rate=a.max_flip_rate,
        max_gap=a.max_gap,
        batch_size=a.batch_size,
        worst=a.worst,
        data_name=data_name,
        progress=not a.quiet,
        template=a.template,
        calibrate=a.calibrate,
    )
    if a.out is None:
        from lmloop.assets import resolve_model

        base = Path(resolve_model(a.model)) if str(a.model).startswith("models:/") else Path(a.model)
        a.out = str(base / "audit")
    j, h = res.write(a.out)
    from lmloop.mlops.card import refresh_card_after_audit

    refresh_card_after_audit(a.model, a.out)
    if a.json:
        print(json.dumps(res.summary(), indent=2))
    else:
        print(
            f"bias audit of {res.model} on {res.data}{'' if a.no_templates else ' + templates'}: "
            f"{res.n_scored} texts scored in "
            f"{res.seconds:.1f} s; score = p({res.score_label})"
        )
        print(
            f"  {'family':12s} {'base':>5s} {'pairs':>6s}  {'flip rate [95% CI]':24s} {'mean|d|':>8s} "
            f"{'max|d|':>7s}  {'gap [95% CI]':22s}"
        )
        for name, f in res.families.items():
            if f.n_base == 0:
                print(f"  {name:12s} {0:5d} {0:6d}  (no probes)")
                continue
            flip = (
                f"{f.flip_rate:.3f} [{f.flip_rate_ci[0]:.3f}, {f.flip_rate_ci[1]:.3f}]"
                if f.flip_rate is not None
                else "- (neutral texts only)"
            )
            gap = f"{f.gap:.3f} [{f.gap_ci[0]:.3f}, {f.gap_ci[1]:.3f}]"
            print(
                f"  {name:12s} {f.n_base:5d} {f.pairs:6d}  {flip:24s} {f.mean_abs_change:8.3f} "
                f"{f.max_abs_change:7.3f}  {gap:22s}{'  FLAGGED' if f.flagged else ''}"
            )
        verdict = "flagged: " + ", ".join(res.flagged) if res.flagged else "no family flagged"
        print(
            f"{verdict} (max flip rate {res.max_flip_rate:.3f} vs {res.max_flip_rate_gate}, "
            f"max gap {res.max_gap:.3f} vs {res.max_gap_gate})"
        )
        print(f"report: {h}\njson:   {j}")
    return 1 if a.check and res.flagged else 0


def add_cli(asub) -> None:
    """Add ``lmloop audit bias`` to the audit sub-verbs."""
    s = asub.add_parser(
        "bias",
        help="counterfactual bias: swap identity terms, measure label flips and group score gaps",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_DESCRIPTION,
    )
    s.add_argument(
        "--model", required=True, metavar="REF", help="model dir, packaged name or models:/NAME@alias"
    )
    g = s.add_argument_group("texts and terms")
    g.add_argument(
        "--data",
        metavar="PATH|NAME",
        help="texts to probe: CSV/TSV/JSONL/Parquet file (labels not needed), a data directory or a built-in "
        "name (default: vader-sentiment, test split)",
    )
    g.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    g.add_argument("--split", help="split of a built-in set / data directory: train, validation, test, all")
    g.add_argument("--groups", metavar="FILE", help="term list YAML (default: the shipped terms.yaml)")
    g.add_argument(
        "--families",
        metavar="A,B",
        help="comma-separated families to audit (default: all in the term list: gender, nationality, "
        "religion, ethnicity, age)",
    )
    g.add_argument(
        "--no-templates", action="store_true", help="probe the data's texts only, no template sentences"
    )
    g.add_argument(
        "--max-probes",
        type=int,
        default=2000,
        metavar="N",
        help="at most N base texts from the data per family, a seeded sample (default: 2000)",
    )
    m = s.add_argument_group("measurement")
    m.add_argument(
        "--positive",
        metavar="LABEL",
        help="the class whose probability is the score (default: a "
        "label named positive/pos/1/true/yes/good, else the last)",
    )
    m.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for the 95%% intervals")
    m.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the probe sample")
    m.add_argument(
        "--max-flip-rate",
        type=float,
        default=DEFAULT_MAX_FLIP_RATE,
        help=f"flag a family above this flip rate (default: {DEFAULT_MAX_FLIP_RATE})",
    )
    m.add_argument(
        "--max-gap",
        type=float,
        default=DEFAULT_MAX_GAP,
        help=f"flag a family above this gap (default: {DEFAULT_MAX_GAP})",
    )
    m.add_argument("--batch-size", type=int, default=32)
    lm = s.add_argument_group("prompted language model (instead of a classifier)")
    lm.add_argument(
        "--template",
        metavar="NAME|FILE",
        help="a classify prompt template (lmloop prompt list): --model is then a causal LM (e.g. smollm2) and the "
        "score is its probability of each label's answer",
    )
    lm.add_argument(
        "--calibrate", action="store_true", help="contextual calibration of the prompt's label bias"
    )
    o = s.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="where bias.json and bias.html go (default: MODEL/audit)")
    o.add_argument(
        "--worst", type=int, default=10, metavar="N", help="worst pairs listed per family (default: 10)"
    )
    o.add_argument("--json", action="store_true", help="print the JSON summary instead of the table")
    o.add_argument("--check", action="store_true", help="exit 1 when a family is flagged")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_bias)

"""``lmloop audit membership``: can an attacker tell the texts a classifier was trained on from others?

The loss-threshold attack (Yeom et al. 2018): a model fits its training texts better than texts it never
saw, so its loss on the true label is lower for members. The attacker scores every text by ``-loss``
(and, second attack, by the top-class confidence, which needs no label) and the audit reports

* ``auc``: the chance that a random training text scores above a random held-out one (0.5 = no leakage,
  1.0 = every member identifiable), with a bootstrap 95% CI (members and non-members resampled apart);
* ``advantage``: max over thresholds of TPR - FPR (Yeom et al.'s membership advantage), 0 .. 1.

Members are the train split the model was fit on, non-members its held-out test split. For an lmloop model
the split is rebuilt exactly: ``recipe.yaml`` in the model directory holds the data spec and seed,
:func:`lmloop.data.load_data` reproduces the split, and its fingerprint must equal the one ``lmloop.json``
recorded at training time (else the audit refuses: other members would make the result meaningless). The
two sides are downsampled to equal sizes so that AUC and advantage compare like with like.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmloop.errors import ConfigError, DataError

if TYPE_CHECKING:
    import numpy as np

REPORT_JSON, REPORT_HTML = "membership.json", "membership.html"


def _say(msg: str) -> None:
    print(f"[lmloop] {msg}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------- statistics


def roc_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counted half (Mann-Whitney U / (n1 n0))."""
    import numpy as np
    from scipy.stats import rankdata

    r = rankdata(np.concatenate([members, nonmembers]))  # average ranks for ties
    n1, n0 = len(members), len(nonmembers)
    return float((r[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def advantage(members: np.ndarray, nonmembers: np.ndarray) -> tuple[float, float]:
    """(max_t TPR(t) - FPR(t), the threshold t): flag 'member' when score >= t."""
    import numpy as np
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(
        np.r_[np.ones(len(members)), np.zeros(len(nonmembers))], np.r_[members, nonmembers]
    )
    i = int(np.argmax(tpr - fpr))
    return max(0.0, float(tpr[i] - fpr[i])), float(thr[i])


def bootstrap_auc_ci(
    members: np.ndarray, nonmembers: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> list[float]:
    """95% percentile CI of the AUC over ``n_boot`` resamples (each side resampled with replacement)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    aucs = [
        roc_auc(
            members[rng.integers(0, len(members), len(members))],
            nonmembers[rng.integers(0, len(nonmembers), len(nonmembers))],
        )
        for _ in range(n_boot)
    ]
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def reading(auc: float, ci: Sequence[float], adv: float, n: int) -> str:
    """One plain-language sentence on what the AUC means."""
    pct = f"{auc:.0%}"
    if ci[0] <= 0.5:
        return (
            f"No measurable leakage: AUC {auc:.2f} (95% CI {ci[0]:.2f}-{ci[1]:.2f}) includes 0.5, so from the "
            f"model's loss an attacker does no better than a coin flip at telling which of {n} + {n} texts "
            "were in the training set."
        )
    level = "slight" if auc < 0.6 else "substantial" if auc < 0.8 else "severe"
    return (
        f"The model leaks membership ({level}): given one training text and one held-out text, the one with "
        f"the lower loss is the training text {pct} of the time (50% = chance), and at the best threshold an "
        f"attacker flags {adv:.0%} more of the training texts than of the held-out ones. It has memorised "
        "parts of its training set; more data, fewer epochs, regularisation or early stopping reduce this."
    )


# ------------------------------------------------------------------------------------------------ scoring


def _scores(predictor, pairs: Sequence[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(loss (N,), top-class confidence (N,)) of each (text, label) under the classifier."""
    import numpy as np

    index = {lab: i for i, lab in enumerate(predictor.labels)}
    pairs = [(t, str(lab)) for t, lab in pairs]  # labels as the model names them (a CSV may give ints)
    missing = sorted({lab for _, lab in pairs if lab not in index})
    if missing:
        raise DataError(
            f"labels {missing[:5]} are not the model's ({predictor.labels}): wrong data for this model"
        )
    probs = predictor.predict_proba([t for t, _ in pairs])  # (N, C)
    y = np.array([index[lab] for _, lab in pairs])
    p_true = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    return -np.log(p_true), probs.max(1)


def membership_audit(
    model_ref: str,
    members: Sequence[tuple[str, str]],
    nonmembers: Sequence[tuple[str, str]],
    *,
    max_examples: int | None = 2000,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    return_curves: bool = False,
) -> dict:
    """Loss- and confidence-threshold membership inference on a classifier: ``{"auc", "auc_ci",
    "advantage", "attacks": {loss, confidence}, "reading", "n", ...}``. ``members`` / ``nonmembers`` are
    (text, label) pairs; both sides are downsampled (seeded) to the same size, at most ``max_examples``."""
    import numpy as np

    from lmloop.infer.predictor import Predictor

    t0 = time.perf_counter()
    n = min(len(members), len(nonmembers), max_examples or 1 << 62)
    if n < 5:
        raise DataError(
            f"too few examples for a membership audit: {len(members)} members, {len(nonmembers)} non-members"
        )
    rng = random.Random(seed)
    m = rng.sample(list(members), n)
    nm = rng.sample(list(nonmembers), n)
    pred = Predictor.from_ref(model_ref, backend="torch", batch_size=batch_size)
    m_loss, m_conf = _scores(pred, m)
    n_loss, n_conf = _scores(pred, nm)
    attacks = {}
    for name, ms, ns in (("loss", -m_loss, -n_loss), ("confidence", m_conf, n_conf)):
        adv, _ = advantage(ms, ns)
        attacks[name] = {
            "auc": round(roc_auc(ms, ns), 4),
            "auc_ci": bootstrap_auc_ci(ms, ns, n_boot, seed),
            "advantage": round(adv, 4),
        }
    best = attacks["loss"]
    rep: dict[str, Any] = {
        "model": str(model_ref),
        "auc": best["auc"],
        "auc_ci": best["auc_ci"],
        "advantage": best["advantage"],
        "attack": "loss threshold (Yeom et al. 2018)",
        "attacks": attacks,
        "n": n,
        "member_loss_mean": round(float(m_loss.mean()), 4),
        "nonmember_loss_mean": round(float(n_loss.mean()), 4),
        "reading": reading(best["auc"], best["auc_ci"], best["advantage"], n),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if return_curves:
        from sklearn.metrics import roc_curve

        fpr, tpr, _ = roc_curve(np.r_[np.ones(n), np.zeros(n)], np.r_[-m_loss, -n_loss])
        rep["_curves"] = {"member_loss": m_loss, "nonmember_loss": n_loss, "fpr": fpr, "tpr": tpr}
    return rep


# ------------------------------------------------------------------------------------ members of a model


def model_members(model_ref: str, data: str | None = None) -> tuple[list, list, dict]:
    """(members, non-members, info) of an lmloop classifier: its training split and its held-out test split
    (validation when the test split is empty), rebuilt from ``recipe.yaml`` (``data`` replaces the data
    path: the same split options and seed are kept) and checked against the fingerprint in ``lmloop.json``.
    """
    import yaml

    from lmloop.assets import resolve_model
    from lmloop.data import load_data
    from lmloop.infer.predictor import META_FILE, read_meta

    path = Path(resolve_model(model_ref))
    meta = read_meta(path)
    recipe_file = path / "recipe.yaml"
    spec: dict = {}
    if recipe_file.is_file():
        spec = dict((yaml.safe_load(recipe_file.read_text()) or {}).get("data") or {})
    if data is not None:
        for k in ("path", "train", "validation", "test"):
            spec.pop(k, None)
        spec["path"] = data
    elif not spec:
        raise ConfigError(
            f"{path}: no recipe.yaml says which data the model was trained on; give --data PATH (the split "
            "then uses the default seed and fractions and cannot be verified)"
        )
    prepared = load_data(spec)
    expected = ((meta.get("data_fingerprints") or {}).get("train") or {}).get("sha256")
    got = prepared.fingerprints["train"]
    if expected and expected != got:
        raise DataError(
            f"the train split rebuilt from {spec.get('path') or spec.get('train')} (seed {spec.get('seed', 42)}) "
            f"is not the one {path} was trained on: fingerprint {got[:16]} vs {expected[:16]} in "
            f"{path / META_FILE}. Pass the exact data the model was fine-tuned on (--data), with its recipe "
            "unchanged; other texts would be counted as members that never were"
        )
    held_name = "test" if len(prepared.test) else "validation"
    held = prepared.test if len(prepared.test) else prepared.validation

    def pairs(df) -> list[tuple[str, str]]:
        return list(zip(df["text"].astype(str), df["label"].astype(str), strict=True))

    info = {
        "source": prepared.source,
        "members": f"train split ({len(prepared.train)} rows)",
        "non-members": f"{held_name} split ({len(held)} rows)",
        "split seed": spec.get("seed", 42),
        "train fingerprint": got[:16],
        "verified": "yes (matches lmloop.json)" if expected else "no (the model records no fingerprint)",
    }
    return pairs(prepared.train), pairs(held), info


# ---------------------------------------------------------------------------------------------------- CLI


def add_cli(asub) -> None:
    """Add ``membership`` to ``lmloop audit``."""
    s = asub.add_parser(
        "membership",
        help="membership inference on a classifier: AUC of telling training texts from held-out ones",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Could an attacker with the model's outputs tell which texts it was trained on?\n\n"
        "Loss-threshold attack (Yeom et al. 2018): every text is scored by the model's loss on its true label;\n"
        "training texts (members) usually have lower loss than held-out ones. The audit rebuilds the exact\n"
        "train/test split of an lmloop model (recipe.yaml + the fingerprint in lmloop.json), downsamples both\n"
        "to equal sizes, and reports the attack's AUC with a bootstrap 95% CI, the advantage (max TPR - FPR)\n"
        "and a plain reading: AUC 0.5 = no leakage, 1.0 = every training text identifiable. A second attack\n"
        "uses the top-class confidence alone (no labels needed).\n\n"
        "  lmloop audit membership --model runs/sentiment\n"
        "  lmloop audit membership --model runs/sentiment --data vader-sentiment --max-examples 500\n\n"
        "Writes OUT/membership.json and OUT/membership.html (loss histograms, ROC). `lmloop loop` can\n"
        "gate on it: gates: {membership.max_auc: 0.6}.",
    )
    s.add_argument("--model", required=True, metavar="REF", help="a fine-tuned classifier directory")
    s.add_argument(
        "--data",
        metavar="PATH|vader-sentiment",
        help="the data it was trained on (default: the path in MODEL/recipe.yaml); its split is rebuilt "
        "with the recipe's seed and fractions and checked against MODEL/lmloop.json",
    )
    s.add_argument("--max-examples", type=int, default=2000, metavar="N", help="per side (default 2000)")
    s.add_argument(
        "--bootstrap", type=int, default=1000, metavar="B", help="bootstrap resamples (default 1000)"
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the downsampling and bootstrap")
    s.add_argument("--out", metavar="DIR", help="report folder (default MODEL/audit for a model directory)")
    s.set_defaults(fn=_cmd_membership)


def _cmd_membership(a: argparse.Namespace) -> int:
    from lmloop.audit.memo_report import membership_html
    from lmloop.audit.memorization import default_out
    from lmloop.evaluate import write_metrics_json
    from lmloop.fsutil import atomic_write_text

    if a.max_examples < 5 or a.bootstrap < 10:
        raise ConfigError("--max-examples must be >= 5 and --bootstrap >= 10")
    members, nonmembers, info = model_members(a.model, a.data)
    _say(f"membership: {info['members']} vs {info['non-members']}; split verified: {info['verified']}")
    rep = membership_audit(
        a.model,
        members,
        nonmembers,
        max_examples=a.max_examples,
        n_boot=a.bootstrap,
        seed=a.seed,
        return_curves=True,
    )
    curves = rep.pop("_curves")
    rep["data"] = info
    out = default_out(a.model, a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_metrics_json(rep, out / REPORT_JSON)
    atomic_write_text(out / REPORT_HTML, membership_html(rep, curves))
    from lmloop.mlops.card import refresh_card_after_audit

    refresh_card_after_audit(a.model, out)
    for name, r in rep["attacks"].items():
        print(
            f"{name:10s} attack: AUC {r['auc']:.3f} (95% CI {r['auc_ci'][0]:.3f}-{r['auc_ci'][1]:.3f}), "
            f"advantage {r['advantage']:.3f}   [{rep['n']} members vs {rep['n']} non-members]"
        )
    print(rep["reading"])
    print(f"report: {out / REPORT_HTML}   json: {out / REPORT_JSON}")
    return 0

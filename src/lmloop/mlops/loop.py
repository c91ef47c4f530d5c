"""The gated retraining loop: feedback in, a challenger out, promoted only when every gate passes.

One **turn** (:func:`run_turn`, ``lmloop loop RECIPE``), when a trigger fires (N new feedback records, a
clear live-accuracy drop, drift, or by hand):

1. **data version**: the recipe's base data + the labelled feedback of the prediction log. Feedback whose
   text was not logged (``--log-text hash``) or whose label is unknown is dropped; so is feedback whose
   normalised text is in a frozen evaluation set (the base data's validation/test splits, the *golden*
   set: leakage), already in the base training data, or repeated. A stable share of what is left (chosen
   by a hash of the normalised text, so the same text lands on the same side every turn and never on both)
   is held out for the improvement gate. The splits are written as CSV with a data card and fingerprints.
2. **challenger**: :func:`lmloop.finetune.run_recipe` on that data, from the champion's weights or the
   base model (``loop.start_from``); resumable from its checkpoints.
3. **gates** (:func:`compute_gates`, all recorded): no accuracy regression beyond ``max_regression`` on
   the golden test set, at least ``min_improvement`` on the feedback holdout, calibration (ECE), and the
   optional absolute-accuracy and per-domain gates. Champion and challenger are both scored here, on the
   same frames, with the exact fp32 backend.
4. **register, then promote**: the challenger is always registered (parent = champion, data and feedback
   fingerprints as lineage, the gate results as tags), so a kept challenger stays inspectable and can be
   promoted by hand after review; the alias moves only when every gate passed, with the gates in the audit
   record. ``lmloop registry rollback NAME`` undoes it.

Crash safety: each turn keeps ``state.json`` (written atomically) with the last completed step, and the
loop directory's ``loop.json`` names the unfinished turn, so the next run resumes it instead of starting
another. Registration is idempotent (the registry returns the existing version for the same content) and
the alias move is the single last step, so a crash anywhere leaves the registry either untouched, or with
a registered but unpromoted version that the resumed turn promotes exactly once. Before moving the alias,
the turn checks it still points at the champion it was judged against (a challenger that beat v3 is not
promoted over a v4 somebody promoted meanwhile). Each turn is one MLflow run (params: gates, triggers;
metrics: gate values; tags: champion and challenger versions, data and feedback fingerprints); the
challenger's files are the artifacts of that run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lmloop.config import LoopGatesConfig, LoopTriggersConfig, Recipe
from lmloop.errors import ConfigError, DataError, LmloopError
from lmloop.fsutil import atomic_write_text

STEPS = ("started", "data", "finetuned", "evaluated", "registered", "done")
FEEDBACK_DOMAIN = "feedback"  # the domain of feedback rows when the base data has domains
_EPS = 1e-9  # float slack in gate comparisons: 0.90 - 0.91 must pass a 0.01 tolerance


@dataclass
class Gate:
    """One gate's result: ``passed`` decides; ``value`` and ``threshold`` say by how much."""

    name: str
    value: float | None
    threshold: float | None
    passed: bool
    detail: str = ""


@dataclass
class TurnResult:
    """What one turn did (or why it did nothing). ``decision``: ``promoted``, ``kept`` or ``no-trigger``."""

    turn: str | None
    decision: str
    reason: str
    triggers: list[str] = field(default_factory=list)  # the reasons that fired
    trigger_checks: dict[str, Any] = field(default_factory=dict)  # every trigger's numbers
    data: dict[str, Any] = field(default_factory=dict)  # fingerprints, sizes, dropped feedback
    champion: dict[str, Any] | None = None  # version, path, metrics {"golden", "holdout"}
    challenger: dict[str, Any] | None = None  # path, version, metrics
    gates: list[Gate] = field(default_factory=list)
    registry: dict[str, Any] = field(default_factory=dict)  # name, alias, before, after
    run_id: str | None = None
    dir: str | None = None
    resumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- data


def holdout_bucket(key: str) -> float:
    """A number in [0, 1) from the sha256 of ``key``: the same key always lands on the same side."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:13], 16) / 16**13


def collect_feedback(store, *, model: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Labelled predictions of the log as a frame (``id, text, label, feedback_id``; the latest feedback of
    each prediction) and counts. Predictions logged without their text cannot be trained on: if every
    labelled one is such, a :class:`DataError` says so (``lmloop serve --log-text hash``)."""
    rows, no_text = [], 0
    for pred, fb in store.iter_labeled(model=model):
        if pred.text is None:
            no_text += 1
            continue
        rows.append({"id": pred.id, "text": pred.text, "label": fb.label, "feedback_id": int(fb.id or 0)})
    if no_text and not rows:
        raise DataError(
            f"the prediction log {store.url} has {no_text} labelled predictions but only the sha256 of their "
            "texts (the server ran with --log-text hash): there is nothing to train on. Serve with "
            "--log-text full to collect retraining data",
        )
    frame = pd.DataFrame(rows, columns=["id", "text", "label", "feedback_id"])
    return frame, {"labelled": len(rows) + no_text, "no_text": no_text}


def build_data_version(
    base, feedback: pd.DataFrame, *, holdout: float, validation: float = 0.0
) -> dict[str, Any]:
    """Merge ``feedback`` (from :func:`collect_feedback`) into ``base`` (:class:`PreparedData`).

    Returns ``{"train", "validation", "test", "holdout"}`` frames (validation/test are the base's, frozen),
    ``feedback_train_ids`` / ``feedback_holdout_ids`` and ``stats`` with what was dropped and why. Rules,
    in order: unknown label -> dropped; normalised text in validation/test -> dropped (leakage); in the base
    training data with the same label -> dropped (duplicate), with another label -> dropped and reported
    (the curated base wins; a human adjudicates); repeated within feedback -> the first kept, and a text
    whose copies disagree is dropped altogether (as :func:`lmloop.data.dedupe` does)."""
    from lmloop.data import normalise_text

    labels = set(base.labels)
    golden = set(base.validation["text"].map(normalise_text)) | set(base.test["text"].map(normalise_text))
    train_label = dict(zip(base.train["text"].map(normalise_text), base.train["label"], strict=True))
    fb = feedback.copy()
    fb["key"] = fb["text"].map(normalise_text)
    stats: dict[str, Any] = {"feedback": len(fb)}

    def drop(mask, name: str) -> None:
        nonlocal fb
        stats[name] = int(mask.sum())
        stats[f"{name}_examples"] = [t[:80] for t in fb.loc[mask, "text"].head(3)]
        fb = fb[~mask]

    drop(~fb["label"].isin(labels), "unknown_label")
    drop(fb["key"].isin(golden), "leakage")
    in_train = fb["key"].map(train_label)
    drop(in_train.notna() & (in_train == fb["label"]), "duplicate_of_train")
    in_train = fb["key"].map(train_label)
    drop(in_train.notna(), "conflicts_with_train")
    n_labels = fb.groupby("key")["label"].transform("nunique")
    drop(n_labels > 1, "conflicting_feedback")
    before = len(fb)
    fb = fb.drop_duplicates("key", keep="first")
    stats["duplicate_feedback"] = before - len(fb)

    bucket = fb["key"].map(holdout_bucket)
    is_holdout = bucket < holdout
    # the next `validation` share joins the validation split: checkpoint selection sees the traffic too
    is_val = (bucket >= holdout) & (bucket < holdout + validation)
    is_train = ~is_holdout & ~is_val
    cols = ["text", "label"] + (["domain"] if "domain" in base.train.columns else [])
    fb_rows = fb.assign(domain=FEEDBACK_DOMAIN)
    train = pd.concat([base.train, fb_rows.loc[is_train, cols]], ignore_index=True)
    val = (
        pd.concat([base.validation, fb_rows.loc[is_val, cols]], ignore_index=True)
        if is_val.any()
        else base.validation
    )
    stats.update(feedback_train=int(is_train.sum()), feedback_holdout=int(is_holdout.sum()),
                 feedback_validation=int(is_val.sum()))  # fmt: skip
    return {
        "train": train,
        "validation": val,
        "test": base.test,
        "holdout": fb_rows.loc[is_holdout, cols].reset_index(drop=True),
        "feedback_train_ids": sorted(fb.loc[is_train, "id"]),
        "feedback_holdout_ids": sorted(fb.loc[is_holdout, "id"]),
        # the feedback records' own ids (integers, POST /v1/feedback's "id"): lineage from a record down
        "feedback_train_record_ids": sorted(int(i) for i in fb.loc[is_train, "feedback_id"]),
        "max_feedback_id": int(feedback["feedback_id"].max()) if len(feedback) else 0,
        "stats": stats,
    }


def feedback_fingerprint(ids: list[str], frame: pd.DataFrame | None = None) -> str:
    """16 hex over the sorted prediction ids (and, given the frame, the labels): 'exactly this feedback'."""
    h = hashlib.sha256()
    for i in sorted(ids):
        h.update(i.encode() + b"\n")
    if frame is not None:
        from lmloop.data import fingerprint

        h.update(fingerprint(frame).encode())
    return h.hexdigest()[:16]


def _write_data_version(version: dict, labels: list[str], source: str, out: Path) -> dict:
    """Write the splits (CSV), data card and feedback ids into ``out`` (a staging dir renamed into place);
    returns the summary kept in the turn's state."""
    import os
    import shutil
    import tempfile

    from lmloop.data import build_card, fingerprint, write_card

    splits = {k: version[k] for k in ("train", "validation", "test")}
    fps = {k: fingerprint(df) for k, df in splits.items()}
    base_card = version.get("base_card") or {}
    card = build_card(
        splits,
        labels=labels,
        fingerprints=fps,
        dedup=base_card.get("dedup", {}),
        leakage=base_card.get("leakage", {}),
        source=f"{source} + feedback",
        sources={k: f"{source} + feedback" if k != "test" else source for k in splits},
        split={
            "method": {
                "train": "base + feedback",
                "validation": "base + feedback (selection)"
                if version["stats"].get("feedback_validation")
                else "base (frozen)",
                "test": "base (frozen)",
            }
        },
    )
    card["feedback"] = version["stats"]  # what was taken from the prediction log, and what was dropped why
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".data-", dir=out.parent))
    try:
        for name, df in {**splits, "holdout": version["holdout"]}.items():
            df.to_csv(staging / f"{name}.csv", index=False)
        write_card(card, staging)
        ids = {"train": version["feedback_train_ids"], "holdout": version["feedback_holdout_ids"]}
        (staging / "feedback_ids.json").write_text(json.dumps(ids))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    holdout = version["holdout"]
    return {
        "dir": str(out),
        "fingerprint": card["fingerprint"],
        "fingerprints": fps,
        "holdout_fingerprint": fingerprint(holdout) if len(holdout) else None,
        "feedback_fingerprint": feedback_fingerprint(version["feedback_train_ids"]),
        "feedback_train_ids": version["feedback_train_ids"],
        "feedback_train_record_ids": version["feedback_train_record_ids"],
        "max_feedback_id": version["max_feedback_id"],
        "rows": {k: len(df) for k, df in {**splits, "holdout": holdout}.items()},
        "feedback": version["stats"],
        "has_domain": "domain" in version["train"].columns,
    }


# ---------------------------------------------------------------------------------------------- gates


def compute_gates(champion: dict | None, challenger: dict, cfg: LoopGatesConfig) -> list[Gate]:
    """The gate results for ``challenger`` against ``champion`` (None: there is none yet, so the relative
    gates pass as 'n/a'). Each is ``{"golden": metrics, "holdout": metrics or None}`` with ``accuracy``,
    ``ece``, ``n`` and optionally ``per_domain`` (see :func:`lmloop.evaluate.compute_metrics`)."""
    gates: list[Gate] = []
    cg, ch = challenger["golden"], challenger.get("holdout")
    if cfg.max_regression is not None:
        if champion is None:
            gates.append(Gate("no_regression", None, -cfg.max_regression, True, "no champion yet"))
        else:
            d = cg["accuracy"] - champion["golden"]["accuracy"]
            gates.append(
                Gate(
                    "no_regression",
                    d,
                    -cfg.max_regression,
                    d >= -cfg.max_regression - _EPS,
                    f"golden test accuracy {champion['golden']['accuracy']:.4f} -> {cg['accuracy']:.4f}",
                )
            )
    if cfg.min_improvement is not None:
        n = (ch or {}).get("n", 0)
        if champion is None:
            gates.append(Gate("improvement", None, cfg.min_improvement, True, "no champion yet"))
        elif n < cfg.min_holdout:
            why = f"feedback holdout has {n} rows, fewer than min_holdout {cfg.min_holdout}: too few to judge"
            gates.append(Gate("improvement", None, cfg.min_improvement, False, why))
        else:
            a, b = champion["holdout"]["accuracy"], ch["accuracy"]
            gates.append(
                Gate(
                    "improvement",
                    b - a,
                    cfg.min_improvement,
                    b - a >= cfg.min_improvement - _EPS,
                    f"feedback holdout accuracy {a:.4f} -> {b:.4f} (n={n})",
                )
            )
    if cfg.max_ece is not None:  # = calibration.max_ece; the ECE after the model's temperature, if any
        e, t = cg["ece"], cg.get("temperature")
        what = "ECE on the golden test set" + (f" (temperature {t:.3f})" if t else "")
        gates.append(Gate("calibration", e, cfg.max_ece, e <= cfg.max_ece + _EPS, what))
    if cfg.min_accuracy is not None:
        a = cg["accuracy"]
        gates.append(Gate("min_accuracy", a, cfg.min_accuracy, a >= cfg.min_accuracy - _EPS, "golden test"))
    if cfg.max_domain_regression is not None:
        gates.append(_domain_gate(champion, cg, cfg.max_domain_regression))
    from lmloop.mlops.audit_gates import audit_gates  # bias / membership / memorization, when configured

    return gates + audit_gates(challenger.get("audits") or {}, cfg)


def _domain_gate(champion: dict | None, cg: dict, tol: float) -> Gate:
    doms = cg.get("per_domain") or {}
    if not doms:
        return Gate(
            "domain_regression", None, -tol, False, "the golden set has no domains (data.domain_column)"
        )
    if champion is None:
        return Gate("domain_regression", None, -tol, True, "no champion yet")
    old = champion["golden"].get("per_domain") or {}
    deltas = {d: m["accuracy"] - old[d]["accuracy"] for d, m in doms.items() if d in old}
    worst = min(deltas, key=deltas.get)
    return Gate(
        "domain_regression", deltas[worst], -tol, deltas[worst] >= -tol - _EPS, f"worst domain: {worst}"
    )


def decide(gates: list[Gate], champion_version: int | None) -> tuple[bool, str]:
    """(promote?, reason): promote only when every gate passed; the reason names each failure."""
    failed = [g for g in gates if not g.passed]
    if not failed:
        names = ", ".join(g.name for g in gates) or "none configured"
        return True, f"all {len(gates)} gates passed ({names})"
    parts = []
    for g in failed:
        nums = f"{_fmt(g.value)} vs {_fmt(g.threshold)}" if g.value is not None else "n/a"
        parts.append(f"{g.name} ({nums}: {g.detail})")
    keep = f"champion v{champion_version}" if champion_version else "no champion"
    return False, f"kept {keep}: failed " + "; ".join(parts)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:+.4f}" if x < 0 else f"{x:.4f}"


# ---------------------------------------------------------------------------------------------- triggers


def check_triggers(
    cfg: LoopTriggersConfig,
    *,
    new_feedback: int,
    live: Any = None,
    champion_accuracy: float | None = None,
    drift: Any = None,
) -> tuple[list[str], dict[str, Any]]:
    """Which triggers fire: (reasons, every trigger's numbers). ``live`` is the monitor's
    :class:`~lmloop.mlops.monitor.Stats` of recent predictions; ``drift`` a
    :class:`~lmloop.mlops.drift.DriftReport` or a string saying why drift was not checked."""
    fired: list[str] = []
    checks: dict[str, Any] = {"new_feedback": new_feedback}
    if cfg.min_feedback is not None and new_feedback >= cfg.min_feedback:
        fired.append(f"{new_feedback} new feedback records (>= min_feedback {cfg.min_feedback})")
    if cfg.max_accuracy_drop is not None:
        n = getattr(live, "labelled", 0) or 0
        hi = getattr(live, "accuracy_high", None)
        checks["live_accuracy"] = {
            "labelled": n,
            "accuracy": getattr(live, "accuracy", None),
            "wilson_high": hi,
            "champion_test_accuracy": champion_accuracy,
        }
        if champion_accuracy is None:
            checks["live_accuracy"]["skipped"] = "the champion has no test accuracy"
        elif n < cfg.min_labelled:
            checks["live_accuracy"]["skipped"] = (
                f"{n} labelled recent predictions < min_labelled {cfg.min_labelled}"
            )
        elif hi < champion_accuracy - cfg.max_accuracy_drop:
            fired.append(
                f"live accuracy {live.accuracy:.3f} (95% upper bound {hi:.3f}, n={n}) is more than "
                f"{cfg.max_accuracy_drop:g} below the champion's test accuracy {champion_accuracy:.3f}"
            )
    if cfg.drift:
        if isinstance(drift, str) or drift is None:
            checks["drift"] = {"skipped": drift or "not checked"}
        else:
            checks["drift"] = {"drifted": drift.drifted, "n_current": drift.n_current}
            if drift.drifted:
                tests = ", ".join(t.name for t in drift.tests if t.drifted)
                fired.append(f"drift in recent traffic ({tests})")
    return fired, checks


def _trigger_inputs(recipe: Recipe, store, champion, last_feedback_id: int) -> dict[str, Any]:
    """Read what :func:`check_triggers` judges: new feedback, live accuracy of the champion, drift."""
    cfg, tc = recipe.loop, recipe.loop.triggers
    served = cfg.served_model
    new = sum(1 for _, fb in store.iter_labeled(model=served) if (fb.id or 0) > last_feedback_id)
    out: dict[str, Any] = {"new_feedback": new}
    if tc.max_accuracy_drop is not None and champion is not None:
        from lmloop.mlops.monitor import summarize

        summary = summarize(store, since=tc.window, window="1d", model=served)
        live = summary.total
        try:  # the champion's own traffic, when the server logged it under its weights' hash
            from lmloop.serve.app import model_version

            mine = [v for v in summary.versions if v.version == model_version(champion["path"])]
            live = mine[0].total if len(mine) == 1 else live
        except ImportError:
            pass
        out.update(live=live, champion_accuracy=champion["test_accuracy"])
    if tc.drift:
        out["drift"] = _drift(recipe, store, champion)
    return out


def _drift(recipe: Recipe, store, champion):
    from lmloop.mlops.drift import REFERENCE_FILE, Reference, detect
    from lmloop.mlops.monitor import parse_time

    if champion is None:
        return "no champion"
    ref = Path(champion["path"]) / REFERENCE_FILE
    if not ref.is_file():
        return f"the champion has no {REFERENCE_FILE}"
    since = parse_time(recipe.loop.triggers.window)
    texts, labels = [], []
    for p in store.iter_predictions(since=since, model=recipe.loop.served_model):
        if p.text is not None:
            texts.append(p.text)
            labels.append(p.label)
    if not texts:
        return "no recent predictions with text"
    return detect(Reference.load(ref), texts, predicted_labels=labels)


# ---------------------------------------------------------------------------------------------- the turn


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def _champion(reg, name: str, alias: str) -> dict | None:
    from lmloop.mlops.registry import RegistryError

    try:
        v = reg.show(name, alias)
    except RegistryError:
        return None
    if alias not in v.aliases:  # show() without the alias set falls back to the newest version
        return None
    path = reg.resolve(f"models:/{name}/{v.version}")
    return {"version": v.version, "path": str(path), "test_accuracy": v.metrics.get("test.accuracy")}


def _compact(m: dict | None) -> dict | None:
    if m is None:
        return None
    out = {k: m[k] for k in ("n", "accuracy", "macro_f1", "ece", "nll", "temperature") if k in m}
    if m.get("per_domain"):
        out["per_domain"] = {d: {"n": x["n"], "accuracy": x["accuracy"]} for d, x in m["per_domain"].items()}
    return out


def score(model_dir: str | Path, frames: dict[str, pd.DataFrame]) -> dict[str, dict | None]:
    """Metrics of a model directory on each frame (None for an empty one), exact fp32 backend."""
    from lmloop.evaluate import evaluate_split
    from lmloop.infer.predictor import Predictor

    pred = Predictor.from_ref(str(model_dir), backend="torch", precision="fp32")
    out: dict[str, dict | None] = {}
    for name, df in frames.items():
        unknown = set(df["label"]) - set(pred.labels)
        if unknown:
            raise LmloopError(f"{model_dir} does not know label(s) {sorted(unknown)} of the {name} data")
        out[name] = _compact(evaluate_split(pred, df, pred.labels)) if len(df) else None
    return out


def _challenger_recipe(recipe: Recipe, data: dict, base: str, out: Path) -> Recipe:
    r = copy.deepcopy(recipe)
    r.name = f"{recipe.name}-challenger"
    r.out = str(out)
    r.data.path, r.data.format, r.data.limit = None, "csv", None  # the data version is already limited
    splits = [str(Path(data["dir"]) / f"{s}.csv") for s in ("train", "validation", "test")]
    r.data.train, r.data.validation, r.data.test = splits
    r.data.text_column, r.data.label_column = "text", "label"
    r.data.domain_column = "domain" if data["has_domain"] else None
    r.model.base = base
    r.tracking.enabled, r.tracking.register = False, None  # the turn's run records it; the turn registers it
    return r


def run_turn(recipe: Recipe, *, force_trigger: bool = False, say=None, progress: bool = False) -> TurnResult:
    """Run one turn of the loop (see the module docstring), or resume an unfinished one; a
    :class:`TurnResult`. Without a fired trigger (and without ``force_trigger``) it returns at once with
    ``decision == "no-trigger"``."""
    from lmloop.mlops.predlog import open_store
    from lmloop.mlops.registry import Registry
    from lmloop.mlops.tracking import Tracker

    say = say or (lambda m: print(f"[lmloop loop] {m}", file=sys.stderr, flush=True))
    cfg = recipe.loop
    name = cfg.model_name or recipe.tracking.register
    if not name:
        raise ConfigError(
            "lmloop loop needs loop.model_name (or tracking.register): the registered model to improve"
        )
    if recipe.task != "finetune":
        raise ConfigError("lmloop loop retrains classifiers: the recipe's task must be finetune")
    root = Path(cfg.dir or Path(recipe.out) / "loop")
    index_path = root / "loop.json"
    index = _read(index_path) or {"turns": [], "current": None, "last_feedback_id": 0}
    reg = Registry(recipe.tracking.uri, say=say)

    current = index.get("current")
    resumed = bool(current)
    if current:
        tdir = root / "turns" / current
        state = _read(tdir / "state.json")
        say(f"resuming turn {current} after step '{state['step']}'")
    else:
        champion = _champion(reg, name, cfg.alias)
        with open_store(cfg.prediction_log) as store:
            fired, checks = check_triggers(
                cfg.triggers, **_trigger_inputs(recipe, store, champion, index.get("last_feedback_id", 0))
            )
        if force_trigger:
            fired.insert(0, "started by hand (--force)")
        if not fired:
            return TurnResult(None, "no-trigger", "no trigger fired", trigger_checks=checks)
        current = f"{len(index['turns']) + 1:04d}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        tdir = root / "turns" / current
        state = {
            "turn": current,
            "step": "started",
            "champion": champion,
            "triggers": fired,
            "checks": checks,
        }
        _write(tdir / "state.json", state)
        _write(index_path, {**index, "current": current})  # from here on, a crash resumes this turn
        say(f"turn {current}: {'; '.join(fired)}")

    def mark(step: str, **kv) -> None:
        state.update(kv, step=step)
        _write(tdir / "state.json", state)

    def done(step: str) -> bool:
        return STEPS.index(state["step"]) >= STEPS.index(step)

    champion = state["champion"]
    tracker = Tracker(
        uri=recipe.tracking.uri, experiment=recipe.tracking.experiment, enabled=recipe.tracking.enabled
    )
    if not (state.get("run_id") and tracker.resume(state["run_id"])):
        params = {"loop": asdict(cfg), "model_name": name, "turn": current}
        tags = {
            "lmloop.stage": "loop",
            "lmloop.loop.turn": current,
            "lmloop.loop.model": name,
            "lmloop.loop.champion_version": champion["version"] if champion else "none",
            "lmloop.loop.triggers": "; ".join(state["triggers"])[:5000],
        }
        tracker.start(f"loop {name} {current}", params=params, tags=tags)
        mark(state["step"], run_id=tracker.run_id)
    try:
        # 1. data version ------------------------------------------------------------------------------
        if not done("data"):
            from lmloop.finetune import load_recipe_data

            base = load_recipe_data(recipe)
            with open_store(cfg.prediction_log) as store:
                fb, counts = collect_feedback(store, model=cfg.served_model)
            version = build_data_version(
                base, fb, holdout=cfg.feedback_holdout, validation=cfg.feedback_validation
            )
            version["stats"]["no_text"] = counts["no_text"]
            version["base_card"] = base.card
            data = _write_data_version(version, base.labels, base.source, tdir / "data")
            d = data["feedback"]
            say(
                f"data version {data['fingerprint']}: train {data['rows']['train']} (+{d['feedback_train']} "
                f"feedback), holdout {d['feedback_holdout']}; dropped: leakage {d['leakage']}, duplicates "
                f"{d['duplicate_of_train'] + d['duplicate_feedback']}, conflicts "
                f"{d['conflicts_with_train'] + d['conflicting_feedback']}, no text {d['no_text']}"
            )
            mark("data", data=data)
            tracker.set_tags({"lmloop.loop.data_fingerprint": data["fingerprint"],
                              "lmloop.loop.feedback_fingerprint": data["feedback_fingerprint"]})  # fmt: skip
        data = state["data"]
        data_dir = Path(data["dir"])

        # 2. challenger ---------------------------------------------------------------------------------
        out = tdir / "challenger"
        if not done("finetuned"):
            from lmloop.finetune import run_recipe

            base_model = champion["path"] if cfg.start_from == "champion" and champion else recipe.model.base
            if not (out / "metrics.json").is_file() or (out / "checkpoints").exists():
                resume = (out / "checkpoints" / "last").exists()
                say(f"fine-tuning the challenger from {base_model}" + (" (resuming)" if resume else ""))
                r = _challenger_recipe(recipe, data, str(base_model), out)
                run_recipe(r, resume=resume, force=not resume, progress=progress)
            meta = _read(out / "lmloop.json")
            got = (meta.get("data_fingerprints") or {}).get("train", {}).get("sha256")
            if got != data["fingerprints"]["train"]:
                raise LmloopError(
                    f"{out} was trained on train data {got}, not the data version's {data['fingerprints']['train']}"
                )
            mark("finetuned", challenger={"path": str(out), "base": str(base_model)})

        # 3. gates -------------------------------------------------------------------------------------
        if not done("evaluated"):
            frames = {"golden": pd.read_csv(data_dir / "test.csv", keep_default_na=False, dtype=str),
                      "holdout": pd.read_csv(data_dir / "holdout.csv", keep_default_na=False, dtype=str)}  # fmt: skip
            cm = score(out, frames)
            chm = score(champion["path"], frames) if champion else None
            audits = _audits(out, cfg.gates, data_dir, frames["golden"], say)
            gates = compute_gates(chm, {**cm, "audits": audits}, cfg.gates)
            promote, reason = decide(gates, champion["version"] if champion else None)
            from lmloop.mlops.card import write_gates

            # gates.json + MODEL_CARD.md go into the challenger before it is registered: they travel with it
            write_gates(out, [asdict(g) for g in gates], decision="promote" if promote else "keep",
                        reason=reason, turn=current)  # fmt: skip
            mark(
                "evaluated",
                challenger={**state["challenger"], "metrics": cm, "audits": audits},
                champion=champion and {**champion, "metrics": chm},
                gates=[asdict(g) for g in gates],
                promote=promote,
                reason=reason,
            )
            say(("promote: " if promote else "keep: ") + reason)
        champion, gates = state["champion"], [Gate(**g) for g in state["gates"]]
        tracker.log_metrics(_turn_metrics(state))

        # 4. register, then (the single last step) move the alias -----------------------------------------
        if not done("registered"):
            from lmloop.mlops.lineage import write_ids

            # lineage: logged with the model, read by `lmloop registry lineage --feedback/--prediction`
            write_ids(out, data.get("feedback_train_record_ids", []), data["feedback_train_ids"])
            v = reg.register(
                out,
                name,
                run_id=tracker.run_id,
                parent=champion["version"] if champion else None,
                reason=f"loop turn {current}: "
                + ("challenger, promoted" if state["promote"] else "challenger, kept"),
                feedback={
                    "fingerprint": data["feedback_fingerprint"],
                    "n": len(data["feedback_train_ids"]),
                    "ids": data.get("feedback_train_record_ids", []),
                },  # fmt: skip
            )
            loop_tags = {
                "lmloop.loop.turn": current,
                "lmloop.loop.run_id": tracker.run_id or "",
                "lmloop.loop.data_fingerprint": data["fingerprint"],
                "lmloop.loop.holdout_fingerprint": data["holdout_fingerprint"] or "",
                "lmloop.loop.decision": "promoted" if state["promote"] else "kept",
                # every gate's value, threshold and verdict (`lmloop registry show` prints them)
                "lmloop.loop.gates": json.dumps(
                    {g.name: {"value": g.value, "threshold": g.threshold, "passed": g.passed} for g in gates}
                )[:5000],
                "lmloop.loop.reason": state["reason"][:5000],
            }
            for k, val in loop_tags.items():
                reg.client.set_model_version_tag(name, str(v.version), k, str(val))
            mark("registered", challenger={**state["challenger"], "version": v.version})
            tracker.set_tags({"lmloop.loop.challenger_version": v.version})
        version = state["challenger"]["version"]

        if not done("done"):
            promoted, reason = state["promote"], state["reason"]
            if promoted:
                now = _champion_version(reg, name, cfg.alias)
                before = champion["version"] if champion else None
                if now not in (before, version):
                    promoted = False
                    reason = (f"kept {name}@{cfg.alias} v{now}: it moved during the turn (was v{before}); "
                              f"the challenger was judged against v{before}")  # fmt: skip
                else:
                    audit_gates = {
                        g.name: {"value": g.value, "threshold": g.threshold, "passed": g.passed}
                        for g in gates
                    }
                    reg.promote(name, version, cfg.alias, reason=f"lmloop loop {current}: {reason}",
                                gates=audit_gates, actor=f"lmloop-loop@{current}")  # fmt: skip
            mark("done", decision="promoted" if promoted else "kept", reason=reason,
                 alias_after=_champion_version(reg, name, cfg.alias))  # fmt: skip
            tracker.set_tags(
                {"lmloop.loop.decision": state["decision"], "lmloop.loop.reason": state["reason"][:5000]}
            )
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("KILLED" if isinstance(sys.exc_info()[1], KeyboardInterrupt) else "FAILED")
        raise

    index = _read(index_path) or index
    index["turns"] = [*index.get("turns", []), current]
    index["last_feedback_id"] = max(index.get("last_feedback_id", 0), data["max_feedback_id"])
    index["current"] = None
    _write(index_path, index)
    return TurnResult(
        turn=current,
        decision=state["decision"],
        reason=state["reason"],
        triggers=state["triggers"],
        trigger_checks=state.get("checks", {}),
        data={k: v for k, v in data.items() if k not in ("feedback_train_ids", "feedback_train_record_ids")},
        champion=champion,
        challenger=state["challenger"],
        gates=gates,
        registry={
            "name": name,
            "alias": cfg.alias,
            "before": champion["version"] if champion else None,
            "after": state["alias_after"],
            "challenger_version": version,
        },  # fmt: skip
        run_id=state.get("run_id"),
        dir=str(tdir),
        resumed=resumed,
    )


def _audits(model_dir: Path, cfg: LoopGatesConfig, data_dir: Path, golden: pd.DataFrame, say) -> dict:
    """The audit summaries the configured audit gates need (:mod:`lmloop.mlops.audit_gates`); {} for none."""
    from lmloop.mlops.audit_gates import run_audits, wanted

    if not wanted(cfg):
        return {}
    train = pd.read_csv(data_dir / "train.csv", keep_default_na=False, dtype=str)
    return run_audits(model_dir, cfg, train=train, golden=golden, say=say)


def _champion_version(reg, name: str, alias: str) -> int | None:
    from lmloop.mlops.registry import RegistryError

    try:
        return reg._alias_map(name).get(alias)
    except RegistryError:
        return None


def _turn_metrics(state: dict) -> dict:
    m: dict[str, Any] = {"gate": {}, "data": state["data"]["rows"]}
    for g in state["gates"]:
        if g["value"] is not None:
            m["gate"][g["name"]] = g["value"]
        m["gate"][f"{g['name']}.passed"] = float(g["passed"])
    for who in ("challenger", "champion"):
        for split, x in ((state.get(who) or {}).get("metrics") or {}).items():
            if x:
                m[f"{who}.{split}"] = {k: v for k, v in x.items() if isinstance(v, (int, float))}
    return m


# ---------------------------------------------------------------------------------------------- output


def format_turn(r: TurnResult) -> str:
    """The readable summary ``lmloop loop`` prints: trigger, data version, gates table, decision."""
    if r.decision == "no-trigger":
        checks = ", ".join(f"{k}={v}" for k, v in r.trigger_checks.items())
        return f"no trigger fired ({checks}); nothing to do"
    lines = [f"turn {r.turn}" + ("  (resumed)" if r.resumed else "") + f"   {r.dir}"]
    lines += [f"  trigger      {t}" for t in r.triggers]
    d, fb = r.data, r.data.get("feedback", {})
    lines.append(
        f"  data         {d['fingerprint']}: train {d['rows']['train']} (+{fb.get('feedback_train', 0)} feedback), "
        f"golden test {d['rows']['test']}, feedback holdout {d['rows']['holdout']}"
    )
    lines.append(
        f"  feedback     {fb.get('feedback', 0)} labelled; dropped: {fb.get('leakage', 0)} in golden set (leakage), "
        f"{fb.get('duplicate_of_train', 0) + fb.get('duplicate_feedback', 0)} duplicates, "
        f"{fb.get('conflicts_with_train', 0) + fb.get('conflicting_feedback', 0)} conflicting, "
        f"{fb.get('unknown_label', 0)} unknown label, {fb.get('no_text', 0)} without text"
    )
    champ = f"v{r.champion['version']}" if r.champion else "none"
    lines.append(
        f"  models       champion {champ}, challenger v{r.registry.get('challenger_version')} ({(r.challenger or {}).get('path')})"
    )
    lines.append(f"  {'gate':21s} {'value':>9s} {'threshold':>10s}  result  detail")  # memorization.exposure
    for g in r.gates:
        lines.append(
            f"  {g.name:21s} {_fmt(g.value):>9s} {_fmt(g.threshold):>10s}  {'PASS' if g.passed else 'FAIL':6s}  {g.detail}"
        )
    reg = r.registry
    move = f"{reg['name']}@{reg['alias']}: v{reg['before']} -> v{reg['after']}" if r.decision == "promoted" else (
        f"{reg['name']}@{reg['alias']} stays v{reg['after']}")  # fmt: skip
    lines.append(f"  decision     {r.decision.upper()}: {r.reason}")
    lines.append(
        f"  registry     {move}"
        + (
            f"   undo: lmloop registry rollback {reg['name']} --reason TEXT"
            if r.decision == "promoted"
            else ""
        )
    )
    lines.append(f"  mlflow run   {r.run_id or '-'}")
    return "\n".join(lines)

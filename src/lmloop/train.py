"""Shared training math: batching, optimizer, schedule, precision, atomic checkpoints, resume, early stopping.

Every training stage (fine-tuning now, pretraining next) runs :func:`train_loop`; the stage supplies
how to build a batch and compute a loss. Keeping the loop in one place means accumulation, resume and
early stopping are written and tested once (torchtune #2307 shows what copies do).

Why a lean loop and not the HF Trainer: we need length-grouped batches built from pre-tokenised ids
without a collator round-trip, a forward that skips work the classifier never reads, precision chosen
by measurement (bf16 is 10x *slower* than fp32 on CPUs without AVX-512 BF16), and a checkpoint written
atomically that resumes bit-for-bit after ``kill -9`` — each is awkward to bolt onto Trainer callbacks.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmloop.errors import LmloopError
from lmloop.fsutil import fsync_dir


def set_seed(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------- precision


def _cpu_key() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = " ".join(sorted(x for x in line.split() if "avx512" in x or "amx" in x))
                    break
    except OSError:
        pass
    import torch

    return f"{platform.machine()}|{platform.processor()}|{os.cpu_count()}|{flags}|torch{torch.__version__}"


def bf16_speedup(device: str = "cpu") -> float:
    """Measured fp32-time / bf16-time of a GEMM the size of a transformer layer (cached per machine)."""
    import torch

    if device != "cpu":
        return 2.0 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 0.0
    from lmloop.assets import home

    cache = home() / "hardware.json"
    key = _cpu_key()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return float(known[key])
    a32, b32 = torch.randn(512, 384), torch.randn(384, 1536)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def best_of(a, b, rounds=3, n=3) -> float:
        # the minimum over rounds is robust to another process stealing the CPU mid-measurement
        a @ b
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(n):
                a @ b
            times.append(time.perf_counter() - t)
        return min(times)

    t32, t16 = best_of(a32, b32), best_of(a16, b16)
    ratio = t32 / max(t16, 1e-9)
    known[key] = round(ratio, 3)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=2))
        os.replace(tmp, cache)
    except OSError:
        pass
    return ratio


def pick_precision(requested: str, device: str = "cpu") -> str:
    """'fp32' or 'bf16'. 'auto' takes bf16 only where it measured >= 1.2x faster than fp32 here."""
    if requested in ("fp32", "bf16"):
        return requested
    return "bf16" if bf16_speedup(device) >= 1.2 else "fp32"


# -------------------------------------------------------------------------------------------- batching


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int, window: int = 64
) -> list[np.ndarray]:
    """Seeded batches of similar length: shuffle, sort inside windows of ``window`` batches, shuffle batches.

    Padding waste falls to a few percent while batch order stays random; the same (seed, epoch) always
    gives the same batches, which is what makes an exact resume possible.
    """
    rng = np.random.default_rng([seed, epoch])
    lengths = np.asarray(lengths)
    perm = rng.permutation(len(lengths))
    span = batch_size * max(window, 1)
    batches = []
    for s in range(0, len(perm), span):
        chunk = perm[s : s + span]
        # stable sort, longest first inside the window
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """Right-pad token id lists to the longest one: (B, T) input_ids and attention_mask tensors."""
    import torch

    longest = max(len(s) for s in seqs)
    ids = np.full((len(seqs), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), longest), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


# ------------------------------------------------------------------------------- optimizer and schedule


def build_optimizer(model, lr: float, weight_decay: float):
    """AdamW (fused kernel where available: 6x faster than foreach on CPU) without decay on biases/norms."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (
            no_decay if p.ndim < 2 or "LayerNorm" in name or "layernorm" in name or "norm" in name else decay
        ).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


def linear_warmup_decay(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


# ------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(ckpt_dir: Path, model, optimizer, state: dict) -> None:
    """Write model weights (safetensors), optimizer state and loop state, then swap the directory in atomically.

    Layout: ``ckpt_dir/{model.safetensors, optimizer.pt, state.json}``. We write to ``ckpt_dir.tmp``,
    fsync, move the old one to ``ckpt_dir.old``, rename, then delete the old: a ``kill -9`` at any instant
    leaves either the old or the new checkpoint complete (``load_checkpoint`` looks at both).
    """
    import torch
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    tmp, old = ckpt_dir.with_name(ckpt_dir.name + ".tmp"), ckpt_dir.with_name(ckpt_dir.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(_dedupe_shared(sd), str(tmp / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    state = dict(state, torch_rng=torch.get_rng_state().tolist())
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    if ckpt_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    fsync_dir(ckpt_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def _dedupe_shared(sd: dict) -> dict:
    # safetensors refuses tensors that share storage (tied embeddings): keep the first name of each.
    seen, out = set(), {}
    for k, v in sd.items():
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[k] = v
    return out


def find_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint: ``ckpt_dir`` or, if a crash hit mid-swap, ``ckpt_dir.old``."""
    for cand in (Path(ckpt_dir), Path(str(ckpt_dir) + ".old")):
        if (cand / "state.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    return None


def load_checkpoint(path: Path, model, optimizer) -> dict:
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # tied weights were stored once; anything else missing means the checkpoint is from another model
    real_missing = [k for k in missing if not _is_tied(model, k)]
    if real_missing or unexpected:
        raise LmloopError(
            f"{path}: checkpoint does not match the model (missing {real_missing[:3]}, "
            f"unexpected {list(unexpected)[:3]}); start without --resume or use another --out"
        )
    if optimizer is not None and (path / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = json.loads((path / "state.json").read_text())
    torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
    return state


def _is_tied(model, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse to overwrite a finished model unless resuming/forced: the user's model is data too."""
    if resume:
        if (out / "metrics.json").is_file() and find_checkpoint(out / "checkpoints" / "last") is None:
            raise LmloopError(
                f"{out} holds a finished run (metrics.json, no checkpoint): nothing to resume; "
                "use --force to retrain it or choose another --out"
            )
        return
    if (out / "metrics.json").is_file() or (out / "checkpoints" / "last").exists():
        raise LmloopError(
            f"{out} already holds a run; pass --resume to continue it, --force to overwrite, "
            "or choose another --out"
        )


# ------------------------------------------------------------------------------------------------ loop


def _loss_module(model, loss_fn):
    """``model`` and ``loss_fn`` as one nn.Module, so DistributedDataParallel's forward sees the loss.

    ``forward(batch)`` returns ``loss_fn(model, batch)``; ``forward(None)`` (a rank whose shard of a short
    batch is empty) returns 0 * sum(params): zero gradients that still take part in the all-reduce.
    """
    import torch

    class LossModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch):
            if batch is None:
                return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
            return loss_fn(self.model, batch)

    return LossModule()


@dataclass
class LoopConfig:
    epochs: float
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    evals_per_epoch: int = 1
    patience: int = 0
    metric: str = "accuracy"
    higher_is_better: bool = True
    seed: int = 42
    precision: str = "fp32"
    window: int = 64
    max_steps: int | None = None
    checkpoint_every: int = 200
    eval_every: int | None = None  # steps between evaluations; None = derived from evals_per_epoch


@dataclass
class LoopResult:
    global_step: int
    best_metric: float | None
    best_step: int | None
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    examples_seen: int = 0
    tokens_seen: int = 0


def train_loop(
    model,
    *,
    cfg: LoopConfig,
    lengths: Sequence[int],
    make_batch: Callable[[np.ndarray], dict],
    loss_fn: Callable[[Any, dict], Any],
    evaluate: Callable[[], dict] | None,
    out_dir: Path,
    resume: bool = False,
    log: Callable[[dict, int], None] | None = None,
    progress: bool = True,
) -> LoopResult:
    """Train ``model`` with AdamW + linear warm-up/decay, length-grouped batches, periodic evaluation.

    ``make_batch(indices)`` returns tensors for those training examples (with a ``"_tokens"`` int for
    throughput accounting), ``loss_fn(model, batch)`` returns a scalar loss. The best weights by
    ``cfg.metric`` are kept in ``out_dir/checkpoints/best``; ``out_dir/checkpoints/last`` holds
    everything needed to continue after a crash (``resume=True``).

    Under ``torchrun`` (see :mod:`lmloop.dist`) every rank runs this same loop on the same batch order
    and takes a disjoint shard of each global batch of ``cfg.batch_size``; gradients are averaged by
    DistributedDataParallel, so N processes follow the 1-process trajectory up to float summation order.
    Only rank 0 evaluates, logs, shows the bar and writes checkpoints; its decision to stop early is
    broadcast so every rank leaves the loop at the same step.
    """
    import torch

    from lmloop import dist

    ws, rank = dist.world_size(), dist.rank()
    main = rank == 0
    if not main:
        progress, log = False, None
    out_dir = Path(out_dir)
    ckpt_last, ckpt_best = out_dir / "checkpoints" / "last", out_dir / "checkpoints" / "best"
    n = len(lengths)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    warmup = int(total * cfg.warmup_ratio)
    eval_every = cfg.eval_every or max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(s, total, warmup))

    step, best, best_step, bad_evals, history = 0, None, None, 0, []
    examples = tokens = 0
    elapsed_before = 0.0
    found = find_checkpoint(ckpt_last) if resume else None
    if resume and found is None:
        print(f"[lmloop] --resume: no checkpoint in {ckpt_last}, starting from scratch", file=sys.stderr)
    if found is not None:
        st = load_checkpoint(found, model, optimizer)
        if st.get("total") != total or st.get("n") != n or st.get("batch_size") != cfg.batch_size:
            raise LmloopError(
                f"{found}: checkpoint was made with a different schedule/data "
                f"(steps {st.get('total')} vs {total}, examples {st.get('n')} vs {n}); "
                "use the same recipe to resume, or a new --out"
            )
        step, best, best_step, bad_evals = st["step"], st["best"], st["best_step"], st["bad_evals"]
        history, examples, tokens = st["history"], st["examples"], st["tokens"]
        elapsed_before = st.get("elapsed", 0.0)
        sched.last_epoch = step  # LambdaLR recomputes lr from last_epoch at each step()
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * linear_warmup_decay(step, total, warmup)
        if main:
            print(f"[lmloop] resumed from {found} at step {step}/{total}", file=sys.stderr)
    if ws > 1 and rank > 0:
        # Every rank starts from rank 0's RNG (set_seed, or the checkpoint, which holds rank 0's state
        # only). Identical streams would give shards of equal shape identical dropout / MLM masks, so the
        # other ranks fold (seed, rank, step) into a stream of their own. Consequence: after a resume,
        # ranks > 0 do not continue their old stream, so a resumed N-process run equals an uninterrupted
        # one exactly only when training draws no randomness (dropout 0, no masking); rank 0 is exact.
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, rank, step]).generate_state(1)[0]))
    fwd = model
    if ws > 1:
        from torch.nn.parallel import DistributedDataParallel

        # DDP averages gradients in hooks armed by its own forward(); the stages' loss_fn may bypass
        # model.forward (the classifier's [CLS]-only fast path), so DDP wraps "model + loss_fn" instead.
        # find_unused_parameters: a head or pooler a given loss never reads must not hang the all-reduce.
        fwd = DistributedDataParallel(_loss_module(model, loss_fn), find_unused_parameters=True)

    def state(stopped: bool = False) -> dict:
        return {
            "step": step,
            "total": total,
            "n": n,
            "batch_size": cfg.batch_size,
            "best": best,
            "best_step": best_step,
            "bad_evals": bad_evals,
            "history": history,
            "examples": examples,
            "tokens": tokens,
            "elapsed": elapsed_before + (time.perf_counter() - t0),
            "stopped": stopped,
            "world_size": ws,  # informational: a checkpoint resumes under any number of processes
        }

    def _evaluate_and_keep_best() -> bool:
        # rank 0 only: evaluate, record, keep the best weights; returns whether to stop early
        nonlocal best, best_step, bad_evals
        metrics = evaluate()
        model.train()
        score = metrics[cfg.metric]
        history.append(
            {
                "step": step,
                "epoch": round(step / steps_per_epoch, 4),
                **{f"eval_{k}": v for k, v in metrics.items()},
            }
        )
        if log:
            log({f"val_{k}": v for k, v in metrics.items()}, step)
        if best is None or (score > best if cfg.higher_is_better else score < best):
            best, best_step, bad_evals = score, step, 0
            save_checkpoint(ckpt_best, model, None, {"step": step, "metric": cfg.metric, "value": score})
        else:
            bad_evals += 1
        if bar is not None:
            bar.write(f"[lmloop] step {step}: val {cfg.metric} {score:.4f} (best {best:.4f} @ {best_step})")
        return bool(cfg.patience and bad_evals >= cfg.patience)

    use_bf16 = cfg.precision == "bf16"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    stopped = False
    model.train()
    while step < total and not stopped:
        epoch = step // steps_per_epoch
        batches = length_grouped_batches(
            lengths, cfg.batch_size, seed=cfg.seed, epoch=epoch, window=cfg.window
        )
        for idx in batches[step - epoch * steps_per_epoch :]:
            if ws == 1:
                batch = make_batch(idx)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    loss = loss_fn(model, batch)
                loss.backward()
                loss_v, n_tokens = float(loss.detach()), int(batch.get("_tokens", 0))
            else:
                # The global batch idx (B,) is split into W contiguous shards of n_r examples (sizes differ
                # by at most one; a shard is empty when B < W). loss_fn gives the shard mean
                # m_r = (1/n_r) sum_{i in r} l_i, and DDP's all-reduce averages gradients over ranks:
                # g = (1/W) sum_r grad(L_r). With L_r = m_r * n_r * W / B this is
                # g = (1/B) sum_r sum_{i in r} grad l_i, the gradient of the 1-process mean over the same
                # B examples, also when the last batch of an epoch is short or shards are uneven.
                # (A loss averaged over a varying number of targets per example, as MLM's masked tokens,
                # is then weighted per example across shards rather than per target: close, not equal.)
                shard = np.array_split(idx, ws)[rank]  # (n_r,)
                batch = make_batch(shard) if len(shard) else None
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    loss = fwd(batch) * (len(shard) * ws / len(idx))
                loss.backward()
                # the logged loss is the global-batch mean: (1/B) sum_r n_r m_r = (1/W) sum_r L_r
                red = torch.tensor(
                    [float(loss.detach()), float(batch.get("_tokens", 0) if batch else 0)],
                    dtype=torch.float64,
                )
                dist.all_reduce_sum(red)
                loss_v, n_tokens = float(red[0]) / ws, int(red[1])
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            examples += len(idx)
            tokens += n_tokens
            rec = {
                "step": step,
                "epoch": round(step / steps_per_epoch, 4),
                "loss": loss_v,
                "lr": optimizer.param_groups[0]["lr"],
            }
            if main and (step % 10 == 0 or step == 1):
                history.append(rec)
                if log:
                    log({"train_loss": loss_v, "lr": rec["lr"]}, step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_v:.4f}",
                    ex_s=f"{examples / max(1e-9, elapsed_before + time.perf_counter() - t0):.0f}",
                )
            last_step = step >= total
            if evaluate is not None and (step % eval_every == 0 or last_step):
                if main:
                    stopped = _evaluate_and_keep_best()
                # every rank must leave the loop at the same step, or the others hang in the next all-reduce
                stopped = dist.broadcast_object(stopped)
                if main:
                    save_checkpoint(ckpt_last, model, optimizer, state(stopped))
                dist.barrier()  # no rank runs ahead of a half-written checkpoint
            elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                if main:
                    save_checkpoint(ckpt_last, model, optimizer, state())
                dist.barrier()
            if stopped or last_step:
                break
    if bar is not None:
        bar.close()
    seconds = elapsed_before + time.perf_counter() - t0
    return LoopResult(
        global_step=step,
        best_metric=best,
        best_step=best_step,
        stopped_early=stopped,
        history=history,
        train_seconds=seconds,
        examples_seen=examples,
        tokens_seen=tokens,
    )

"""What pretraining a model will cost, before running it: parameters, FLOPs, memory, tokens and wall time.

The arithmetic follows the papers everyone quotes, with our conventions written out:

* FLOPs (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1). A forward pass costs
  ``2 N`` FLOPs per token for the weight matmuls (one multiply + one add per weight) plus
  ``2 L T d`` for attention scores and their weighted sum (QK^T and AV over the full context T; no
  discount for the causal mask). The backward pass costs twice the forward, so training is
  ``C = 6 N D + 6 L T d D`` for D tokens. Kaplan's N excludes embeddings; we add the output projection
  (``V d``, tied or not) to N because its matmul is real work that, at our tiny widths, is *most* of
  the work (gpt-tiny: 1.0M head vs 0.5M in the layers). MLM and CLM cost the same: HF's
  ``BertForMaskedLM`` scores every position, not only the 15% that are masked.
* Memory (fp32 AdamW): 4 bytes of weights, 4 of gradients and 8 of the two Adam moments per parameter,
  plus activations. Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation",
  section 4.1), who count ``s b h (34 + 5 a s / h)`` *bytes* per layer in fp16 with dropout masks. Re-done
  in elements for our models (dropout 0, so no masks and no second copy of the softmax):
  ``B T (8 d + 2 f) + a B T^2`` per layer for a GELU MLP, ``B T (8 d + 4 f) + a B T^2`` for SwiGLU,
  times 4 bytes (fp32) or 2 (bf16 autocast). Fused SDPA attention keeps only a (B, a, T) logsumexp,
  so the ``a B T^2`` term is an upper bound. Add the logits and the loss's log-softmax, 2 x B T V fp32.
* Compute-optimal data (Hoffmann et al. 2022, "Chinchilla"): about 20 tokens per parameter.
* Wall time is measured, not assumed: :func:`calibrate` times real fp32 forward + backward + fused-AdamW
  steps of the real HF model on (batch, seq_len) random ids, exactly the work pretraining does, and
  caches the rate per machine in ``$LMLOOP_HOME/estimate_calibration.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

from lmloop.errors import ConfigError

TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022, Table 3: ~20 tokens per parameter at the optimum
GATED_MLP_TYPES = {
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "phi3",
    "olmo",
    "olmo2",
}

# ------------------------------------------------------------------------------------------------ counts

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str | int, what: str = "--tokens") -> int:
    """'300k' -> 300_000, '10M' -> 10_000_000, '2.5B' -> 2_500_000_000, '1e9', '1_000_000'."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        s = str(text).strip().replace("_", "").replace(",", "")
        m = re.fullmatch(r"(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*([kKmMbBgGtT]?)", s)
        if not m:
            raise ConfigError(f"{what} '{text}': expected a count like 300k, 10M, 2.5B or 1e9")
        n = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
        if n != int(n):
            raise ConfigError(f"{what} '{text}': {n:g} is not a whole number")
        n = int(n)
    if n <= 0:
        raise ConfigError(f"{what} '{text}': expected a positive count")
    return n


def count_params(model_or_config, objective: str | None = None) -> dict[str, Any]:
    """Exact parameter counts from a model's ``named_parameters`` (shared tensors counted once).

    A config is instantiated on the ``meta`` device first (no memory, no init). Embedding parameters
    are those of every ``nn.Embedding`` (token ids -> ``token_embedding``; positions and BERT's token
    types -> ``position_embedding``) and of the output projection module when it is not shared with the
    input embedding (an untied LM head's weight, and a vocabulary-sized output bias like BERT's) ->
    ``lm_head``. Everything else — attention, MLP, norms, BERT's MLM transform — is ``non_embedding``.
    """
    import torch

    model = model_or_config
    if not isinstance(model_or_config, torch.nn.Module):
        from lmloop.presets import build_model, default_objective

        with torch.device("meta"):
            model = build_model(model_or_config, objective or default_objective(model_or_config))
    vocab = getattr(model.config, "vocab_size", None)
    token_ids, pos_ids, head_ids = set(), set(), set()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Embedding):
            target = token_ids if mod.num_embeddings == vocab else pos_ids
            target.update(id(p) for p in mod.parameters(recurse=False))
    out = model.get_output_embeddings()
    if out is not None:
        head_ids.update(id(p) for p in out.parameters(recurse=False))
    c = {"token_embedding": 0, "position_embedding": 0, "lm_head": 0, "non_embedding": 0}
    groups = (("token_embedding", token_ids), ("position_embedding", pos_ids), ("lm_head", head_ids))
    for _, p in model.named_parameters():  # de-duplicated: a tied head is the token embedding
        key = next((k for k, ids in groups if id(p) in ids), "non_embedding")
        c[key] += p.numel()
    emb = c["token_embedding"] + c["position_embedding"] + c["lm_head"]
    tied = out is not None and any(id(p) in token_ids for p in out.parameters(recurse=False))
    return {"total": emb + c["non_embedding"], "embedding": emb, **c, "tied_head": tied}


def _dims(config) -> dict[str, Any]:
    """The shape numbers the formulas need, read from any HF transformer config."""
    g = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), None)  # noqa: E731
    d = {
        "layers": g("num_hidden_layers", "n_layer"),
        "hidden": g("hidden_size", "n_embd", "d_model"),
        "heads": g("num_attention_heads", "n_head"),
        "vocab": g("vocab_size"),
        "model_type": getattr(config, "model_type", "?"),
    }
    d["ffn"] = g("intermediate_size", "n_inner") or 4 * d["hidden"]
    d["gated_mlp"] = d["model_type"] in GATED_MLP_TYPES
    d["max_positions"] = g("max_position_embeddings", "n_positions")
    missing = [k for k, v in d.items() if v is None and k != "max_positions"]
    if missing:
        raise ConfigError(f"a '{d['model_type']}' config does not say its {', '.join(missing)}")
    return d


# ------------------------------------------------------------------------------------------------ FLOPs


def training_flops(
    n_non_embedding: int, tokens: int, n_layers: int, seq_len: int, hidden: int, vocab_size: int = 0
) -> dict[str, float]:
    """Training FLOPs for ``tokens`` tokens: ``6 (N + V d) D + 6 L T d D`` (Kaplan et al. 2020, Table 1).

    ``6 N D``: forward 2 FLOPs per weight per token, backward twice that. ``6 L T d D``: attention
    scores QK^T and the weighted sum AV, 2 L T d per token forward over the full context T (no causal
    discount), x3 for forward + backward. ``V d``: the output projection to the vocabulary (pass
    ``vocab_size=0`` for Kaplan's exact convention, which leaves it out).
    """
    dense = 6 * (n_non_embedding + vocab_size * hidden) * tokens
    attention = 6 * n_layers * seq_len * hidden * tokens
    return {
        "total": float(dense + attention),
        "dense": float(dense),
        "attention": float(attention),
        "per_token": float(dense + attention) / tokens,
    }


def inference_flops_per_token(
    n_non_embedding: int, n_layers: int, seq_len: int, hidden: int, vocab_size: int = 0
) -> float:
    """Forward FLOPs per token: ``2 (N + V d) + 2 L T d`` (a third of the training cost per token)."""
    return float(2 * (n_non_embedding + vocab_size * hidden) + 2 * n_layers * seq_len * hidden)


# ------------------------------------------------------------------------------------------------ memory

_ACT_BYTES = {"fp32": 4, "bf16": 2}


def memory(
    config,
    batch: int,
    seq_len: int,
    *,
    n_params: int | None = None,
    optimizer: str = "adamw",
    precision: str = "fp32",
    objective: str | None = None,
) -> dict[str, Any]:
    """Training memory in bytes: weights + grads + optimizer state + activations, with a breakdown.

    Weights, gradients and optimizer state stay fp32 under either precision (bf16 is autocast over fp32
    master weights): 4 + 4 bytes per parameter, plus 8 for AdamW's two moments (0 for SGD without
    momentum). Activations per layer, in elements (Korthikanti et al. 2022 re-done for dropout 0):
    ``B T (8 d + 2 f) + a B T^2`` (GELU MLP) or ``B T (8 d + 4 f) + a B T^2`` (SwiGLU), times 4 bytes
    for fp32 or 2 for bf16; plus the embedding output (B T d) and fp32 logits with the loss's
    log-softmax (2 B T V x 4 bytes). With ``objective`` given and a head :mod:`lmloop.losses` fuses
    (LLaMA-family CLM, BERT MLM) the logits term is instead the gradient of the hidden states it keeps
    (B T d x 4) plus the head's fp32 weight gradient (V d x 4); its few-MB logits chunk is left out.
    An estimate (+-30%): allocator slack and temporaries are not in it.
    """
    if optimizer not in ("adamw", "sgd"):
        raise ConfigError(f"optimizer '{optimizer}': expected adamw or sgd")
    if precision not in _ACT_BYTES:
        raise ConfigError(f"precision '{precision}': expected one of {', '.join(_ACT_BYTES)}")
    d = _dims(config)
    if n_params is None:
        n_params = count_params(config)["total"]
    B, T, h, f, a, L, V = batch, seq_len, d["hidden"], d["ffn"], d["heads"], d["layers"], d["vocab"]
    ab = _ACT_BYTES[precision]
    # saved for backward, per layer: norm inputs 2BTh, QKV input BTh, Q and K 2BTh, V BTh, out-proj
    # input BTh, MLP input BTh = 8BTh; GELU: its input and output 2BTf; SwiGLU: gate, up, silu(gate),
    # product 4BTf; softmax probabilities aBT^2 (absent with fused SDPA kernels: an upper bound)
    per_layer = (B * T * (8 * h + (4 if d["gated_mlp"] else 2) * f) + a * B * T * T) * ab
    layers = L * per_layer
    embed = B * T * h * ab
    logits = 2 * B * T * V * 4  # HF upcasts logits to fp32 for the loss
    if objective is not None:
        from lmloop.losses import fused_head_for_config

        if fused_head_for_config(config, objective) != "stock":
            logits = B * T * h * 4 + V * h * 4  # grad of h (all positions: an upper bound for MLM) + grad W
    out = {
        "weights": 4 * n_params,
        "grads": 4 * n_params,
        "optimizer": (8 if optimizer == "adamw" else 0) * n_params,
        "activations": layers + embed + logits,
        "activations_per_layer": per_layer,
        "activations_logits": logits,
    }
    out["total"] = out["weights"] + out["grads"] + out["optimizer"] + out["activations"]
    out.update(batch=B, seq_len=T, precision=precision, optimizer_kind=optimizer)
    return out


def compute_optimal_tokens(n_params: int) -> int:
    """Hoffmann et al. 2022: the compute-optimal number of training tokens is about 20 per parameter."""
    return int(TOKENS_PER_PARAM * n_params)


def _verdict(tokens: int, optimal: int) -> str:
    r = tokens / optimal
    if r < 0.8:
        return f"under ({r:.2g}x the compute-optimal)"
    if r > 1.25:
        return f"over ({r:.2g}x the compute-optimal: fine for a small model used a lot)"
    return f"about compute-optimal ({r:.2g}x)"


# ------------------------------------------------------------------------------------------- calibration


def _cache_path():
    from lmloop.assets import home

    return home() / "estimate_calibration.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, value: dict) -> None:
    path = _cache_path()
    known = _read_cache()  # re-read: another process may have added keys meanwhile
    known[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time


def config_hash(config) -> str:
    """sha256 (16 hex) of a config's content, without fields that do not change the compute."""
    d = config.to_dict()
    for k in ("transformers_version", "_name_or_path", "architectures", "id2label", "label2id", "dtype"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _machine_key() -> str:
    import torch

    from lmloop.train import _cpu_key

    return f"{_cpu_key()}|threads={torch.get_num_threads()}"


def _time_steps(fn: Callable[[], Any], warmup: int, steps: int, budget_s: float) -> list[float]:
    """Seconds of each timed call of ``fn`` after ``warmup`` untimed ones; stops early past ``budget_s``
    (but times at least 3). Warm-up pays for allocator growth, oneDNN kernel selection, lazy init."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < steps:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 3 and time.perf_counter() - start > budget_s:
            break
    return times


def _measure(
    model, batch: int, seq_len: int, objective: str, steps: int, warmup: int, budget_s: float
) -> dict:
    """Time training steps (forward + backward + fused AdamW, fp32) and forward-only inference."""
    import torch

    from lmloop.losses import fused_head, lm_loss
    from lmloop.train import build_optimizer

    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (batch, seq_len), generator=g)  # (B, T); packed text has no padding
    if objective == "mlm":
        labels = torch.full_like(ids, -100)  # loss on ~15% of positions, as in BERT pretraining
        pick = torch.rand(batch, seq_len, generator=g) < 0.15
        pick[:, 0] = True
        labels[pick] = ids[pick]
    else:
        labels = ids  # HF shifts inside the loss
    model.train()
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.01)

    kernel = fused_head(model, objective)

    def train_step():  # the loss run_pretrain computes
        loss = lm_loss(model, ids, labels, objective, mode=kernel)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train = _time_steps(train_step, warmup, steps, budget_s)
    model.eval()
    with torch.inference_mode():
        infer = _time_steps(lambda: model(input_ids=ids), warmup, steps, budget_s / 3)
    model.train()
    tokens = batch * seq_len
    tr, inf = statistics.median(train), statistics.median(infer)
    return {
        "train_step_s": tr,
        "train_tokens_per_s": tokens / tr,
        "infer_step_s": inf,
        "infer_tokens_per_s": tokens / inf,
        "train_steps_timed": len(train),
        "infer_steps_timed": len(infer),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def calibrate(
    model,
    batch: int,
    seq_len: int,
    *,
    objective: str | None = None,
    steps: int = 10,
    warmup: int = 2,
    budget_s: float = 3.0,
    recalibrate: bool = False,
) -> dict[str, Any]:
    """Measured training and inference tokens/s of ``model`` on this machine at (batch, seq_len).

    Training: the median of up to ``steps`` fp32 forward + backward + fused-AdamW steps (after
    ``warmup``) on random token ids — the same work a pretraining step does, so the estimate can be
    checked against a real run. Inference: the median forward pass under ``inference_mode``. Cached in
    ``$LMLOOP_HOME/estimate_calibration.json`` by (CPU, torch threads, config hash, objective, batch,
    seq_len); ``recalibrate`` measures again. The model's weights are changed (it takes optimizer
    steps): pass a throw-away model. Result has ``cached`` True when read from the cache.
    """
    if objective is None:
        objective = "clm" if type(model).__name__.endswith("ForCausalLM") else "mlm"
    from lmloop.losses import fused_head

    # the loss kernel is in the key: a timing of the stock head must not predict the fused one
    kernel = fused_head(model, objective)
    key = f"{_machine_key()}|{config_hash(model.config)}|{objective}|{kernel}|b{batch}|t{seq_len}"
    if not recalibrate:
        hit = _read_cache().get(key)
        if hit:
            return {**hit, "cached": True, "key": key}
    busy = _machine_busy()
    res = _measure(model, batch, seq_len, objective, steps, warmup, budget_s)
    if busy is None:
        _write_cache(key, res)
    else:  # other jobs shared the cores: good for this estimate at best, never for later ones
        res["contended_load"] = busy
    return {**res, "cached": False, "key": key}


def _machine_busy() -> float | None:
    """The 1-minute load average when other work already fills the cores (load > CPU count), else None.

    A calibration timed while another job runs can be several times slow (measured 2.6x: a MiniLM
    calibration taken during a benchmark predicted 1631 s for a 622 s run) and must not be cached.
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None
    return round(load, 2) if load > (os.cpu_count() or 1) else None


def _measure_gemm(n: int = 1024, rounds: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def gemm_peak_flops(recalibrate: bool = False) -> float:
    """Measured fp32 FLOP/s of a 1024^3 matmul on this machine (best of 5; cached): the MFU denominator."""
    key = f"gemm-fp32-1024|{_machine_key()}"
    if not recalibrate:
        hit = _read_cache().get(key)
        if hit:
            return float(hit["flops_per_s"])
    peak = _measure_gemm()
    _write_cache(key, {"flops_per_s": peak, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return peak


# -------------------------------------------------------------------------------------------- estimate


def _config_from_ref(ref: str):
    """The config.json of a local model directory or packaged model; never the Hub, never remote code."""
    from pathlib import Path

    from transformers import AutoConfig

    from lmloop.assets import resolve_model

    path = resolve_model(ref)
    if not Path(path).is_dir():
        raise ConfigError(
            f"--model {ref}: estimate reads a local model directory or a packaged model, not a Hub id"
        )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"--model {ref}: cannot read {path}/config.json: {str(e).splitlines()[0][:200]}"
        ) from None


def estimate(
    *,
    preset: str | None = None,
    model_ref: str | None = None,
    tokens: int | str,
    objective: str | None = None,
    seq_len: int = 128,
    batch_size: int = 32,
    vocab_size: int = 8192,
    precision: str = "fp32",
    calibrate_time: bool = True,
    recalibrate: bool = False,
) -> dict[str, Any]:
    """Everything about pretraining one model on ``tokens`` tokens: parameters, FLOPs, memory,
    compute-optimal tokens and, when ``calibrate_time``, measured wall time and inference cost.

    Give exactly one of ``preset`` (a name in :data:`lmloop.presets.PRESETS`, at ``vocab_size``) or
    ``model_ref`` (a local model directory or packaged name; its config.json, random weights).
    """
    from lmloop.presets import OBJECTIVES, build_config, build_model, default_objective, get_preset

    if (preset is None) == (model_ref is None):
        raise ConfigError("give exactly one of --preset NAME or --model REF")
    tokens = parse_count(tokens)
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch size {batch_size} and sequence length {seq_len} must be positive")
    if objective is not None and objective not in OBJECTIVES:
        raise ConfigError(f"--objective {objective}: expected one of {', '.join(OBJECTIVES)}")
    if preset is not None:
        p = get_preset(preset)
        config = build_config(preset, vocab_size=vocab_size, seq_len=seq_len)
        objective = objective or p.objective
        name = preset
    else:
        config = _config_from_ref(model_ref)
        objective = objective or default_objective(config)
        name = model_ref
    dims = _dims(config)
    if dims["max_positions"] and seq_len > dims["max_positions"]:
        raise ConfigError(f"--seq-len {seq_len} is longer than the model's {dims['max_positions']} positions")
    import torch

    if calibrate_time:
        torch.manual_seed(0)
        model = build_model(config, objective)
    else:
        with torch.device("meta"):  # shapes only: no memory, no init
            model = build_model(config, objective)
    params = count_params(model)
    L, T, h, V = dims["layers"], seq_len, dims["hidden"], dims["vocab"]
    flops = training_flops(params["non_embedding"], tokens, L, T, h, vocab_size=V)
    inf_per_token = inference_flops_per_token(params["non_embedding"], L, T, h, vocab_size=V)
    mem = memory(
        config, batch_size, seq_len, n_params=params["total"], precision=precision, objective=objective
    )
    optimal = compute_optimal_tokens(params["total"])
    out: dict[str, Any] = {
        "model": name,
        "architecture": type(model).__name__,
        "objective": objective,
        "dims": dims,
        "tokens": tokens,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "steps": math.ceil(tokens / (batch_size * seq_len)),
        "params": params,
        "flops": {
            **flops,
            "inference_per_token": inf_per_token,
            "inference_per_1k_tokens": 1000 * inf_per_token,
        },
        "memory": mem,
        "compute_optimal": {
            "tokens": optimal,
            "tokens_per_param": TOKENS_PER_PARAM,
            "ratio": tokens / optimal,
            "verdict": _verdict(tokens, optimal),
        },
        "calibration": None,
        "wall": None,
        "inference": {"flops_per_1k_tokens": 1000 * inf_per_token},
    }
    if calibrate_time:
        if precision != "fp32":
            raise ConfigError("wall time is calibrated in fp32 only; use --no-calibrate for other precisions")
        cal = calibrate(model, batch_size, seq_len, objective=objective, recalibrate=recalibrate)
        peak = gemm_peak_flops(recalibrate=recalibrate)
        seconds = tokens / cal["train_tokens_per_s"]
        achieved = flops["total"] / seconds
        out["calibration"] = {**cal, "gemm_peak_flops_per_s": peak, "torch_threads": torch.get_num_threads()}
        out["wall"] = {
            "seconds": seconds,
            "train_tokens_per_s": cal["train_tokens_per_s"],
            "achieved_flops_per_s": achieved,
            "mfu": achieved / peak,
        }
        out["inference"].update(
            tokens_per_s=cal["infer_tokens_per_s"], seconds_per_1k_tokens=1000 / cal["infer_tokens_per_s"]
        )
    return out


# ------------------------------------------------------------------------------------------------- format


def _num(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def _flops(n: float) -> str:
    for div, unit in ((1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.3g} FLOP"


def _bytes(n: float) -> str:
    for div, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


def _duration(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.3g} ms"
    if s < 120:
        return f"{s:.3g} s"
    if s < 2 * 3600:
        return f"{s / 60:.3g} min"
    if s < 3 * 86400:
        return f"{s / 3600:.3g} h"
    return f"{s / 86400:.3g} days"


def format_estimate(d: dict[str, Any]) -> str:
    """A readable table of an :func:`estimate` result (human units)."""
    p, f, m, c, dm = d["params"], d["flops"], d["memory"], d["compute_optimal"], d["dims"]
    head = f"{d['model']} ({d['architecture']}, {d['objective']}): {dm['layers']} layers x {dm['hidden']}, "
    head += f"{dm['heads']} heads, FFN {dm['ffn']}, vocab {dm['vocab']}"
    rows: list[tuple[str, str, str]] = []

    def row(k: str, v: str, note: str = "") -> None:
        rows.append((k, v, note))

    row("parameters", _num(p["total"]), "tied LM head" if p["tied_head"] else "untied LM head")
    row(
        "  embedding",
        _num(p["embedding"]),
        f"token {_num(p['token_embedding'])}, position "
        f"{_num(p['position_embedding'])}, head {_num(p['lm_head'])}",
    )
    row("  non-embedding", _num(p["non_embedding"]), "attention, MLP, norms")
    row("tokens", _num(d["tokens"]), f"{d['steps']:,} steps of {d['batch_size']} x {d['seq_len']}")
    row("compute-optimal", _num(c["tokens"]), f"{c['tokens_per_param']} tokens/param; {c['verdict']}")
    row(
        "training FLOPs",
        _flops(f["total"]),
        f"6(N+Vd)D {_flops(f['dense'])} + attention 6LTdD {_flops(f['attention'])}",
    )
    row(
        "memory (train)",
        _bytes(m["total"]),
        f"batch {m['batch']} x {m['seq_len']}, {m['precision']} {m['optimizer_kind']}",
    )
    row("  weights", _bytes(m["weights"]), "fp32")
    row("  gradients", _bytes(m["grads"]), "fp32")
    row(
        "  optimizer",
        _bytes(m["optimizer"]),
        "AdamW: 2 fp32 moments" if m["optimizer_kind"] == "adamw" else "SGD",
    )
    row(
        "  activations",
        _bytes(m["activations"]),
        f"{_bytes(m['activations_per_layer'])}/layer, LM head+loss {_bytes(m['activations_logits'])}",
    )
    w = d.get("wall")
    if w:
        cal = d["calibration"]
        how = "cached" if cal["cached"] else f"measured {cal['train_steps_timed']} steps"
        if cal.get("contended_load"):
            how += f"; machine busy, load {cal['contended_load']}: likely slow, not cached"
        row(
            "wall time",
            _duration(w["seconds"]),
            f"{_num(w['train_tokens_per_s'])} tokens/s ({how}, {cal['torch_threads']} threads)",
        )
        row(
            "  achieved",
            _flops(w["achieved_flops_per_s"]) + "/s",
            f"MFU {w['mfu']:.0%} of a measured fp32 GEMM peak {_flops(cal['gemm_peak_flops_per_s'])}/s",
        )
    else:
        row("wall time", "not measured", "--no-calibrate")
    inf = d["inference"]
    note = f"{_num(inf['tokens_per_s'])} tokens/s forward" if "tokens_per_s" in inf else ""
    row("inference/1k tokens", _flops(inf["flops_per_1k_tokens"]), note)
    if "seconds_per_1k_tokens" in inf:
        row(
            "  time/1k tokens",
            _duration(inf["seconds_per_1k_tokens"]),
            f"batch {d['batch_size']} x {d['seq_len']}",
        )
    kw = max(len(r[0]) for r in rows)
    vw = max(len(r[1]) for r in rows)
    return head + "\n" + "\n".join(f"  {k:{kw}s}  {v:>{vw}s}  {n}".rstrip() for k, v, n in rows)

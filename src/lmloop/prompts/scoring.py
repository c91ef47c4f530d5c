"""Label-constrained classification with a causal LM: no free text is generated or parsed.

For each prompt ``n`` and label ``l`` the score is ``sum_t log p(c_l[t] | prompt_n, c_l[:t])``: the
log-likelihood of the label's continuation (its verbalizer's tokens + the end-of-turn token). The work is
shared three ways, so the cost is about one forward pass per prompt, not one per (prompt, label):

1. the prefix common to all prompts (system prompt + fixed few-shot examples) is run once; its KV cache
   is broadcast to every batch;
2. each prompt's own suffix is run once (batched, right-padded: causal attention keeps pads out of the
   real positions), and the first continuation token of every label is read off its last position;
3. the rest of the continuations (usually just the end-of-turn token) run on the suffix cache repeated
   once per label, with an attention mask that hides the suffix pads and explicit position ids.

Contextual calibration (Zhao et al. 2021, "Calibrate Before Use"): the label distribution on content-free
inputs ("N/A", "", "[MASK]") measures the prompt's own bias; ``p_cal ∝ p / p_cf``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lmloop.errors import ConfigError
from lmloop.prompts.templates import PromptTemplate, label_continuations, prompt_ids

CONTENT_FREE = ("N/A", "", "[MASK]")
Shots = Sequence[tuple[str, str]]


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return n


def _cache_tensors(cache) -> list[tuple]:
    # one (keys, values) pair per layer, each (B, H_kv, T, D)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _new_cache(model, tensors: list[tuple], batch: int):
    from transformers import DynamicCache

    data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in tensors]
    return DynamicCache(ddp_cache_data=data, config=model.config)


def label_logprobs(
    model,
    tokenizer,
    prompts: list[list[int]],
    continuations: list[list[int]],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(N, L) float64: ``sum log p(continuation_l | prompt_n)`` for every prompt and continuation.

    Exact (up to float error) against scoring each ``prompt + continuation`` sequence on its own; see the
    module docstring for how the prompt work is shared. ``progress(k)`` is called after each batch of k
    prompts."""
    import torch

    if not prompts:
        return np.zeros((0, len(continuations)))
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ConfigError("every label continuation needs at least one token")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("a prompt rendered to zero tokens")
    n_labels = len(continuations)
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(map(len, prompts)) + max(map(len, continuations))
    if limit and longest > limit:
        raise ConfigError(f"prompt + answer is {longest} tokens, over the model's context of {limit}")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)  # any id works: pad positions are never read or attended

    out = np.zeros((len(prompts), n_labels), dtype=np.float64)
    first_tok = torch.tensor([c[0] for c in continuations])  # (L,)
    rest_len = max(len(c) for c in continuations) - 1
    # continuation tokens fed in stage 3 (all but the last) and the targets they predict (all but the first)
    feed = torch.full((n_labels, max(rest_len, 1)), pad, dtype=torch.long)
    target = torch.zeros((n_labels, max(rest_len, 1)), dtype=torch.long)
    tmask = torch.zeros((n_labels, max(rest_len, 1)), dtype=torch.bool)
    for i, c in enumerate(continuations):
        feed[i, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
        target[i, : len(c) - 1] = torch.tensor(c[1:], dtype=torch.long)
        tmask[i, : len(c) - 1] = True

    with torch.inference_mode():
        # 1. the shared prefix, once (keep >= 1 token per prompt for stage 2 to read its last logits)
        n_pre = min(_common_prefix(prompts), min(map(len, prompts)) - 1)
        prefix = None
        if n_pre > 0:
            res = model(input_ids=torch.tensor([prompts[0][:n_pre]]), use_cache=True, logits_to_keep=1)
            prefix = _cache_tensors(res.cache)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            b = len(idx)
            lens = torch.tensor([len(prompts[i]) - n_pre for i in idx])  # (B,)
            width = int(lens.max())
            ids = torch.full((b, width), pad, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : lens[r]] = torch.tensor(prompts[i][n_pre:], dtype=torch.long)
            cache = _new_cache(model, prefix, b) if prefix is not None else None
            # 2. the suffixes; logits only at each row's last real position
            keep = torch.unique(lens - 1)
            res = model(input_ids=ids, cache=cache, use_cache=rest_len > 0, logits_to_keep=keep)
            col = torch.searchsorted(keep, lens - 1)
            last = res.logits[torch.arange(b), col].float().log_softmax(-1)  # (B, V)
            score = last[:, first_tok]  # (B, L)
            if rest_len > 0:
                # 3. the rest of every continuation: rows (B*L) = each prompt repeated once per label
                cache = res.cache
                cache.batch_repeat_interleave(n_labels)
                real = torch.arange(width)[None, :] < lens[:, None]  # (B, W) suffix positions that are real
                mask = torch.cat(
                    [
                        torch.ones(b, n_pre, dtype=torch.long),
                        real.long(),
                        torch.ones(b, rest_len, dtype=torch.long),
                    ],
                    dim=1,
                ).repeat_interleave(n_labels, dim=0)  # (B*L, P+W+C)
                pos = (n_pre + lens)[:, None] + torch.arange(rest_len)[None, :]  # (B, C)
                res2 = model(
                    input_ids=feed[:, :rest_len].repeat(b, 1),
                    attention_mask=mask,
                    position_ids=pos.repeat_interleave(n_labels, dim=0),
                    cache=cache,
                    use_cache=False,
                )
                lp = res2.logits.float().log_softmax(-1)  # (B*L, C, V)
                tgt = target[:, :rest_len].repeat(b, 1)
                picked = lp.gather(-1, tgt[..., None])[..., 0] * tmask[:, :rest_len].repeat(b, 1)
                score = score + picked.sum(-1).view(b, n_labels)
            out[idx] = score.double().numpy()
            if progress is not None:
                progress(b)
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def content_free_bias(
    model,
    tokenizer,
    template: PromptTemplate,
    label_ids: list[list[int]] | None = None,
    shots: Shots = (),
    content_free: Sequence[str] = CONTENT_FREE,
    batch_size: int = 8,
) -> np.ndarray:
    """(L,) the template's label distribution on content-free inputs, averaged (Zhao et al. 2021): what the
    prompt (and its shots) alone push the model to answer."""
    conts = label_ids if label_ids is not None else label_continuations(tokenizer, template)
    rows = [prompt_ids(tokenizer, template.messages(t, shots)) for t in content_free]
    p = _softmax(label_logprobs(model, tokenizer, rows, conts, batch_size))
    return p.mean(axis=0)


@dataclass
class Scored:
    """What :func:`score_texts` measured: predictions, calibrated and raw probabilities, prompt sizes."""

    labels: list[str]  # label values, the columns of the probability arrays
    pred: list[str]
    probs: np.ndarray  # (N, L) after calibration when asked for, else == raw
    raw: np.ndarray  # (N, L) softmax over the label log-likelihoods
    prompt_tokens: list[int]
    content_free: dict[tuple, np.ndarray] = field(default_factory=dict)  # shots key -> (L,)


def _per_item_shots(shots, n: int) -> list[Shots]:
    if not shots:
        return [()] * n
    if isinstance(shots[0], (tuple, list)) and len(shots[0]) == 2 and isinstance(shots[0][0], str):
        return [tuple(shots)] * n  # one set of (text, label) pairs for every text
    if len(shots) != n:
        raise ConfigError(f"per-item shots: got {len(shots)} lists for {n} texts")
    return [tuple(s) for s in shots]


def score_texts(
    model,
    tokenizer,
    template: PromptTemplate,
    texts: Sequence[str],
    shots=None,
    calibrate: bool = False,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Scored:
    """Score every label for every text under ``template``. ``shots`` is one list of (text, label) pairs for
    all texts, or one such list per text (e.g. nearest neighbours). With ``calibrate`` the content-free
    bias is measured once per distinct shot set and divided out."""
    if template.task != "classify" or not template.labels:
        raise ConfigError(f"{template.path}: template '{template.name}' is not a classify template")
    per = _per_item_shots(shots, len(texts))
    prompts = [prompt_ids(tokenizer, template.messages(t, s)) for t, s in zip(texts, per, strict=True)]
    conts = label_continuations(tokenizer, template)
    raw = _softmax(label_logprobs(model, tokenizer, prompts, conts, batch_size, progress))
    probs, cf = raw, {}
    if calibrate and len(texts):
        for key in dict.fromkeys(per):
            cf[key] = content_free_bias(model, tokenizer, template, conts, key, batch_size=batch_size)
        bias = np.stack([cf[key] for key in per])  # (N, L)
        probs = raw / np.maximum(bias, 1e-12)
        probs = probs / probs.sum(axis=1, keepdims=True)
    values = template.label_values
    pred = [values[j] for j in probs.argmax(axis=1)] if len(texts) else []
    return Scored(values, pred, probs, raw, [len(p) for p in prompts], cf)


def classify(
    model, tokenizer, template: PromptTemplate, texts: Sequence[str], shots=None, calibrate: bool = False
) -> tuple[list[str], np.ndarray]:
    """Label ``texts`` with ``template``: (predicted label values, probabilities (N, L) over
    ``template.label_values``), optionally contextually calibrated."""
    s = score_texts(model, tokenizer, template, texts, shots, calibrate)
    return s.pred, s.probs

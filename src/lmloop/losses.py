"""Language-model losses that never hold the (tokens x vocabulary) logits in memory.

A causal LM's stock loss computes ``logits = h @ W.T`` for every position, a (B*T, V) fp32 tensor
(32 x 128 tokens x 8k vocabulary = 134 MB for the tiny GPT), then ``log_softmax`` + NLL, and on the way
back ``nll_backward`` + ``log_softmax_backward``: five full passes over that tensor through main memory,
plus the two matmuls that read it. Profiling the tiny GPT put 15-17% of a training step there.

:func:`linear_cross_entropy` is the same loss, computed chunk by chunk (a few hundred rows of logits at
a time, small enough to stay in cache): each chunk's logits become its gradient in place
(``softmax - onehot``), which is multiplied straight into the gradients of ``h`` and ``W``. The
gradients are therefore computed in the forward pass (the loss is the last node of the graph, so its
upstream gradient is a scalar the backward merely applies). Same maths as
``F.cross_entropy(h @ W.T + b, y)`` in fp32, to rounding; the tests compare loss and gradients.

:func:`lm_loss` routes a model + batch to it when the model's head is a plain linear layer it knows
(LLaMA-family and GPT-2 decoders; BERT's MLM head, which then also runs the head's transform only on
the ~15% masked positions instead of all of them) and falls back to ``model(..., labels=).loss``
otherwise, so any architecture still trains.
"""

from __future__ import annotations

import torch

IGNORE = -100
# decoders whose logits are exactly lm_head(last hidden state): no softcapping, no logit scale
_PLAIN_DECODERS = {"llama", "mistral", "qwen2", "qwen3", "gpt2"}


def _chunk_rows(vocab: int, budget_bytes: int = 2 << 20) -> int:
    """Rows per chunk so one chunk of fp32 logits is ~``budget_bytes`` (cache-sized), 32..1024."""
    return max(32, min(1024, budget_bytes // (4 * max(vocab, 1))))


class _LinearCE(torch.autograd.Function):
    """mean_i CE(h_i @ W.T + b, y_i) over rows with y_i != IGNORE; grads computed in forward."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int):
        with torch.autocast(h.device.type, enabled=False):  # fp32 maths even inside a bf16 autocast
            return _LinearCE._forward(ctx, h, weight, bias, targets, chunk)

    @staticmethod
    def _forward(ctx, h, weight, bias, targets, chunk: int):
        # h: (N, d) fp32, weight: (V, d), bias: (V,) or None, targets: (N,) int64, all rows valid
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if need_h else None
        gw32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        gb32 = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # fp32 throughout, as the stock loss upcasts logits (a no-op copy-free view for fp32 inputs)
        w32 = weight.float()
        b32 = bias.float() if bias is not None else None
        for s in range(0, n, chunk):
            hc, yc = h[s : s + chunk].float(), targets[s : s + chunk]  # (c, d), (c,)
            logits = hc @ w32.T if b32 is None else torch.addmm(b32, hc, w32.T)  # (c, V)
            lse = torch.logsumexp(logits, dim=1)  # (c,)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (c, V)
                g.scatter_add_(1, yc[:, None], torch.full_like(lse[:, None], -1.0))  # - onehot
                if need_h:
                    grad_h[s : s + chunk] = g @ w32  # (c, d)
                if need_w:
                    gw32.addmm_(g.T, hc)  # (V, d)
                if need_b:
                    gb32 += g.sum(0)
        scale = 1.0 / max(n, 1)
        grad_w = gw32.mul_(scale).to(weight.dtype) if need_w else None
        grad_b = gb32.mul_(scale).to(bias.dtype) if need_b else None
        if need_h:
            grad_h.mul_(scale)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return (total * scale).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.saved_tensors
        return (
            gh * grad_out if gh is not None else None,
            gw * grad_out if gw is not None else None,
            gb * grad_out if gb is not None else None,
            None,
            None,
        )


def linear_cross_entropy(h, weight, targets, bias=None, *, chunk: int | None = None):
    """``F.cross_entropy(h @ weight.T + bias, targets, ignore_index=-100)`` without the logits tensor.

    ``h``: (..., d) hidden states, ``weight``: (V, d), ``targets``: (...) int64 with -100 for positions
    that do not count. Mean over the counted positions (NaN-free 0 when there are none, with zero grads).
    """
    d = h.shape[-1]
    h, targets = h.reshape(-1, d), targets.reshape(-1)
    keep = targets != IGNORE
    if not bool(keep.all()):  # drop ignored rows up front: no logits are computed for them
        h, targets = h[keep], targets[keep]
    if h.shape[0] == 0:
        return (h.sum() + weight.sum() * 0.0) * 0.0
    rows = chunk or _chunk_rows(weight.shape[0])
    return _LinearCE.apply(h.contiguous(), weight, bias, targets.contiguous(), rows)


def fused_head_for_config(config, objective: str) -> str:
    """:func:`fused_head` from a config alone (for estimates): ``'fused-clm'``, ``'fused-mlm'`` or ``'stock'``."""
    mt = getattr(config, "model_type", "")
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return "stock"
    if objective == "clm" and mt in _PLAIN_DECODERS:
        return "fused-clm"
    if objective == "mlm" and mt == "bert" and not getattr(config, "is_decoder", False):
        return "fused-mlm"
    return "stock"


def fused_head(model, objective: str) -> str:
    """How :func:`lm_loss` computes ``model``'s loss: ``'fused-clm'``, ``'fused-mlm'`` or ``'stock'``."""
    mode = fused_head_for_config(model.config, objective)
    out = model.get_output_embeddings()
    if mode == "fused-clm" and isinstance(out, torch.nn.Linear) and out.bias is None:
        return mode
    if mode == "fused-mlm" and hasattr(model, "bert") and hasattr(model, "cls"):
        return mode
    return "stock"


def lm_loss(model, input_ids, labels, objective: str, *, attention_mask=None, mode: str | None = None):
    """The model's own LM loss for a batch (CLM: ``labels`` unshifted, as HF takes them; MLM: -100 on
    unmasked positions), through :func:`linear_cross_entropy` when :func:`fused_head` allows it.

    ``input_ids``/``labels``: (B, T) int64. Returns a scalar: the mean over counted target tokens.
    """
    mode = mode or fused_head(model, objective)
    if mode == "fused-clm":
        h = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B,T,d)
        # position t predicts token t+1: drop the last position's state and the first label
        return linear_cross_entropy(h[:, :-1], model.get_output_embeddings().weight, labels[:, 1:])
    if mode == "fused-mlm":
        h = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B,T,d)
        keep = labels != IGNORE  # (B, T): the masked positions, ~15%
        pred = model.cls.predictions
        hk = pred.transform(h[keep])  # (M, d): dense + act + LayerNorm on masked rows only
        return linear_cross_entropy(hk, pred.decoder.weight, labels[keep], bias=pred.decoder.bias)
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

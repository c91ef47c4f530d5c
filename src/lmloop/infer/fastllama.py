"""A lean decode-time forward pass for Llama-family causal LMs (SmolLM2, Llama 2/3, TinyLlama, ...).

The transformers forward is written for every model and every feature; at batch 1 on a CPU a 135M model
spends about a quarter of each decode step in Python and dispatch around the matmuls, and the matmuls
read 540 MB of fp32 weights per token. This module reads the same weights out of a loaded
``LlamaForCausalLM`` and runs the same math with fewer, bigger ops:

- fused projections: q/k/v in one matmul (D -> (H + 2 KV) * hd), gate/up in one (D -> 2 F);
- a preallocated KV cache (L, B, KV, capacity, hd) written in place, grown by doubling, so a step never
  concatenates the whole history;
- grouped-query attention without copying keys: the G = H / KV query heads that share a key head are
  laid out as G * T query rows of that head (one ``scaled_dot_product_attention`` call per layer);
- RoPE from a table built once with the model's own rotary module (every static rope type);
- optional low-precision weights (``quantize``), the matmul inputs cast to bfloat16 while the residual
  stream, norms, attention and the KV cache stay fp32:
  ``"bf16"``: every weight in bfloat16 (half the bytes; AMX/AVX512-BF16 kernels where the CPU has them);
  ``"q4"``: every weight also as 4-bit integers in groups of 32 along the input, each group with its own
  scale and minimum (the Q4_1 layout of llama.cpp), run by ``torch._weight_int4pack_mm_for_cpu`` for
  calls of at most ``Q4_MAX_ROWS`` rows (decoding up to 8 sequences: an eighth of the fp32 bytes), the
  model's own fp32 weights for bigger calls (prompts: there the int4 kernel is slow; bfloat16 copies
  would be faster but are not exact for Q4_1 values and made greedy text drift within a few tokens). A model
  converted from a Q4_1 GGUF (the packaged ``smollm2``) has at most 16 distinct values per group in its
  decoder layers, so q4 gives those weights back up to the bfloat16 rounding of scales.
  The output head's best ``RESCORE`` logits per row are recomputed from the fp32 head (exact argmax).
  (int8 with dynamically quantised activations, ``torch.ops.quantized.linear_dynamic``, was measured and
  dropped: per-tensor activation scales cost SmolLM2 a third of its greedy top-1 agreement.)

It answers the calls :mod:`lmloop.infer.decode` makes of a transformers model: ``model(input_ids=...,
attention_mask=..., position_ids=..., cache=..., logits_to_keep=...)`` returning ``.logits`` (B, T', V)
and ``.cache`` (with ``batch_select_indices``). ``supported(config)`` says which configs it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

QUANTIZE = (None, "bf16", "q4")
Q4_MAX_ROWS = 8  # q4 uses the int4 kernel for calls of at most this many rows (B * T), else fp32
RESCORE = 64  # candidates per row whose logits are recomputed in fp32 (see FastLlama._logits)
Q4_GROUP = 32  # input features per 4-bit group (llama.cpp's Q4_1 block)
_STATIC_ROPE = {"default", "linear", "llama3"}  # rope types whose frequencies do not depend on length


def supported(config: Any) -> str | None:
    """``None`` when :class:`FastLlama` runs this config exactly, else the reason it cannot."""
    if getattr(config, "model_type", None) != "llama":
        return f"model_type {getattr(config, 'model_type', None)!r} is not 'llama'"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "attention/MLP biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in _STATIC_ROPE:
        return f"rope_type {kind!r}"
    return None


def weights_are_4bit(hf_model: Any, rows: int = 64) -> bool:
    """True when every decoder Linear's weights sit on a 16-level grid per group of 32 inputs (checked on
    the first ``rows`` rows of each, in the first, middle and last layer): a model converted from a Q4
    GGUF, which ``q4`` runs without loss; a fine-tune of one moves every row off the grid."""
    import torch

    with torch.no_grad():
        layers = hf_model.model.layers
        for layer in {id(x): x for x in (layers[0], layers[len(layers) // 2], layers[-1])}.values():
            for mod in layer.modules():
                if not isinstance(mod, torch.nn.Linear):
                    continue
                w = mod.weight[:rows].float()
                if w.shape[1] % Q4_GROUP:
                    return False
                grp = w.reshape(w.shape[0], -1, Q4_GROUP)  # (rows, K/32, 32)
                lo, hi = grp.amin(-1, keepdim=True), grp.amax(-1, keepdim=True)
                step = ((hi - lo) / 15).clamp(min=1e-12)
                off = (grp - lo) / step  # a whole number of steps above the group minimum when 4-bit
                if float((off - off.round()).abs().max()) > 1e-3:
                    return False
    return True


@dataclass
class Output:
    logits: Any  # (B, T', V) float32
    cache: KVCache


class KVCache:
    """Keys and values of every layer in two preallocated tensors (L, B, KV, capacity, hd)."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype):
        import torch

        self.k = torch.zeros(layers, batch, kv_heads, capacity, head_dim, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.len = 0

    def reserve(self, n: int) -> None:
        import torch

        cap = self.k.shape[3]
        if n > cap:  # grow by doubling: amortised O(1) per token, never a copy per step
            new = max(n, 2 * cap)
            k = self.k.new_zeros((*self.k.shape[:3], new, self.k.shape[4]))
            v = torch.zeros_like(k)
            k[:, :, :, :cap], v[:, :, :, :cap] = self.k, self.v
            self.k, self.v = k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.len

    def batch_select_indices(self, indices) -> None:
        """Keep only the batch rows ``indices`` (a row that finished leaves the batch)."""
        self.k, self.v = self.k[:, indices], self.v[:, indices]


class FastLlama:
    """The forward pass of a loaded HF ``LlamaForCausalLM`` as a handful of fused ops (see module doc)."""

    def __init__(self, hf_model: Any, quantize: str | None = None):
        import torch

        cfg = hf_model.config
        why = supported(cfg)
        if why:
            raise ValueError(f"FastLlama cannot run this model: {why}")
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        self.config = cfg
        self.quantize = quantize
        self.n_layers = cfg.num_hidden_layers
        self.h = cfg.num_attention_heads
        self.kv = cfg.num_key_value_heads or self.h
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.h
        self.eps = cfg.rms_norm_eps
        self.dtype = torch.float32
        m = hf_model.model
        with torch.no_grad():
            self.embed = m.embed_tokens.weight.detach().float()  # (V, D)
            self.layers = []
            for layer in m.layers:
                a, f = layer.self_attn, layer.mlp
                qkv = [
                    a.q_proj.weight.detach().float(),
                    a.k_proj.weight.detach().float(),
                    a.v_proj.weight.detach().float(),
                ]
                gu = [f.gate_proj.weight.detach().float(), f.up_proj.weight.detach().float()]
                self.layers.append(
                    (
                        layer.input_layernorm.weight.detach().float(),
                        self._linear(qkv),  # ((H+2KV)hd, D) fused
                        self._linear([a.o_proj.weight.detach().float()]),
                        layer.post_attention_layernorm.weight.detach().float(),
                        self._linear(gu),  # (2F, D) fused
                        self._linear([f.down_proj.weight.detach().float()]),
                    )
                )
            self.norm = m.norm.weight.detach().float()
            self.head_fp32 = hf_model.lm_head.weight.detach().float()  # (V, D), often the embedding itself
            self.lm_head = self._linear([self.head_fp32])
            # RoPE tables from the model's own rotary module: (P, hd) each, P = max positions
            n_pos = int(cfg.max_position_embeddings)
            pos = torch.arange(n_pos).unsqueeze(0)
            cos, sin = m.rotary_emb(self.embed[:1].unsqueeze(0), pos)
            self.cos, self.sin = cos[0].float(), sin[0].float()

    def _linear(self, parts: list):
        """fp32 weights (out_i, in) fused along the output, as this backend stores them: the fp32 tensor,
        ("bf16", w), or ("q4", packed, scales, parts) — q4 keeps the (unfused, shared with the HF model)
        fp32 parts for many-row calls (prompts), where the int4 kernel is slow."""
        import torch

        w = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.quantize is None:
            return w.contiguous()
        if self.quantize == "bf16" or w.shape[1] % Q4_GROUP or w.shape[0] % 16:  # the int4 packing's shapes
            return ("bf16", w.to(torch.bfloat16).contiguous())
        n, k = w.shape
        grp = w.reshape(n, k // Q4_GROUP, Q4_GROUP)  # (N, K/32, 32)
        lo, hi = grp.amin(-1), grp.amax(-1)  # (N, K/32)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = (
            torch.round((grp - lo.unsqueeze(-1)) / scale.unsqueeze(-1))
            .clamp(0, 15)
            .to(torch.int32)
            .reshape(n, k)
        )
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        # the kernel computes w = (q - 8) * scale + zero per group: zero = lo + 8 * scale; (K/32, N, 2)
        sz = torch.stack([scale.t(), (lo + 8 * scale).t()], dim=-1).to(torch.bfloat16).contiguous()
        return ("q4", packed, sz, parts)

    def _mm(self, x, w):
        import torch
        import torch.nn.functional as F

        if isinstance(w, torch.Tensor):  # fp32 weight (out, in)
            return F.linear(x, w)
        if w[0] == "bf16":
            return F.linear(x.to(torch.bfloat16), w[1]).float()
        shape = x.shape
        rows = x.numel() // shape[-1]
        if rows > Q4_MAX_ROWS:  # a prompt: the exact fp32 weights (the int4 kernel is slow on many rows)
            return (
                torch.cat([F.linear(x, p) for p in w[3]], dim=-1) if len(w[3]) > 1 else F.linear(x, w[3][0])
            )
        xb = x.to(torch.bfloat16).reshape(rows, shape[-1])  # the kernel takes 2-D bfloat16 input
        y = torch._weight_int4pack_mm_for_cpu(xb, w[1], Q4_GROUP, w[2])
        return y.reshape(*shape[:-1], y.shape[-1]).float()

    def _logits(self, x):
        """(B, T, D) final hidden states -> (B, T, V) fp32 logits.

        With low-precision weights the head runs in low precision, then the ``RESCORE`` best candidates
        of each row are recomputed from the fp32 head: bfloat16 logits come in steps of 0.125 near 25 and
        turn near-ties into ties (on SmolLM2 that flipped the first answer token); greedy picks and top-k
        sampling (k <= 64) see exact values, the far tail keeps the bfloat16 ones.
        """
        import torch

        if self.quantize is None:
            return self._mm(x, self.lm_head)
        logits = self._mm(x, self.lm_head)  # (B, T, V) approximate
        idx = logits.topk(min(RESCORE, logits.shape[-1]), dim=-1).indices  # (B, T, R)
        exact = torch.einsum("btd,btrd->btr", x, self.head_fp32[idx])  # (B, T, R) from fp32 rows
        return logits.scatter_(-1, idx, exact)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        cache: KVCache | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
        **_: Any,
    ) -> Output:
        import torch
        import torch.nn.functional as F

        b, t = input_ids.shape
        h, kv, hd = self.h, self.kv, self.hd
        g = h // kv  # query heads per key/value head
        if cache is None:
            cache = KVCache(self.n_layers, b, kv, hd, t + 256, self.dtype)
        start, end = cache.len, cache.len + t
        cache.reserve(end)
        if position_ids is None:
            position_ids = torch.arange(start, end).unsqueeze(0).expand(b, t)
        cos = self.cos[position_ids].unsqueeze(1)  # (B, 1, T, hd)
        sin = self.sin[position_ids].unsqueeze(1)
        mask = None  # a single new token with no padding sees everything cached
        if t > 1 or attention_mask is not None:
            q_pos = torch.arange(start, end).unsqueeze(1)  # (T, 1) absolute slot of each query
            allowed = torch.arange(end).unsqueeze(0) <= q_pos  # (T, S) causal
            allowed = allowed.unsqueeze(0)  # (1, T, S)
            if attention_mask is not None:
                allowed = allowed & attention_mask[:, :end].bool().unsqueeze(1)  # (B, T, S)
                # a padding query would see no key at all (NaN); let it see itself, it is never read
                allowed = allowed | (torch.arange(end).unsqueeze(0) == q_pos).unsqueeze(0)
            # the G query heads of a group are G * T rows: repeat the (T, S) mask per head in the group
            mask = allowed.unsqueeze(1).repeat(1, 1, g, 1)  # (B|1, 1, G*T, S)
        x = self.embed[input_ids]  # (B, T, D)
        for i, (ln1, wqkv, wo, ln2, wgu, wd) in enumerate(self.layers):
            y = F.rms_norm(x, (x.shape[-1],), ln1, self.eps)
            qkv = self._mm(y, wqkv).view(b, t, h + 2 * kv, hd).transpose(1, 2)  # (B, H+2KV, T, hd)
            q, k, v = qkv.split([h, kv, kv], dim=1)
            q = q * cos + _rotate_half(q) * sin  # (B, H, T, hd)
            k = k * cos + _rotate_half(k) * sin  # (B, KV, T, hd)
            cache.k[i, :, :, start:end] = k
            cache.v[i, :, :, start:end] = v
            # (B, H, T, hd) -> (B, KV, G*T, hd): a group's query heads become rows against one key head
            q = q.reshape(b, kv, g * t, hd)
            o = F.scaled_dot_product_attention(
                q, cache.k[i, :, :, :end], cache.v[i, :, :, :end], attn_mask=mask
            )
            o = o.view(b, h, t, hd).transpose(1, 2).reshape(b, t, h * hd)  # (B, T, H*hd)
            x = x + self._mm(o, wo)
            y = F.rms_norm(x, (x.shape[-1],), ln2, self.eps)
            gate, up = self._mm(y, wgu).chunk(2, dim=-1)  # (B, T, F) each
            x = x + self._mm(F.silu(gate) * up, wd)
        cache.len = end
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)
        return Output(logits=self._logits(x), cache=cache)


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

"""lmloop.losses: the chunked fused LM head equals the stock loss, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmloop.losses import fused_head, fused_head_for_config, linear_cross_entropy, lm_loss
from lmloop.presets import build_config, build_model


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [7, 64, None])
def test_linear_cross_entropy_matches_cross_entropy(with_bias, chunk):
    g = torch.Generator().manual_seed(0)
    N, d, V = 150, 16, 97  # N not a multiple of the chunk: the last chunk is short
    h = torch.randn(N, d, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(V, d, generator=g)).requires_grad_()
    b = torch.randn(V, generator=g, requires_grad=True) if with_bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100  # ignored positions count neither in the mean nor in the gradients
    params = [h, w] + ([b] if with_bias else [])
    ref = F.cross_entropy(h @ w.T + (b if with_bias else 0), y)
    got = linear_cross_entropy(h, w, y, bias=b, chunk=chunk)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    for a, c in zip(_grads(ref, params), _grads(got, params), strict=True):
        assert torch.allclose(a, c, atol=1e-6, rtol=1e-4)
    # an upstream scale (loss * k, as DDP's shard weighting does) reaches every gradient
    ref = F.cross_entropy(h @ w.T + (b if with_bias else 0), y)
    got = linear_cross_entropy(h, w, y, bias=b, chunk=chunk)
    for a, c in zip(_grads(3 * ref, params), _grads(3 * got, params), strict=True):
        assert torch.allclose(a, c, atol=1e-6, rtol=1e-4)


def test_linear_cross_entropy_all_ignored_is_zero_with_zero_grads():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((4,), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and not h.grad.any() and not w.grad.any()


def test_linear_cross_entropy_without_grad_is_the_loss():
    h, w, y = torch.randn(33, 8), torch.randn(11, 8), torch.randint(0, 11, (33,))
    with torch.inference_mode():
        got = linear_cross_entropy(h, w, y, chunk=4)
    assert torch.allclose(got, F.cross_entropy(h @ w.T, y), atol=1e-5)


def _tiny(preset: str, objective: str, vocab: int = 64):
    torch.manual_seed(0)
    return build_model(build_config(preset, vocab_size=vocab, seq_len=16), objective)


def _check_same_as_stock(model, ids, labels, objective, expect_mode):
    mode = fused_head(model, objective)
    assert mode == expect_mode
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(input_ids=ids, labels=labels).loss
    got = lm_loss(model, ids, labels, objective, mode=mode)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (float(got), float(ref))
    for p, a, c in zip(params, _grads(ref, params), _grads(got, params), strict=True):
        if a is None:
            assert c is None or not c.any()
            continue
        assert torch.allclose(a, c, atol=1e-6, rtol=1e-3), p.shape


def test_fused_clm_equals_llama_loss_and_gradients():
    model = _tiny("gpt-tiny", "clm")
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    _check_same_as_stock(model, ids, ids, "clm", "fused-clm")


def test_fused_mlm_equals_bert_loss_and_gradients_on_masked_rows_only():
    model = _tiny("bert-tiny", "mlm")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 64, (3, 16), generator=g)
    labels = torch.full_like(ids, -100)
    pick = torch.rand(3, 16, generator=g) < 0.2
    pick[0, 0] = True
    labels[pick] = ids[pick]
    _check_same_as_stock(model, ids, labels, "mlm", "fused-mlm")


def test_unknown_heads_fall_back_to_the_stock_loss():
    # BERT as a causal decoder (BertLMHeadModel) is not a head the fused path knows
    cfg = build_config("bert-tiny", vocab_size=64, seq_len=16)
    model = build_model(cfg, "clm")
    assert fused_head(model, "clm") == "stock"
    ids = torch.randint(0, 64, (2, 16))
    assert torch.allclose(lm_loss(model, ids, ids, "clm"), model(input_ids=ids, labels=ids).loss)
    cfg = build_config("gpt-tiny", vocab_size=64, seq_len=16)
    cfg.final_logit_softcapping = 30.0  # Gemma-style capping changes the logits: never fused
    assert fused_head_for_config(cfg, "clm") == "stock"

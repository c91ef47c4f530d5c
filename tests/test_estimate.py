"""Pretraining presets and the cost estimate: counts and formulas against hand arithmetic, the measured
calibration and its cache, and the ``lmloop estimate`` command."""

from __future__ import annotations

import json

import pytest

from lmloop import estimate as est
from lmloop.errors import ConfigError
from lmloop.presets import PRESETS, build_config, build_model, get_preset

V = 8192  # the default preset vocabulary


def test_bert_tiny_params_by_hand():
    # bert-tiny: L=2, d=128, heads=2, FFN f=512, 512 positions, 2 token types, tied MLM decoder
    d, f, L, P = 128, 512, 2, 512
    token = V * d  # 1,048,576
    position = P * d + 2 * d  # positions 65,536 + token types 256
    emb_norm = 2 * d  # embedding LayerNorm weight + bias
    attention = 4 * (d * d + d)  # Q, K, V, output dense with biases: 66,048
    ffn = (d * f + f) + (f * d + d)  # intermediate + output dense: 131,712
    norms = 2 * 2 * d  # two LayerNorms per layer: 512
    layer = attention + ffn + norms  # 198,272
    mlm_transform = (d * d + d) + 2 * d  # cls.predictions.transform dense + LayerNorm: 16,768
    vocab_bias = V  # cls.predictions.bias (the decoder weight is the token embedding)
    non_embedding = emb_norm + L * layer + mlm_transform
    c = est.count_params(build_config("bert-tiny", V, 128), "mlm")
    assert c["token_embedding"] == token
    assert c["position_embedding"] == position
    assert c["lm_head"] == vocab_bias
    assert c["non_embedding"] == non_embedding == 413_568
    assert c["embedding"] == token + position + vocab_bias
    assert c["total"] == token + position + vocab_bias + non_embedding == 1_536_128
    assert c["tied_head"]


def test_gpt_tiny_params_by_hand():
    # gpt-tiny (LLaMA): L=2, d=128, f=512, no biases, RMSNorm weight only, RoPE (no position params), tied head
    d, f, L = 128, 512, 2
    token = V * d
    layer = 4 * d * d + 3 * d * f + 2 * d  # q,k,v,o + gate,up,down + 2 RMSNorms = 262,400
    non_embedding = L * layer + d  # + final RMSNorm
    model = build_model(build_config("gpt-tiny", V, 128), "clm")
    c = est.count_params(model)
    assert (c["token_embedding"], c["position_embedding"], c["lm_head"]) == (token, 0, 0)
    assert c["non_embedding"] == non_embedding == 524_928
    assert c["total"] == token + non_embedding == sum(p.numel() for p in model.parameters())
    assert c["tied_head"]


def test_untied_head_is_counted_as_embedding():
    cfg = build_config("gpt-tiny", 256, 32)
    cfg.tie_word_embeddings = False
    c = est.count_params(cfg, "clm")
    assert c["lm_head"] == 256 * 128 and c["token_embedding"] == 256 * 128 and not c["tied_head"]


def test_preset_shapes_and_unknown_name():
    assert set(PRESETS) == {"bert-tiny", "bert-mini", "bert-small", "gpt-tiny", "gpt-mini", "gpt-small"}
    cfg = build_config("gpt-small", 1000, 2048)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (
        6,
        384,
        6,
        1536,
    )
    assert cfg.max_position_embeddings == 2048 and cfg.tie_word_embeddings
    assert build_config("bert-mini").hidden_dropout_prob == 0.0
    with pytest.raises(ConfigError, match="Did you mean 'bert-mini'") as ei:
        get_preset("bert-mnii")
    assert "gpt-small" in str(ei.value)


def test_flops_by_hand():
    # gpt-tiny at T=128 on 10M tokens: N=524,928, V d = 1,048,576, L T d = 2*128*128 = 32,768
    f = est.training_flops(524_928, 10_000_000, 2, 128, 128, vocab_size=V)
    assert f["dense"] == 6 * (524_928 + 1_048_576) * 10_000_000 == 94_410_240_000_000
    assert f["attention"] == 6 * 32_768 * 10_000_000 == 1_966_080_000_000
    assert f["total"] == f["dense"] + f["attention"] and f["per_token"] == f["total"] / 1e7
    # Kaplan's exact convention: no vocabulary term
    assert est.training_flops(1000, 10, 1, 4, 8)["total"] == 6 * 1000 * 10 + 6 * 1 * 4 * 8 * 10
    assert est.inference_flops_per_token(524_928, 2, 128, 128, V) == 2 * (524_928 + 1_048_576) + 2 * 32_768


def test_memory_breakdown_by_hand():
    cfg = build_config("bert-tiny", V, 128)
    n = 1_536_128
    B, T, d, f, a = 4, 16, 128, 512, 2
    m = est.memory(cfg, B, T, n_params=n)
    assert (m["weights"], m["grads"], m["optimizer"]) == (4 * n, 4 * n, 8 * n)
    per_layer = (B * T * (8 * d + 2 * f) + a * B * T * T) * 4  # GELU MLP, fp32
    assert m["activations_per_layer"] == per_layer
    logits = 2 * B * T * V * 4
    assert m["activations"] == 2 * per_layer + B * T * d * 4 + logits
    assert m["total"] == 16 * n + m["activations"]
    # SwiGLU has four B T f tensors; bf16 halves activations but not the fp32 master state
    g = est.memory(build_config("gpt-tiny", V, 128), B, T, n_params=10, precision="bf16", optimizer="sgd")
    assert g["activations_per_layer"] == (B * T * (8 * d + 4 * f) + 4 * B * T * T) * 2
    assert g["optimizer"] == 0 and g["weights"] == 40
    with pytest.raises(ConfigError, match="precision"):
        est.memory(cfg, B, T, n_params=n, precision="fp8")


def test_compute_optimal_is_20_tokens_per_parameter():
    assert est.compute_optimal_tokens(1_000_000) == 20_000_000
    assert est._verdict(10_000_000, 20_000_000).startswith("under")
    assert est._verdict(100_000_000, 20_000_000).startswith("over")
    assert est._verdict(20_000_000, 20_000_000).startswith("about")


@pytest.mark.parametrize(
    "text,n",
    [
        ("10M", 10_000_000),
        ("2.5B", 2_500_000_000),
        ("300k", 300_000),
        ("1e9", 10**9),
        ("1_000", 1000),
        (7, 7),
    ],
)
def test_parse_count(text, n):
    assert est.parse_count(text) == n


@pytest.mark.parametrize("bad", ["10X", "", "ten", "-5", "0", "1.5"])
def test_parse_count_rejects(bad):
    with pytest.raises(ConfigError, match="--tokens"):
        est.parse_count(bad)


def test_calibration_is_measured_then_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path))
    monkeypatch.setattr(est, "_machine_busy", lambda: None)
    model = build_model(build_config("gpt-tiny", 256, 32), "clm")
    first = est.calibrate(model, 2, 16, steps=3, warmup=1, budget_s=1.0)
    assert not first["cached"]
    assert first["train_tokens_per_s"] > 0 and first["infer_tokens_per_s"] > 0
    assert (tmp_path / "estimate_calibration.json").is_file()

    def no_measuring(*a, **k):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(est, "_measure", no_measuring)
    again = est.calibrate(model, 2, 16, steps=3, warmup=1)
    assert again["cached"] and again["train_tokens_per_s"] == first["train_tokens_per_s"]
    with pytest.raises(AssertionError, match="measured again"):
        est.calibrate(model, 2, 16, recalibrate=True)
    # another shape is another key
    with pytest.raises(AssertionError, match="measured again"):
        est.calibrate(model, 4, 16)


def test_calibration_on_a_busy_machine_is_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path))
    monkeypatch.setattr(est, "_machine_busy", lambda: 4.2)
    model = build_model(build_config("gpt-tiny", 256, 32), "clm")
    first = est.calibrate(model, 2, 16, steps=3, warmup=1, budget_s=1.0)
    assert first["contended_load"] == 4.2 and not first["cached"]
    again = est.calibrate(model, 2, 16, steps=3, warmup=1, budget_s=1.0)
    assert not again["cached"]  # measured again: a contended timing never becomes the cached answer

    monkeypatch.undo()
    monkeypatch.setattr(est.os, "getloadavg", lambda: (99.0, 0.0, 0.0))
    assert est._machine_busy() == 99.0
    monkeypatch.setattr(est.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert est._machine_busy() is None


def test_estimate_with_calibration_uses_the_measured_rate(monkeypatch, tmp_path):
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path))
    fake = {"train_tokens_per_s": 1000.0, "infer_tokens_per_s": 4000.0, "train_steps_timed": 3}
    monkeypatch.setattr(est, "_measure", lambda *a, **k: {**fake, "train_step_s": 1, "infer_step_s": 1})
    monkeypatch.setattr(est, "_measure_gemm", lambda: 1e10)
    d = est.estimate(preset="bert-tiny", tokens="1M", seq_len=16, batch_size=2, vocab_size=256)
    assert d["wall"]["seconds"] == pytest.approx(1000.0)
    assert d["wall"]["achieved_flops_per_s"] == pytest.approx(d["flops"]["total"] / 1000.0)
    assert d["wall"]["mfu"] == pytest.approx(d["wall"]["achieved_flops_per_s"] / 1e10)
    assert d["inference"]["seconds_per_1k_tokens"] == pytest.approx(0.25)
    assert "wall time" in est.format_estimate(d) and "16.7 min" in est.format_estimate(d)


def test_cli_table_and_json(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path))
    code, out, err = cli("estimate", "--preset", "gpt-tiny", "--tokens", "10M", "--no-calibrate")
    assert code == 0, err
    for label in ("parameters", "non-embedding", "training FLOPs", "memory (train)", "compute-optimal"):
        assert label in out
    assert "1.57M" in out and "TFLOP" in out
    code, out, err = cli("estimate", "--preset", "bert-tiny", "--tokens", "300k", "--no-calibrate", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert {"params", "flops", "memory", "compute_optimal", "wall", "inference", "tokens"} <= set(d)
    assert d["tokens"] == 300_000 and d["objective"] == "mlm" and d["wall"] is None


def test_cli_unknown_preset_and_bad_tokens_exit_2(cli):
    code, out, err = cli("estimate", "--preset", "gpt-tniy", "--tokens", "1M", "--no-calibrate")
    assert code == 2 and "gpt-tiny" in err and "bert-small" in err and "Traceback" not in err
    code, out, err = cli("estimate", "--preset", "gpt-tiny", "--tokens", "lots")
    assert code == 2 and "300k, 10M, 2.5B" in err


def test_cli_packaged_model(cli, minilm_dir):
    code, out, err = cli("estimate", "--model", str(minilm_dir), "--tokens", "1M", "--no-calibrate")
    assert code == 0, err
    assert "BertForMaskedLM, mlm" in out and "22.7M" in out
    code, out, err = cli("estimate", "--model", "minilm-l6", "--tokens", "1M", "--no-calibrate", "--json")
    assert code == 0, err
    assert json.loads(out)["params"]["total"] == 22_744_506

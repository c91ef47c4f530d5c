"""``lmloop scaling``: the power-law fit recovers known parameters (exact and noisy points, error bars that
cover the truth), size specs and their errors, and one tiny ladder end to end from the CLI (three sizes,
fit, prediction, the verification run, the shared data, and a re-run that reuses every finished size)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lmloop.errors import ConfigError, LmloopError
from lmloop.scaling import Ladder, fit_power_law, law, next_size, parse_sizes, predict_loss, resolve_size

N = np.array([1e5, 2.5e5, 6e5, 1.5e6, 4e6, 1e7])
TRUE = {"a": 40.0, "alpha": 0.3, "c": 2.5}


# ------------------------------------------------------------------------------------------------- fit


def test_fit_recovers_the_law_from_exact_points():
    fit = fit_power_law(N, law(N, **TRUE))
    for k, v in TRUE.items():
        assert fit[k] == pytest.approx(v, rel=1e-4), k
    assert fit["residual_rms"] < 1e-8 and fit["warnings"] == []
    mean, sigma = predict_loss(fit, 3e7)
    assert mean == pytest.approx(float(law(3e7, **TRUE)), rel=1e-6) and sigma < 1e-6


def test_fit_with_noise_is_close_and_its_error_bars_cover_the_truth():
    """0.3% multiplicative noise: parameters within a few standard errors, and the 1-sigma prediction at 3x
    the largest N is honest: the true loss lies within 3 sigma, and sigma is neither zero nor huge."""
    rng = np.random.default_rng(0)
    y = law(N, **TRUE) * (1 + rng.normal(0, 0.003, len(N)))
    fit = fit_power_law(N, y)
    se = fit["stderr"]
    for k, v in TRUE.items():
        assert se[k] is not None and se[k] > 0
        assert abs(fit[k] - v) < 4 * se[k], (k, fit[k], se[k])
    assert fit["alpha"] == pytest.approx(0.3, abs=0.05) and fit["c"] == pytest.approx(2.5, abs=0.15)
    mean, sigma = predict_loss(fit, 3e7)
    truth = float(law(3e7, **TRUE))
    assert 1e-4 < sigma < 0.1
    assert abs(mean - truth) < 3 * sigma
    # a different law must not fit as well: the fit is not just echoing its start
    assert fit_power_law(N, law(N, a=40.0, alpha=0.6, c=2.5))["alpha"] == pytest.approx(0.6, rel=1e-3)


def test_three_points_fit_exactly_without_an_error_bar():
    fit = fit_power_law(N[:3], law(N[:3], **TRUE))
    assert fit["alpha"] == pytest.approx(0.3, rel=1e-3)
    assert fit["stderr"] == {"a": None, "alpha": None, "c": None} and fit["cov"] is None
    assert any("no error bar" in w for w in fit["warnings"])
    assert predict_loss(fit, 3e7)[1] is None


def test_fit_flags_a_ladder_whose_loss_does_not_fall():
    fit = fit_power_law(N[:4], [3.0, 3.0, 3.0, 3.0])
    assert any("does not fall" in w or "saturated" in w for w in fit["warnings"])


def test_fit_refuses_unusable_points():
    with pytest.raises(ConfigError, match="at least 3"):
        fit_power_law([1e5, 1e6], [3.0, 2.0])
    with pytest.raises(ConfigError, match="same non-embedding"):
        fit_power_law([1e5, 1e5, 1e6], [3.0, 2.9, 2.0])
    with pytest.raises(LmloopError, match="finite and positive"):
        fit_power_law([1e5, 3e5, 1e6], [3.0, float("nan"), 2.0])


# ----------------------------------------------------------------------------------------------- sizes


def test_size_specs():
    from lmloop.presets import build_config, get_preset

    assert resolve_size("2x96", "clm") == "gpt-2x96"
    assert resolve_size(" 2X96 ", "mlm") == "bert-2x96"
    assert resolve_size("gpt-tiny", "clm") == "gpt-tiny"
    p = get_preset("gpt-2x96")
    assert (p.layers, p.hidden, p.heads, p.ffn, p.kind) == (2, 96, 3, 384, "decoder")
    assert get_preset("gpt-1x48").heads == 1 and get_preset("bert-4x256").heads == 8
    # the even head size RoPE needs, even where D/32 heads would not divide D evenly
    for d in range(16, 600, 8):
        q = get_preset(f"gpt-2x{d}")
        assert d % q.heads == 0 and (d // q.heads) % 2 == 0
    cfg = build_config("gpt-3x160", vocab_size=300, seq_len=64)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (3, 160, 640)
    assert parse_sizes("1x32,1x48,2x64", "clm") == ["gpt-1x32", "gpt-1x48", "gpt-2x64"]
    assert next_size("gpt-2x64") == "gpt-2x96" and next_size("gpt-tiny") == "gpt-2x192"


@pytest.mark.parametrize(
    "spec, objective, match",
    [
        ("2x", "clm", "expected a shape LxD"),
        ("2x96x3", "clm", "expected a shape LxD"),
        ("0x64", "clm", "1 to 64"),
        ("2x60", "clm", "multiple of 8"),
        ("2x8", "clm", "multiple of 8 from 16"),
        ("gpt-tiyn", "clm", "Did you mean 'gpt-tiny'"),
        ("gpt-tiny", "mlm", "needs bert-"),
        ("bert-2x64", "clm", "needs gpt-"),
        ("", "clm", "empty size"),
    ],
)
def test_bad_size_specs(spec, objective, match):
    with pytest.raises(ConfigError, match=match):
        resolve_size(spec, objective)


def test_bad_ladders(tmp_path):
    with pytest.raises(ConfigError, match="at least 3"):
        Ladder(out=str(tmp_path), sizes=["1x32", "1x48"])
    with pytest.raises(ConfigError, match="given twice"):
        Ladder(out=str(tmp_path), sizes=["2x64", "gpt-2x64", "2x96"])
    with pytest.raises(ConfigError, match="is one of --sizes"):
        Ladder(out=str(tmp_path), sizes=["1x32", "1x48", "2x64"], predict="2x64")
    with pytest.raises(ConfigError, match="--tokens"):
        Ladder(out=str(tmp_path), sizes=["1x32", "1x48", "2x64"], tokens="lots")
    assert Ladder(out=str(tmp_path), sizes=["2x96", "2x64", "1x32"]).predict == "gpt-2x144"


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, word_corpus) -> Path:
    return word_corpus(tmp_path_factory.mktemp("corpus"), 300)


def test_scaling_cli_end_to_end(cli, corpus, tmp_path):
    out = tmp_path / "ladder"
    args = (
        "scaling", "--corpus", corpus, "--sizes", "1x32,1x48,2x64", "--predict", "2x96",
        "--tokens", str(4 * 8 * 32), "--seq-len", "32", "--batch-size", "8", "--vocab-size", "300",
        "--eval-blocks", "8", "--no-track", "--quiet", "--out", out,
    )  # fmt: skip
    code, stdout, err = cli(*args)
    assert code == 0, err
    rec = json.loads((out / "scaling.json").read_text())
    assert rec["status"] == "verified"
    pts = rec["points"]
    assert [p["size"] for p in pts] == ["gpt-1x32", "gpt-1x48", "gpt-2x64"]
    assert all(math.isfinite(p["val_loss"]) and p["tokens"] == 4 * 8 * 32 and p["steps"] == 4 for p in pts)
    assert pts[0]["n_params"] < pts[1]["n_params"] < pts[2]["n_params"] < rec["prediction"]["n_params"]
    assert all(p["n_params"] < p["n_params_total"] for p in pts)  # N leaves the embedding out
    fit, pred, m = rec["fit"], rec["prediction"], rec["measured"]
    assert fit["points"] == 3 and 0 < fit["alpha"] <= 2 and 0 <= fit["c"] < min(p["val_loss"] for p in pts)
    assert pred["size"] == "gpt-2x96" and math.isfinite(pred["loss"]) and pred["sigma"] is None
    assert m["size"] == "gpt-2x96" and m["error"] == pytest.approx(m["val_loss"] - pred["loss"])
    # every size trained on the very same packed blocks as the shared data
    shared = json.loads((out / "data" / "card.json").read_text())["fingerprints"]
    for size in ("gpt-1x32", "gpt-1x48", "gpt-2x64", "gpt-2x96"):
        card = json.loads((out / "runs" / size / "data" / "card.json").read_text())
        assert card["fingerprints"]["train_blocks"] == shared["train_blocks"]
        assert (out / "runs" / size / "model.safetensors").is_file()
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert "predicted gpt-2x96" in stdout and "measured  gpt-2x96" in stdout

    # a re-run trains nothing: every finished size is reused, the numbers are the same
    code, stdout, err = cli(*args)
    assert code == 0, err
    again = json.loads((out / "scaling.json").read_text())
    assert all(p["reused"] for p in again["points"]) and again["measured"]["reused"]
    assert again["fit"]["alpha"] == pytest.approx(fit["alpha"])
    # other settings are refused rather than mixed into the same ladder
    code, _, err = cli(*[a if a != "8" else "4" for a in args])
    assert code == 2 and "other settings" in err

"""Temperature scaling (lmloop.calibration): the fit on logits built in code (an over-confident model's ECE
falls, its labels never change), the degenerate cases it refuses, and a real tiny classifier: `lmloop
calibrate` writes calibration.json, the predictor applies it on every backend, `lmloop evaluate` and the
server report calibrated confidences, and fine-tuning fits it (or not, with --no-calibrate)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lmloop.calibration import MIN_ROWS, fit_temperature, scaled_softmax
from lmloop.evaluate import expected_calibration_error


def _overconfident(n: int = 3000, c: int = 3, sharpen: float = 4.0, seed: int = 0):
    """Labels drawn from softmax(z); the 'model' reports sharpen * z: right as often, far surer."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, c))  # (N, C) the true logits
    p = scaled_softmax(z).astype(np.float64)
    y = np.array([rng.choice(c, p=row / row.sum()) for row in p])
    return sharpen * z, y


def test_temperature_recovers_the_over_confidence_and_keeps_every_label():
    logits, y = _overconfident()
    fit = fit_temperature(logits, y)
    assert fit.skipped is None and not fit.at_bound
    assert fit.temperature == pytest.approx(4.0, rel=0.15)  # it undoes the 4x sharpening
    assert fit.ece_before > 0.15 and fit.ece_after < fit.ece_before / 4
    assert fit.nll_after < fit.nll_before
    # T > 0 rescales: the argmax of every row is unchanged
    assert (scaled_softmax(logits, fit.temperature).argmax(1) == logits.argmax(1)).all()
    assert fit.ece_after == pytest.approx(
        expected_calibration_error(y, scaled_softmax(logits, fit.temperature))
    )
    # an under-confident model is sharpened (T < 1)
    assert fit_temperature(logits / 16, y).temperature < 0.5


def test_degenerate_fits_keep_t_at_one_and_say_why():
    logits, y = _overconfident(n=200)
    right = logits.argmax(1)  # every row predicted right: no finite NLL minimum
    fit = fit_temperature(logits, right)
    assert fit.temperature == 1.0 and "no errors" in fit.skipped and fit.errors == 0
    few = fit_temperature(logits[: MIN_ROWS - 1], y[: MIN_ROWS - 1])
    assert few.temperature == 1.0 and "fewer than" in few.skipped
    with pytest.raises(ValueError, match=r"logits must be \(N, C\)"):
        fit_temperature(logits[:5], y[:6])


# ------------------------------------------------------------------------------------------ a real model
@pytest.fixture(scope="module")
def trained(tmp_path_factory, finetune_confident_tiny, tiny_model_dir, toy_csv):
    return finetune_confident_tiny(tmp_path_factory.mktemp("calib") / "model", tiny_model_dir, toy_csv)


@pytest.fixture
def noisy_model(tmp_path, trained, toy_csv):
    """A copy of the trained tiny model whose validation.jsonl is the whole toy data with every third label
    flipped: the model is ~67% right there while it claims ~90%+, an over-confident model to calibrate."""
    import pandas as pd

    d = shutil.copytree(trained, tmp_path / "model")
    (d / "calibration.json").unlink(missing_ok=True)
    df = pd.read_csv(toy_csv)
    flip = {"pos": "neg", "neg": "pos"}
    rows = [
        {"text": t, "label": flip[lab] if i % 3 == 0 else lab}
        for i, (t, lab) in enumerate(zip(df["text"], df["label"], strict=True))
    ]
    (d / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_finetune_writes_calibration_and_card(trained):
    cal = json.loads((trained / "calibration.json").read_text())
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["calibration"]["temperature"] == cal["temperature"]
    assert cal["n"] == metrics["validation"]["n"]
    if cal["skipped"] is None:  # fitted: the test metrics carry the raw numbers beside the calibrated ones
        assert metrics["test"]["uncalibrated"]["ece"] == metrics["calibration"]["test_ece_before"]
    card = (trained / "MODEL_CARD.md").read_text()
    assert "## Calibration" in card and "## Intended use" in card


def test_calibrate_cli_lowers_ece_on_every_backend_and_labels_stay(noisy_model, cli):
    from lmloop.infer.predictor import Predictor

    code, out, err = cli("calibrate", "--model", noisy_model, "--json")
    assert code == 0, err
    fit = json.loads(out)
    on_disk = json.loads((noisy_model / "calibration.json").read_text())
    assert fit == on_disk and fit["skipped"] is None and fit["n"] == 120
    assert fit["temperature"] > 1.5  # over-confident: softened
    assert fit["ece_after"] < fit["ece_before"] - 0.1 and fit["nll_after"] < fit["nll_before"]

    texts = [json.loads(x)["text"] for x in (noisy_model / "validation.jsonl").read_text().splitlines()]
    raw = Predictor.from_ref(str(noisy_model), backend="torch", calibrated=False)
    ids = raw.encode(texts)
    logits = raw.predict_logits(ids)  # (N, C)
    p_raw = raw.predict_ids(ids)
    backends = ["torch", "torch-int8"]
    try:
        import onnxruntime  # noqa: F401

        backends.append("onnx")
    except ImportError:
        pass
    for name in backends:
        pred = Predictor.from_ref(str(noisy_model), backend=name)
        assert pred.temperature == pytest.approx(fit["temperature"]), name
        p = pred.predict_proba(texts)
        assert (p.argmax(1) == p_raw.argmax(1)).mean() >= (0.97 if "int8" in name else 1.0), name
        assert p.max(1).mean() < p_raw.max(1).mean() - 0.05, name  # less sure than the raw softmax
    cal = Predictor.from_ref(str(noisy_model), backend="torch").predict_ids(ids)
    np.testing.assert_allclose(cal, scaled_softmax(logits, fit["temperature"]), atol=1e-6)
    assert (cal.argmax(1) == p_raw.argmax(1)).all()  # exact backend: not one label changes

    # evaluate (on the noisy labels it was fitted to): calibrated metrics, the raw ones beside them, both in
    # the report
    data = noisy_model / "validation.jsonl"
    code, out, err = cli("evaluate", "--model", noisy_model, "--data", data, "--out", noisy_model / "ev")
    assert code == 0, err
    m = json.loads((noisy_model / "ev" / "metrics.json").read_text())
    assert m["temperature"] == pytest.approx(fit["temperature"]) and m["uncalibrated"]["ece"] > m["ece"]
    assert f"calibration T={fit['temperature']:.3f}" in out
    assert "ECE before scaling" in (noisy_model / "ev" / "report.html").read_text()

    # --off: raw confidences again
    code, out, err = cli("calibrate", "--model", noisy_model, "--off")
    assert code == 0 and not (noisy_model / "calibration.json").exists()
    assert Predictor.from_ref(str(noisy_model)).temperature == 1.0


def test_server_returns_calibrated_confidences(noisy_model, tmp_path, cli):
    from fastapi.testclient import TestClient

    from lmloop.infer.predictor import Predictor
    from lmloop.mlops.predlog import open_store
    from lmloop.serve.app import ServeSettings, create_app

    assert cli("calibrate", "--model", noisy_model)[0] == 0
    t = json.loads((noisy_model / "calibration.json").read_text())["temperature"]
    texts = ["item 1 was great and superb", "item 2 was awful and bad"]
    raw = Predictor.from_ref(str(noisy_model), calibrated=False)
    expected = scaled_softmax(raw.predict_logits(raw.encode(texts)), t)  # (2, C)
    pred = Predictor.from_ref(str(noisy_model))
    store = open_store(f"sqlite:///{tmp_path / 'pred.db'}")
    settings = ServeSettings(model_name="noisy", model_version="v1")
    with TestClient(create_app(pred, store, settings)) as client:
        r = client.post("/v1/classify", json={"inputs": texts})
    assert r.status_code == 200, r.text
    for row, got in zip(expected, r.json()["predictions"], strict=True):
        k = int(row.argmax())
        assert got["label"] == pred.labels[k] and got["score"] == pytest.approx(float(row[k]), abs=1e-5)


def test_no_calibrate_flag(tmp_path, cli, tiny_model_dir, toy_csv):
    out = tmp_path / "raw"
    args = [
        "finetune",
        "--data",
        toy_csv,
        "--model",
        tiny_model_dir,
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--precision",
        "fp32",
        "--no-track",
        "--quiet",
        "--no-calibrate",
        "--out",
        out,
    ]
    code, _, err = cli(*args)
    assert code == 0, err
    assert not (out / "calibration.json").exists()
    assert "calibration" not in json.loads((out / "metrics.json").read_text())
    from lmloop.config import recipe_from_dict

    assert recipe_from_dict({"train": {"calibrate": False}}).train.calibrate is False

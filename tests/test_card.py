"""MODEL_CARD.md (lmloop.mlops.card): every section, with the numbers of the files beside the model (metrics
per domain, calibration, bias / membership / memorization audits, loop gates), the same bytes when written
twice, `lmloop card` printing / refreshing it and logging it to the model's MLflow run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmloop.calibration import fit_temperature, scaled_softmax, write_calibration
from lmloop.evaluate import compute_metrics, write_metrics_json
from lmloop.mlops.card import CARD_FILE, render_card, write_card, write_gates

SECTIONS = [
    "## Intended use",
    "## Model",
    "## Data",
    "## Metrics",
    "## Calibration",
    "## Responsible evaluation",
    "### Counterfactual bias",
    "### Membership inference",
    "### Memorization",
    "## Promotion gates",
    "## Limits",
]


@pytest.fixture
def model_dir(tmp_path):
    """A model directory as the pipeline leaves it, with numbers computed here (not typed in)."""
    d = tmp_path / "sentiment-v3"
    d.mkdir()
    rng = np.random.default_rng(0)
    (d / "config.json").write_text(
        json.dumps({"architectures": ["BertForSequenceClassification"], "id2label": {"0": "neg", "1": "pos"}})
    )
    (d / "lmloop.json").write_text(
        json.dumps(
            {
                "task": "classification",
                "labels": ["neg", "pos"],
                "max_length": 96,
                "base_model": "minilm-l6",
                "data_fingerprints": {},
                "lmloop_version": "0.1.0",
                "mlflow_run_id": None,
            }
        )
    )
    (d / "data_card.json").write_text(
        json.dumps(
            {
                "source": "reviews.csv",
                "fingerprint": "ab12cd34ef56ab78",
                "rows": {"train": 800, "validation": 100, "test": 200},
                "fingerprints": {
                    s: {"sha256": h * 16}
                    for s, h in (("train", "1a2b"), ("validation", "3c4d"), ("test", "5e6f"))
                },
            }
        )
    )
    y = rng.integers(0, 2, 200)
    logits = np.stack([-(2 * y - 1) * 3.0, (2 * y - 1) * 3.0], 1) + rng.normal(0, 4, (200, 2))  # (N, 2)
    fit = fit_temperature(logits[:100], y[:100], fitted_on="validation split")
    write_calibration(d, fit)
    domains = ["books" if i % 4 else "tweets" for i in range(100)]
    test = compute_metrics(y[100:], scaled_softmax(logits[100:], fit.temperature), ["neg", "pos"], domains)
    raw = compute_metrics(y[100:], scaled_softmax(logits[100:]), ["neg", "pos"])
    metrics = {
        "test": test,
        "validation": compute_metrics(y[:100], scaled_softmax(logits[:100]), ["neg", "pos"]),
        "calibration": {**fit.to_dict(), "test_ece_before": raw["ece"], "test_ece_after": test["ece"]},
    }
    write_metrics_json(metrics, d / "metrics.json")
    (d / "audit").mkdir()
    bias = {
        "max_flip_rate": 0.0375,
        "max_gap": 0.021,
        "families": {
            "gender": {
                "pairs": 80,
                "flip_rate": 0.0375,
                "flip_rate_ci": [0.0125, 0.075],
                "gap": 0.021,
                "gap_ci": [0.01, 0.03],
            }
        },
    }
    (d / "audit" / "bias.json").write_text(json.dumps(bias))
    (d / "audit" / "membership.json").write_text(
        json.dumps({"auc": 0.5312, "auc_ci": [0.49, 0.57], "advantage": 0.061})
    )
    return d, fit, metrics


def test_card_has_every_section_with_the_files_numbers(model_dir):
    d, fit, metrics = model_dir
    card = render_card(d)
    assert [s for s in SECTIONS if s not in card] == []
    assert card.index("## Intended use") < card.index("## Calibration") < card.index("## Limits")
    test = metrics["test"]
    assert f"| test | 100 | {test['accuracy']:.4f} | {test['macro_f1']:.4f} | {test['ece']:.4f} |" in card
    for dom, m in test["per_domain"].items():  # per domain, from the data's domain column
        assert f"| {dom} | {m['n']} | {m['accuracy']:.4f} |" in card
    assert f"T = {fit.temperature:.4f}" in card and fit.skipped is None
    assert f"| {fit.ece_before:.4f} | {fit.ece_after:.4f} |" in card
    before = metrics["calibration"]["test_ece_before"]
    assert f"| test (100 rows, at fine-tuning) | {before:.4f} | {test['ece']:.4f} |" in card
    assert "| gender | 80 | 0.0375 | [0.0125, 0.0750] | 0.0210 |" in card
    assert "AUC 0.5312 (95% CI [0.4900, 0.5700]" in card
    assert "Not audited (generative models" in card  # no memorization audit: said so
    assert "| train | 800 | `1a2b1a2b1a2b1a2b` |" in card and "minilm-l6" in card
    assert "Inputs longer than 96 tokens are truncated" in card and "Wilson interval" in card
    assert "Not evaluated by `lmloop loop` gates." in card


def test_gates_and_memorization_land_in_the_card_and_rewrites_are_stable(model_dir):
    d, _, _ = model_dir
    rep = {
        "canaries": {
            "by_repetitions": [
                {"repetitions": 16, "canaries": 2, "mean_exposure": 11.5, "max_exposure": 12.25}
            ]
        },
        "summary": {"max_exposure": 12.25, "extraction_train": 0.02, "extraction_heldout": 0.0},
    }
    (d / "audit" / "memorization.json").write_text(json.dumps(rep))
    gates = [
        {"name": "bias.flip_rate", "value": 0.0375, "threshold": 0.02, "passed": False, "detail": "gender"},
        {"name": "calibration", "value": 0.03, "threshold": 0.05, "passed": True, "detail": "golden"},
    ]
    write_gates(d, gates, decision="keep", reason="kept champion v2: failed bias.flip_rate", turn="0003-x")
    card = (d / CARD_FILE).read_text()
    assert "**keep** - kept champion v2: failed bias.flip_rate" in card
    assert "| bias.flip_rate | 0.0375 | 0.0200 | FAIL | gender |" in card
    assert "| 16 | 2 | 11.50 | 12.25 |" in card and "Largest canary exposure: 12.25 bits" in card
    before = (d / CARD_FILE).stat().st_mtime_ns
    assert write_card(d).read_text() == card and (d / CARD_FILE).stat().st_mtime_ns == before  # unchanged


def test_card_cli_prints_refreshes_and_logs_to_mlflow(model_dir, cli, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from lmloop.mlops.tracking import Tracker

    d, fit, _ = model_dir
    code, out, err = cli("card", "--model", d, "--no-write")
    assert code == 0 and out.startswith("# Model card: sentiment-v3") and not (d / CARD_FILE).exists()
    tr = Tracker(uri=mlflow_uri, experiment="cards")
    tr.start("train")
    run_id = tr.run_id
    tr.end("FINISHED")
    meta = json.loads((d / "lmloop.json").read_text())
    (d / "lmloop.json").write_text(json.dumps({**meta, "mlflow_run_id": run_id}))
    code, out, err = cli("card", "--model", d, "--log", "--quiet", "--tracking-uri", mlflow_uri)
    assert code == 0, err
    assert out.strip() == str(d / CARD_FILE) and run_id in (d / CARD_FILE).read_text()
    logged = [a.path for a in MlflowClient(tracking_uri=mlflow_uri).list_artifacts(run_id, "reports")]
    assert logged == ["reports/MODEL_CARD.md"]
    code, _, err = cli("card", "--model", d / "audit")
    assert code != 0 and "has no config.json" in err

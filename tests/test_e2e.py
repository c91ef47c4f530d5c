"""The shipped quick recipe end to end with the real packaged MiniLM and VADER data (about 30-60 s)."""

from __future__ import annotations

import json

import pytest

REPO_RECIPE = "recipes/quick.yaml"
VADER_DOMAINS = {"amazon", "movies", "nyt", "tweets"}


@pytest.mark.slow
def test_quick_recipe_end_to_end(tmp_path, minilm_dir, vader_dir, run_lmloop, mlflow_uri):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "quick"
    # 300 rows, one epoch. The recipe's batch 32 at lr 1e-4 gives only 10 steps, which leaves MiniLM at the
    # majority class; batch 16 at 2e-4 (19 steps) learns the task in the same number of examples.
    proc = run_lmloop(
        "run", REPO_RECIPE,
        "--set", "data.limit=300",
        "--set", "train.epochs=1",
        "--set", "train.batch_size=16",
        "--set", "train.lr=2e-4",
        "--out", str(out),
        "--quiet",
        cwd=repo,
        env={"MLFLOW_TRACKING_URI": mlflow_uri},
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "test accuracy" in proc.stdout

    m = json.loads((out / "metrics.json").read_text())
    test = m["test"]
    assert set(test["per_domain"]) == VADER_DOMAINS
    assert all(0.0 <= d["accuracy"] <= 1.0 and d["n"] > 0 for d in test["per_domain"].values())
    assert sum(d["n"] for d in test["per_domain"].values()) == test["n"] == 75
    assert test["accuracy"] > 0.6
    assert m["train"]["examples"] == 300 and m["train"]["steps"] == 19
    assert not (out / "checkpoints").exists()

    # the output is a model that reloads, with and without lmloop
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmloop.infer import load

    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert hf.config.num_hidden_layers == 6
    assert [hf.config.id2label[i] for i in range(hf.config.num_labels)] == sorted(test["per_class"])
    texts = ["What a wonderful, delightful film!", "This was a dreadful waste of money.", "ok"]
    from lmloop.calibration import temperature_of

    predictor = load(str(out), backend="torch")  # the exact fp32 path (auto may pick int8)
    probs = predictor.predict_proba(texts)
    t = temperature_of(out)  # fitted on validation by finetune: probabilities are softmax(logits / T)
    assert t > 0 and predictor.temperature == t
    with torch.no_grad():
        logits = hf(**tok(texts, padding=True, return_tensors="pt")).logits
    assert abs(probs - torch.softmax(logits / t, -1).numpy()).max() < 1e-4
    raw = load(str(out), backend="torch", calibrated=False).predict_proba(texts)
    assert abs(raw - torch.softmax(logits, -1).numpy()).max() < 1e-4
    assert (raw.argmax(1) == probs.argmax(1)).all()  # temperature never changes a label
    assert [p.label for p in predictor.predict(texts)] == [hf.config.id2label[int(i)] for i in raw.argmax(1)]

    from mlflow.tracking import MlflowClient

    meta = json.loads((out / "lmloop.json").read_text())
    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "quick"
    assert run.data.metrics["test.accuracy"] == pytest.approx(test["accuracy"])
    assert run.data.params["recipe.data.limit"] == "300"

"""End to end on a tiny model: ``lmloop finetune`` -> a plain HF model dir + metrics, card, report, an
MLflow run in a throw-away sqlite store; then ``lmloop evaluate`` agrees with the Python predictor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

EPOCHS, BATCH = 2, 8


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_model_dir, toy_csv):
    """One fine-tuning run shared by the tests below (in-process, tracked to a private sqlite store)."""
    from lmloop.cli import main

    root = tmp_path_factory.mktemp("finetune")
    out = root / "out"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        code = main(
            [
                "finetune",
                "--data", str(toy_csv),
                "--domain-column", "domain",
                "--model", str(tiny_model_dir),
                "--epochs", str(EPOCHS),
                "--batch-size", str(BATCH),
                "--lr", "5e-3",
                "--patience", "0",
                # the tiny model's embeddings are random: unlike a pretrained model's, they must train
                "--no-freeze-embeddings",
                "--precision", "fp32",
                "--name", "toy-run",
                "--experiment", "lmloop-tests",
                "--out", str(out),
                "--quiet",
            ]
        )  # fmt: skip
    assert code == 0
    return out, uri


def test_output_is_a_plain_hf_model_dir(finetuned):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _ = finetuned
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert model.config.hidden_size == 32
    enc = tok(
        ["item 1 was wonderful and superb", "item 2 was awful and dreadful"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).tolist()
    assert pred == [1, 0]  # the tiny model learned the toy task
    meta = json.loads((out / "lmloop.json").read_text())
    assert meta["labels"] == ["neg", "pos"] and meta["task"] == "classification"
    assert meta["max_length"] == 128 and meta["mlflow_run_id"]


def test_metrics_json(finetuned):
    out, _ = finetuned
    m = json.loads((out / "metrics.json").read_text())
    test = m["test"]
    assert test["n"] == 12
    assert test["accuracy"] >= 0.9
    assert 0.0 <= test["macro_f1"] <= 1.0 and test["macro_f1"] >= 0.9
    assert set(test["per_domain"]) == {"film", "shop"}
    assert sum(d["n"] for d in test["per_domain"].values()) == test["n"]
    assert set(test["per_class"]) == {"neg", "pos"}
    assert m["validation"]["n"] == 12
    tr = m["train"]
    assert tr["steps"] == EPOCHS * 96 // BATCH
    assert tr["examples"] == EPOCHS * 96
    assert tr["precision"] == "fp32" and tr["fast_path"] is True and tr["stopped_early"] is False
    assert tr["best_step"] is not None and tr["best_val"] == pytest.approx(m["validation"]["accuracy"])


def test_card_report_and_cleanup(finetuned):
    out, _ = finetuned
    card = json.loads((out / "data_card.json").read_text())
    assert card["labels"] == ["neg", "pos"]
    assert (out / "data_card.md").read_text().strip()
    html = (out / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "toy-run" in html
    assert not (out / "checkpoints").exists()
    history = json.loads((out / "history.json").read_text())
    assert any("eval_accuracy" in h for h in history)
    import yaml

    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["train"]["epochs"] == EPOCHS and recipe["data"]["domain_column"] == "domain"


def test_mlflow_run(finetuned, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    out, uri = finetuned
    meta = json.loads((out / "lmloop.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("lmloop-tests")
    assert exp is not None
    assert exp.artifact_location.startswith("file://") and "mlartifacts" in exp.artifact_location
    run = client.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "toy-run"
    assert run.info.experiment_id == exp.experiment_id
    assert run.data.tags["lmloop.stage"] == "finetune"
    assert run.data.tags["lmloop.out"] == str(out.resolve())
    params = run.data.params
    assert params["recipe.train.epochs"] == str(float(EPOCHS))
    assert params["recipe.train.batch_size"] == str(BATCH)
    assert params["recipe.model.base"] == str(tiny_model_dir)
    assert params["precision"] == "fp32" and params["n_train"] == "96"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    steps = sorted(h.step for h in history)
    assert len(history) > 1 and len(set(steps)) == len(steps)
    assert steps[-1] == metrics["train"]["steps"]  # the last validation pass is at the last step
    assert all(0.0 <= h.value <= 1.0 for h in history)
    assert run.data.metrics["test.accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert run.data.metrics["test.macro_f1"] == pytest.approx(metrics["test"]["macro_f1"])
    assert "test.domain.film.accuracy" in run.data.metrics
    assert "train_loss" in run.data.metrics
    reports = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {
        "metrics.json",
        "data_card.json",
        "data_card.md",
        "report.html",
        "history.json",
        "recipe.yaml",
    } <= reports
    local = client.download_artifacts(run.info.run_id, "reports/metrics.json", str(out.parent / "dl"))
    assert json.loads(Path(local).read_text()) == metrics
    model_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"config.json", "model.safetensors"} <= model_files


def test_evaluate_cli_matches_the_predictor(finetuned, toy_csv, cli):
    import pandas as pd

    from lmloop.infer import load

    out, _ = finetuned
    code, stdout, err = cli(
        "evaluate", "--model", out, "--data", toy_csv, "--domain-column", "domain", "--json"
    )
    assert code == 0, err
    m = json.loads(stdout)
    df = pd.read_csv(toy_csv)
    preds = load(str(out)).predict(df["text"].tolist())
    accuracy = sum(p.label == y for p, y in zip(preds, df["label"], strict=True)) / len(df)
    assert m["n"] == len(df) == 120
    assert m["accuracy"] == pytest.approx(accuracy)
    assert set(m["per_domain"]) == {"film", "shop"}
    assert (out / "eval" / "metrics.json").is_file() and (out / "eval" / "report.html").is_file()
    p = preds[0]
    assert p.label in ("neg", "pos") and p.score == max(p.scores.values())
    assert sum(p.scores.values()) == pytest.approx(1.0, abs=1e-5)


def test_predict_cli_writes_labels(finetuned, tmp_path, cli):
    import pandas as pd

    out, _ = finetuned
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "item 9 was excellent and superb"}\n{"text": "item 8 was horrible and bad"}\n')
    dst = tmp_path / "pred.csv"
    code, stdout, err = cli("predict", "--model", out, "--input", src, "--output", dst)
    assert code == 0, err
    assert f"wrote 2 predictions to {dst}" in stdout
    df = pd.read_csv(dst)
    assert df["label"].tolist() == ["pos", "neg"]
    # the generated id is the row number; the text is not copied unless --keep-text
    assert list(df.columns) == ["id", "label", "score", "score_neg", "score_pos"]
    assert df["id"].tolist() == [0, 1]


def test_top_level_load_entry_point(finetuned):
    import lmloop

    out, _ = finetuned
    assert lmloop.load(str(out)).predict(["item 3 was wonderful"])[0].label == "pos"


def test_resume_of_a_finished_run_does_not_overwrite_it(finetuned, tmp_path, toy_csv, tiny_model_dir, cli):
    import shutil

    out, _ = finetuned
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = (copy / "metrics.json").read_text()
    code, _, err = cli(
        "finetune", "--data", toy_csv, "--domain-column", "domain", "--model", tiny_model_dir,
        "--out", copy, "--resume", "--max-steps", "2", "--precision", "fp32", "--no-track", "--quiet",
    )  # fmt: skip
    assert (copy / "metrics.json").read_text() == before
    assert code == 2 and "Traceback" not in err


def test_resume_after_a_crash_continues_the_same_mlflow_run(
    tmp_path, tiny_model_dir, toy_csv, mlflow_uri, monkeypatch
):
    """A run that dies after training (here: in the final evaluation) resumes from its last checkpoint and
    finishes the MLflow run it started, rather than leaving it FAILED and opening a second one."""
    from mlflow.tracking import MlflowClient

    import lmloop.finetune as ft
    from lmloop.cli import main

    out = tmp_path / "out"
    argv = [
        "finetune", "--data", str(toy_csv), "--domain-column", "domain", "--model", str(tiny_model_dir),
        "--max-steps", "6", "--batch-size", "16", "--precision", "fp32", "--experiment", "resume-test",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    real = ft.evaluate_split

    def crash(*a, **k):
        raise RuntimeError("simulated crash in the final evaluation")

    monkeypatch.setattr(ft, "evaluate_split", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(argv)
    run_id = json.loads((out / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_run(run_id).info.status == "FAILED"
    assert (out / "checkpoints" / "last" / "state.json").is_file()

    monkeypatch.setattr(ft, "evaluate_split", real)
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 6
    exp = client.get_experiment_by_name("resume-test")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # no second run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "test.accuracy" in run.data.metrics


def test_word_embeddings_frozen_by_default_and_trained_on_request(
    finetuned, tmp_path, tiny_model_dir, toy_csv
):
    from safetensors.torch import load_file

    from lmloop.cli import main

    key = "bert.embeddings.word_embeddings.weight"
    base = load_file(str(tiny_model_dir / "model.safetensors"))[key]
    out = tmp_path / "frozen"
    argv = ["finetune", "--data", str(toy_csv), "--model", str(tiny_model_dir), "--max-steps", "4",
            "--precision", "fp32", "--no-track", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    frozen = load_file(str(out / "model.safetensors"))
    assert frozen[key].equal(base)  # default: the embedding matrix is not touched
    assert not frozen["bert.encoder.layer.0.attention.self.query.weight"].equal(
        load_file(str(tiny_model_dir / "model.safetensors"))[
            "bert.encoder.layer.0.attention.self.query.weight"
        ]
    )
    trained = load_file(str(finetuned[0] / "model.safetensors"))  # ran with --no-freeze-embeddings
    assert not trained[key].equal(base)

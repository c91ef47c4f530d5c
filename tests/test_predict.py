"""``lmloop predict`` and ``lmloop export`` from the command line, on a tiny fine-tuned model.

Every run streams a 50-row file in windows of 7 rows and is checked against ``Predictor.predict_proba``
on the whole list: rows keep their order and id whatever the format; failures exit 2 with a message
and leave no output file behind.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

N = 50
POS = ["great", "wonderful", "excellent", "superb"]
NEG = ["terrible", "awful", "horrible", "dreadful"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_model_dir, toy_csv, finetune_confident_tiny) -> Path:
    """The tiny BERT fine-tuned on the toy data; its dir holds validation.jsonl (for auto and export)."""
    return finetune_confident_tiny(tmp_path_factory.mktemp("predict") / "model", tiny_model_dir, toy_csv)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """50 rows: string ids that must stay strings ("007", "a7"), texts of both classes and very different
    lengths (so each window is reordered by length inside), a domain column."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(N):
        words = POS if i % 2 == 0 else NEG
        text = f"item {i} was " + " and ".join(rng.choice(words, size=1 + (i * 7) % 23))
        out.append({"id": f"{i:03d}" if i % 3 == 0 else f"a{i}", "text": text, "domain": f"d{i % 4}"})
    return out


@pytest.fixture(scope="module")
def expected(finetuned, rows) -> np.ndarray:
    """Probabilities (N, 2) of the exact fp32 model on the whole list at once."""
    from lmloop.infer import Predictor

    pred = Predictor.from_ref(str(finetuned), backend="torch")
    assert pred.labels == ["neg", "pos"]
    return pred.predict_proba([r["text"] for r in rows])


def write_table(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        pd.DataFrame(rows).astype(str).to_parquet(path, index=False)
    return path


def read_table(path: Path) -> pd.DataFrame:
    """The output as written: ids and other input columns as strings (CSV/JSONL readers would guess)."""
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype={"id": str, "domain": str, "text": str}, keep_default_na=False)
    if path.suffix == ".jsonl":
        return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines()])
    return pd.read_parquet(path)


def check_predictions(df: pd.DataFrame, expected: np.ndarray) -> None:
    labels = ["neg", "pos"]
    assert df["label"].tolist() == [labels[k] for k in expected.argmax(1)]
    assert np.allclose(df["score"].to_numpy(float), expected.max(1), atol=1e-5)
    for j, lab in enumerate(labels):
        assert np.allclose(df[f"score_{lab}"].to_numpy(float), expected[:, j], atol=1e-5)
    total = df["score_neg"].to_numpy(float) + df["score_pos"].to_numpy(float)
    assert np.allclose(total, 1.0, atol=1e-5)


SUMMARY = re.compile(r"wrote (\d+) predictions to (.+) in [\d.]+ s \((\d+) items/s, backend ([\w-]+)\)")


@pytest.mark.parametrize(
    "src_fmt,dst_fmt",
    [("csv", "csv"), ("jsonl", "jsonl"), ("parquet", "parquet"), ("csv", "parquet"), ("parquet", "jsonl")],
)
def test_round_trip_keeps_ids_and_order(cli, finetuned, rows, expected, tmp_path, src_fmt, dst_fmt):
    src = write_table(tmp_path / f"in.{src_fmt}", rows)
    dst = tmp_path / f"out.{dst_fmt}"
    code, out, err = cli(
        "predict", "--model", finetuned, "--input", src, "--output", dst,
        "--backend", "torch", "--window", "7", "--batch-size", "4", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    m = SUMMARY.search(out)
    assert m and m.group(1) == str(N) and m.group(2) == str(dst) and m.group(4) == "torch", out
    df = read_table(dst)
    assert list(df.columns) == ["id", "domain", "label", "score", "score_neg", "score_pos"]
    assert df["id"].tolist() == [r["id"] for r in rows]  # "007" stays "007", in input order
    assert df["domain"].tolist() == [r["domain"] for r in rows]
    check_predictions(df, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, dst.name])  # no temp files


def test_row_numbers_as_ids_and_keep_text(cli, finetuned, rows, expected, tmp_path):
    src = write_table(tmp_path / "in.jsonl", [{"text": r["text"], "domain": r["domain"]} for r in rows])
    dst = tmp_path / "out.csv"
    code, _, err = cli(
        "predict", "--model", finetuned, "--input", src, "--output", dst,
        "--backend", "torch", "--window", "7", "--keep-text", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    df = pd.read_csv(dst, keep_default_na=False)
    assert list(df.columns) == ["id", "text", "domain", "label", "score", "score_neg", "score_pos"]
    assert df["id"].tolist() == list(range(N))  # 0-based row numbers, counted across the windows
    assert df["text"].tolist() == [r["text"] for r in rows]
    check_predictions(df, expected)


def test_id_column_option(cli, finetuned, rows, expected, tmp_path):
    src = write_table(tmp_path / "in.csv", [{"doc": r["id"], "body": r["text"]} for r in rows])
    dst = tmp_path / "out.jsonl"
    code, _, err = cli(
        "predict", "--model", finetuned, "--input", src, "--output", dst, "--backend", "torch",
        "--id-column", "doc", "--text-column", "body", "--window", "7", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    df = read_table(dst)
    assert list(df.columns) == ["doc", "label", "score", "score_neg", "score_pos"]
    assert df["doc"].tolist() == [r["id"] for r in rows]
    check_predictions(df, expected)


def test_torch_and_onnx_backends_give_the_same_labels(cli, finetuned, rows, expected, tmp_path):
    src = write_table(tmp_path / "in.csv", rows)
    results = {}
    for backend in ("torch", "onnx"):
        dst = tmp_path / f"{backend}.csv"
        code, out, err = cli(
            "predict", "--model", finetuned, "--input", src, "--output", dst,
            "--backend", backend, "--window", "7", "--quiet",
        )  # fmt: skip
        assert code == 0, err
        assert SUMMARY.search(out).group(4) == backend
        results[backend] = read_table(dst)
    a, b = results["torch"], results["onnx"]
    assert a["label"].tolist() == b["label"].tolist() and a["id"].tolist() == b["id"].tolist()
    assert np.allclose(a["score_pos"], b["score_pos"], atol=1e-4)
    check_predictions(b, expected)


def test_auto_backend_reports_its_measured_choice_and_load_reuses_it(cli, finetuned, rows, tmp_path, capsys):
    import lmloop
    from lmloop.infer.backends import CALIBRATION_FILE

    model = tmp_path / "model"
    shutil.copytree(finetuned, model)
    src = write_table(tmp_path / "in.jsonl", rows[:10])
    dst = tmp_path / "out.parquet"
    code, out, err = cli("predict", "--model", model, "--input", src, "--output", dst)  # default auto
    assert code == 0, err
    assert "measuring backends" in out
    m = re.search(r"^backend ([\w-]+): \d+ items/s, validation accuracy [\d.]+% \(measured; torch", out, re.M)
    assert m, out
    chosen = m.group(1)
    assert SUMMARY.search(out).group(4) == chosen
    doc = json.loads((model / CALIBRATION_FILE).read_text())
    assert [e["chosen"] for e in doc["machines"].values()] == [chosen]
    assert len(pd.read_parquet(dst)) == 10

    # lmloop.load (default backend auto) reads the recorded choice: nothing is measured again
    capsys.readouterr()
    pred = lmloop.load(str(model))
    assert "measuring" not in capsys.readouterr().out
    assert pred.backend_name == chosen
    preds = pred.predict(["item 1 was wonderful and superb", "item 2 was awful and dreadful"])
    assert [p.label for p in preds] == ["pos", "neg"]
    for p in preds:
        assert isinstance(p, lmloop.infer.Prediction)
        assert set(p.scores) == {"neg", "pos"} and p.score == max(p.scores.values())
        assert sum(p.scores.values()) == pytest.approx(1.0, abs=1e-5)


# -------------------------------------------------------------------------------------------------- errors


def test_missing_text_column_is_a_clear_error(run_lmloop, finetuned, rows, tmp_path):
    # the real command: exit 2, the columns it found, the option to use, and no traceback
    src = write_table(tmp_path / "in.csv", [{"id": r["id"], "body": r["text"]} for r in rows])
    dst = tmp_path / "out.csv"
    r = run_lmloop(
        "predict", "--model", str(finetuned), "--input", str(src), "--output", str(dst),
        "--backend", "torch", "--quiet",
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "no text column 'text'" in r.stderr and "columns found: id, body" in r.stderr
    assert "--text-column" in r.stderr and "Traceback" not in r.stderr
    assert not dst.exists() and [p.name for p in tmp_path.iterdir()] == ["in.csv"]


def test_unknown_backend_is_an_argparse_error(capsys):
    from lmloop.cli import main

    argv = ["predict", "--model", "m", "--input", "x.csv", "--output", "y.csv"]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--backend", "gpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--backend" in err and "invalid choice: 'gpu'" in err and "onnx-int8" in err


def test_missing_input_file(cli, finetuned, tmp_path):
    dst = tmp_path / "out.csv"
    code, _, err = cli(
        "predict",
        "--model",
        finetuned,
        "--input",
        tmp_path / "nope.csv",
        "--output",
        dst,
        "--backend",
        "torch",
    )
    assert code == 2
    assert "nope.csv" in err and "file not found" in err
    assert list(tmp_path.iterdir()) == []


def test_a_failure_mid_file_leaves_no_partial_output(cli, finetuned, rows, tmp_path):
    lines = [json.dumps(r) for r in rows]
    lines[29] = '{"id": "broken", "text": "no closing brace"'  # line 30, in the third window of 10
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    dst = tmp_path / "out.jsonl"
    args = ("predict", "--model", finetuned, "--input", src, "--output", dst, "--backend", "torch")
    code, _, err = cli(*args, "--window", "10", "--quiet")
    assert code == 2
    assert "line 30" in err and "malformed JSON" in err and "Traceback" not in err
    assert not dst.exists()  # two windows were predicted, but nothing is written
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]
    # an older output survives a failed run untouched
    dst.write_text("previous results\n")
    code, _, _ = cli(*args, "--window", "10", "--quiet")
    assert code == 2 and dst.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


# -------------------------------------------------------------------------------------------------- export


def test_export_cli_then_predict_on_the_export(cli, finetuned, rows, expected, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    code, stdout, err = cli("export", "--model", finetuned, "--out", out)
    assert code == 2 and "already exists" in err and "--force" in err
    code, stdout, err = cli(
        "export", "--model", finetuned, "--format", "onnx", "--out", out, "--quantize", "int8", "--force"
    )
    assert code == 0, err
    assert "export OK" in stdout and "model.onnx" in stdout and "model.int8.onnx" in stdout
    assert not (out / "stale.txt").exists()
    assert {"model.onnx", "model.int8.onnx", "parity.json", "lmloop.json"} <= {p.name for p in out.iterdir()}
    parity = json.loads((out / "parity.json").read_text())
    assert parity["onnx"]["max_logit_diff"] <= 1e-3

    src = write_table(tmp_path / "in.csv", rows)
    for backend in ("onnx", "onnx-int8"):
        dst = tmp_path / f"{backend}.csv"
        code, stdout, err = cli(
            "predict", "--model", out, "--input", src, "--output", dst,
            "--backend", backend, "--window", "7", "--quiet",
        )  # fmt: skip
        assert code == 0, err
        assert SUMMARY.search(stdout).group(4) == backend
        df = read_table(dst)
        assert df["id"].tolist() == [r["id"] for r in rows]
        if backend == "onnx":
            check_predictions(df, expected)
        else:  # int8: the clear-cut toy rows keep their labels
            agree = np.mean(df["label"].to_numpy() == np.array(["neg", "pos"])[expected.argmax(1)])
            assert agree >= 0.9
    code, _, err = cli(
        "predict", "--model", out, "--input", src, "--output", tmp_path / "t.csv", "--backend", "torch"
    )
    assert code == 2 and "only an ONNX export" in err

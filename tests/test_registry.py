"""The model registry: versions with lineage, audited alias moves, rollback, diff, models:/ URIs, the CLI.

One tiny fine-tuned model is trained per module; a second "version" is a copy of it with other metrics and
another train fingerprint (registration cares about content, not about how it was trained). Every test
gets its own sqlite MLflow store and $LMLOOP_HOME.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmloop.errors import LmloopError
from lmloop.mlops.registry import AUDIT_MAX_CHARS, AUDIT_PREFIX, Registry, RegistryError, parse_uri


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, finetune_confident_tiny, tiny_model_dir, toy_csv):
    """(v1, v2): a tiny fine-tuned model, and a copy with better test accuracy and other train data."""
    root = tmp_path_factory.mktemp("registry-models")
    v1 = finetune_confident_tiny(root / "v1", tiny_model_dir, toy_csv)
    v2 = root / "v2"
    shutil.copytree(v1, v2)
    m = json.loads((v2 / "metrics.json").read_text())
    m["test"]["accuracy"] = m["test"]["accuracy"] - 0.25
    (v2 / "metrics.json").write_text(json.dumps(m))
    meta = json.loads((v2 / "lmloop.json").read_text())
    meta["data_fingerprints"]["train"]["sha256"] = "f" * 64
    (v2 / "lmloop.json").write_text(json.dumps(meta))
    return v1, v2


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow sqlite file with its schema in place: creating one runs ~50 migrations (seconds)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("registry-store") / "mlflow.db"
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_experiments()
    client.search_registered_models()
    return db


@pytest.fixture
def reg(empty_store, tmp_path, monkeypatch) -> Registry:
    """A Registry on this test's own copy of the empty store, with its own $LMLOOP_HOME."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path / "home"))
    return Registry(say=lambda m: None)


def test_register_promote_rollback_audit_diff(reg, model_dirs):
    v1_dir, v2_dir = model_dirs
    v1 = reg.register(v1_dir, "sentiment", reason="baseline")
    v2 = reg.register(v2_dir, "sentiment", parent=1, reason="more data")
    assert (v1.version, v2.version) == (1, 2) and not v1.existing
    assert v2.parent == 1 and v1.parent is None
    assert set(v1.data_fingerprints) == {"train", "validation", "test"}
    assert v2.data_fingerprints["train"] == "f" * 64
    assert "test.accuracy" in v1.metrics and "validation.macro_f1" in v1.metrics
    assert v1.run_id and v1.source.startswith("file://")  # the artifacts of a run in this store
    assert v1.base_model and v1.labels == ["neg", "pos"] and v1.params["train.lr"] == 0.01

    # the same directory again: the existing version, no copy
    again = reg.register(v1_dir, "sentiment")
    assert again.existing and again.version == 1
    assert [v.version for v in reg.list("sentiment")] == [1, 2]

    assert reg.promote("sentiment", 1, reason="first model", actor="ci-job-7").to_version == 1
    ch = reg.promote("sentiment", 2, reason="better on tweets", gates={"accuracy": True, "ece": 0.03})
    assert (ch.from_version, ch.to_version, ch.seq) == (1, 2, 2)
    assert reg.promote("sentiment", 2, reason="again") is None  # already there: not audited
    assert reg.show("sentiment", "champion").version == 2
    assert reg.list("sentiment")[1].aliases == ["champion"]

    back = reg.rollback("sentiment", reason="complaints about sarcasm")
    assert (back.from_version, back.to_version) == (2, 1)
    assert reg.show("sentiment").version == 1  # default: the champion

    log = reg.audit("sentiment")
    assert [(r.action, r.from_version, r.to_version) for r in log] == [
        ("promote", None, 1),
        ("promote", 1, 2),
        ("rollback", 2, 1),
    ]
    assert [r.reason for r in log] == ["first model", "better on tweets", "complaints about sarcasm"]
    assert (
        log[0].actor == "ci-job-7" and "@" in log[1].actor and log[1].gates == {"accuracy": True, "ece": 0.03}
    )
    assert all(r.time.endswith("Z") for r in log)
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("sentiment", reason="once more")  # v1 was the first champion

    d = reg.diff("sentiment", 1, "2")
    assert d.metrics["test.accuracy"]["delta"] == pytest.approx(-0.25)
    assert d.metrics["validation.accuracy"]["delta"] == 0
    assert set(d.changed) == {"data.train", "parent", "run_id"}  # two register runs

    # lineage from data to models: a train fingerprint finds the versions trained on it
    assert [v.version for v in reg.list(data="ffffffff")] == [2]


def test_resolve_downloads_once_and_loads(reg, model_dirs, tmp_path):
    import lmloop
    from lmloop.assets import resolve_model

    reg.register(model_dirs[0], "sentiment")
    reg.promote("sentiment", 1, reason="first")
    path = reg.resolve("models:/sentiment@champion")
    assert path == tmp_path / "home" / "registry" / "sentiment" / "1"
    assert (path / "config.json").is_file() and (path / ".lmloop-registry.json").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert Path(resolve_model("models:/sentiment/1")) == path  # the hook every verb goes through
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not downloaded again
    preds = lmloop.load("models:/sentiment@champion", backend="torch").predict(
        ["great and wonderful", "awful"]
    )
    assert [p.label for p in preds] == ["pos", "neg"]


def test_errors_are_lmloop_errors(reg, model_dirs, tmp_path):
    with pytest.raises(RegistryError, match="no registered model 'nope'"):
        reg.show("nope")
    reg.register(model_dirs[0], "sentiment")
    with pytest.raises(RegistryError, match="no version or alias 'staging'"):
        reg.show("sentiment", "staging")
    with pytest.raises(RegistryError, match="version 7"):
        reg.promote("sentiment", 7, reason="x")
    with pytest.raises(RegistryError, match="needs a reason"):
        reg.promote("sentiment", 1, reason=" ")
    with pytest.raises(RegistryError, match="reserved"):
        reg.promote("sentiment", 1, "latest", reason="x")
    with pytest.raises(RegistryError, match="cannot roll back sentiment@champion"):
        reg.rollback("sentiment", reason="x")
    with pytest.raises(RegistryError, match="no such version"):
        reg.register(model_dirs[1], "sentiment", parent=5)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(RegistryError, match="no weights"):
        reg.register(tmp_path / "half", "sentiment")
    with pytest.raises(RegistryError, match="config.json is missing"):
        reg.register(tmp_path, "sentiment")
    with pytest.raises(RegistryError, match="not a registry URI"):
        parse_uri("models:/sentiment")
    assert issubclass(RegistryError, LmloopError)


def test_audit_record_fits_the_sql_column(reg, model_dirs):
    reg.register(model_dirs[0], "sentiment")
    gates = {f"gate_{i}": {"value": "x" * 100, "passed": True} for i in range(200)}
    reg.promote("sentiment", 1, reason="r" * 3000, gates=gates)
    tags = reg.client.get_registered_model("sentiment").tags
    (value,) = [v for k, v in tags.items() if k.startswith(AUDIT_PREFIX)]
    assert len(value) <= AUDIT_MAX_CHARS
    assert reg.audit("sentiment")[0].to_version == 1


def test_register_without_a_run_opens_a_register_run(reg, model_dirs, tmp_path):
    d = tmp_path / "plain"
    shutil.copytree(model_dirs[0], d)
    (d / "lmloop.json").unlink()  # a plain HF directory: no training run, no metadata
    v = reg.register(d, "plain")
    run = reg.client.get_run(v.run_id)
    assert run.data.tags["lmloop.stage"] == "register"
    assert v.tags["lmloop.artifact_path"].startswith("registry/")
    assert (reg.resolve("models:/plain/1") / "model.safetensors").is_file()


def test_cli(cli, reg, model_dirs):
    v1, v2 = model_dirs
    code, out, err = cli("registry", "register", "--model", v1, "--name", "sentiment", "--reason", "baseline")
    assert code == 0, err
    assert "registered as sentiment v1" in out
    assert cli("registry", "register", "--model", v2, "--name", "sentiment", "--parent", "1")[0] == 0
    code, out, err = cli(
        "registry", "promote", "sentiment", "2", "--reason", "better", "--gates", '{"acc": true}'
    )
    assert code == 0 and "v2" in out, err
    code, out, _ = cli("registry", "list")
    assert code == 0 and "test acc" in out and "champion" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("sentiment")]
    assert len(lines) == 2
    code, out, _ = cli("registry", "show", "sentiment", "champion", "--json")
    assert code == 0 and json.loads(out)["version"] == 2
    code, out, _ = cli("registry", "diff", "sentiment", "1", "2")
    assert code == 0 and "test.accuracy" in out and "data.train" in out
    code, out, _ = cli("registry", "audit", "sentiment", "--json")
    assert code == 0 and json.loads(out)[0]["gates"] == {"acc": True}
    # errors: a message, exit 2, no traceback
    code, _, err = cli("registry", "rollback", "sentiment", "--reason", "x")
    assert code == 2 and "no earlier version" in err and "Traceback" not in err
    code, _, err = cli("registry", "show", "nope")
    assert code == 2 and "no registered model 'nope'" in err
    code, _, err = cli("registry", "promote", "sentiment", "1", "--reason", "x", "--gates", "{bad")
    assert code == 2 and "--gates" in err


def test_finetune_register_flag(cli, reg, tiny_model_dir, toy_csv, tmp_path):
    out = tmp_path / "ft"
    code, _, err = cli(
        "finetune", "--data", toy_csv, "--model", tiny_model_dir, "--max-steps", "2", "--precision", "fp32",
        "--quiet", "--out", out, "--register", "toy",
    )  # fmt: skip
    assert code == 0, err
    (v,) = reg.list("toy")
    assert v.run_id == json.loads((out / "lmloop.json").read_text())["mlflow_run_id"]
    assert v.tags["lmloop.artifact_path"] == "model"  # finetune's own model/ artifacts, not a second copy


def test_alias_move_is_audited_before_it_happens(reg, model_dirs, monkeypatch):
    """The audit record is written (pending) before the alias moves: a process killed between the steps
    leaves either no move (the pending record is hidden) or a move with its record (shown)."""
    reg.register(model_dirs[0], "sentiment")
    reg.register(model_dirs[1], "sentiment")
    reg.promote("sentiment", 1, reason="first")

    real_set_tag = reg.client.set_registered_model_tag

    def killed_after_pending(name, key, value):
        real_set_tag(name, key, value)
        if '"pending":true' in value:
            raise KeyboardInterrupt  # killed right after the write-ahead record

    monkeypatch.setattr(reg.client, "set_registered_model_tag", killed_after_pending)
    with pytest.raises(KeyboardInterrupt):
        reg.promote("sentiment", 2, reason="killed before the move")
    monkeypatch.undo()
    # the pending record stays on the model, but the alias never moved: the log does not claim it did
    assert reg.show("sentiment", "champion").version == 1
    assert [(a.from_version, a.to_version) for a in reg.audit("sentiment")] == [(None, 1)]

    # killed after the alias moved but before the record was confirmed: the move is in the log
    real_alias = reg.client.set_registered_model_alias
    confirm = {"n": 0}

    def no_confirm(name, key, value):
        if '"pending":true' not in value:
            raise KeyboardInterrupt
        real_set_tag(name, key, value)

    monkeypatch.setattr(reg.client, "set_registered_model_tag", no_confirm)
    monkeypatch.setattr(
        reg.client, "set_registered_model_alias", lambda *a: (real_alias(*a), confirm.update(n=1))
    )
    with pytest.raises(KeyboardInterrupt):
        reg.promote("sentiment", 2, reason="killed after the move")
    monkeypatch.undo()
    assert confirm["n"] == 1 and reg.show("sentiment", "champion").version == 2
    log = reg.audit("sentiment")
    assert [(a.from_version, a.to_version, a.reason) for a in log] == [
        (None, 1, "first"),
        (1, 2, "killed after the move"),
    ]
    # a later move confirms the history: still exactly these records plus the new one
    reg.rollback("sentiment", reason="undo")
    assert [(a.from_version, a.to_version) for a in reg.audit("sentiment")] == [(None, 1), (1, 2), (2, 1)]

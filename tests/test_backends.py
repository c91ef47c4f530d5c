"""Inference backends on a tiny fine-tuned model: every backend answers correctly and in input order, the
measured ``auto`` choice follows its rule and its cache, and ``export_model`` writes only faithful exports.

One tiny fine-tuning run (a few seconds) and one ONNX export are shared by the whole module; tests that
write ``backends.json`` work on a copy of the model directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmloop.errors import LmloopError
from lmloop.infer import backends as bk
from lmloop.infer.predictor import Predictor

# Clear-cut texts in the toy data's pattern, with words combined as training never saw them.
CLEAR = [
    ("item 901 was wonderful and superb", "pos"),
    ("item 902 was awful and dreadful", "neg"),
    ("item 903 was excellent and fantastic", "pos"),
    ("item 904 was horrible and disgusting", "neg"),
    ("item 905 was delightful and great", "pos"),
    ("item 906 was terrible and bad", "neg"),
    ("item 907 was love and superb", "pos"),
    ("item 908 was hate and awful", "neg"),
    ("item 909 was fantastic and wonderful", "pos"),
    ("item 910 was dreadful and horrible", "neg"),
    ("item 911 was great and excellent", "pos"),
    ("item 912 was bad and terrible", "neg"),
]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_model_dir, toy_csv, finetune_confident_tiny) -> Path:
    """The tiny BERT fine-tuned on the toy data; its dir holds validation.jsonl (for auto and export)."""
    return finetune_confident_tiny(tmp_path_factory.mktemp("backends") / "model", tiny_model_dir, toy_csv)


@pytest.fixture(scope="module")
def predictor(finetuned):
    """``predictor(name)``: a cached Predictor on backend ``name`` (small batches, so sorting matters)."""
    cache: dict[str, Predictor] = {}

    def get(name: str) -> Predictor:
        if name not in cache:
            cache[name] = Predictor.from_ref(str(finetuned), backend=name, batch_size=4)
        return cache[name]

    return get


@pytest.fixture
def model_copy(finetuned, predictor, tmp_path) -> Path:
    """A private copy of the fine-tuned dir (with the onnx/ cache already built: no re-export)."""
    predictor("onnx-int8")  # exports onnx/model.onnx and model.int8.onnx into the shared dir once
    dst = tmp_path / "model"
    shutil.copytree(finetuned, dst)
    assert not (dst / bk.CALIBRATION_FILE).exists()
    return dst


def _mixed_length_texts(n: int = 23, seed: int = 0) -> list[str]:
    """Texts from 1 to ~150 words (past max_length) in shuffled lengths, so sorted batches reorder them;
    positive, negative and mixed words in turn, so a row given to the wrong input shows."""
    rng = np.random.default_rng(seed)
    pos, neg = ["great", "wonderful", "excellent", "superb"], ["terrible", "awful", "horrible", "dreadful"]
    pools = [pos, neg, [*pos, *neg, "item", "was", "and", "the", "film"]]
    lengths = rng.permutation(np.linspace(1, 150, n).astype(int))
    return [" ".join(rng.choice(pools[i % 3], size=k)) for i, k in enumerate(lengths)]


# Batch invariance: exact backends give the same logits in any batch; dynamic int8 quantises activations
# with one scale per batch, so a row's logits move a little (measured <= 0.008) with its batch-mates.
LOGIT_TOL = {"torch": 1e-4, "torch-bf16": 1e-2, "onnx": 1e-4, "torch-int8": 0.05, "onnx-int8": 0.05}


# ------------------------------------------------------------------------------------------------ backends


@pytest.mark.parametrize("name", bk.BACKENDS)
def test_every_backend_gives_probabilities_in_input_order(predictor, name):
    # torch-bf16 runs even where it is slow (no native bf16): it must still be right
    pred = predictor(name)
    assert pred.backend_name == name
    texts = [t for t, _ in CLEAR[:5]] + ["ok"]
    probs = pred.predict_proba(texts)
    assert probs.shape == (len(texts), 2) and probs.dtype == np.float32
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert ((probs >= 0) & (probs <= 1)).all()
    # the same texts reversed give the same rows reversed, and one at a time the same rows again
    tol = LOGIT_TOL[name] / 2  # two classes: dp <= d(l1 - l0) / 4 <= max |dl| / 2
    assert np.abs(pred.predict_proba(texts[::-1])[::-1] - probs).max() <= tol
    single = np.concatenate([pred.predict_proba([t]) for t in texts])
    assert np.abs(single - probs).max() <= tol
    assert pred.predict_proba([]).shape == (0, 2)
    preds = pred.predict(texts)
    assert [p.label for p in preds] == [pred.labels[k] for k in probs.argmax(1)]
    # every backend is close to exact fp32 on this tiny model, bf16 and int8 included
    assert np.abs(probs - predictor("torch").predict_proba(texts)).max() < 0.05


def test_torch_and_onnx_logits_agree(predictor):
    torch_pred, onnx_pred = predictor("torch"), predictor("onnx")
    ids = torch_pred.encode(_mixed_length_texts() + [t for t, _ in CLEAR])
    a, b = torch_pred.predict_logits(ids), onnx_pred.predict_logits(ids)
    assert np.abs(a).max() > 0.5  # trained logits, not a near-zero random head
    assert np.abs(a - b).max() <= 1e-4


def test_export_onnx_leaves_the_model_as_it_was(finetuned, tmp_path):
    # Regression: the exporter used to hand the model back in training mode (dropout on), so the PyTorch
    # reference export_model compares against changed under it.
    from lmloop.infer.export import export_onnx

    pred = Predictor.from_ref(str(finetuned), backend="torch")
    ids = pred.encode([t for t, _ in CLEAR])
    before = pred.predict_logits(ids)
    export_onnx(pred.model, pred.tokenizer, tmp_path / "m.onnx")
    assert not pred.model.training
    assert np.array_equal(pred.predict_logits(ids), before)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize("name", ["torch-int8", "onnx-int8"])
def test_int8_backends_agree_on_clear_cut_texts(predictor, name):
    texts, gold = [t for t, _ in CLEAR], [y for _, y in CLEAR]
    exact = [p.label for p in predictor("torch").predict(texts)]
    assert exact == gold  # the tiny model learned the toy task
    quant = [p.label for p in predictor(name).predict(texts)]
    agree = np.mean([a == b for a, b in zip(exact, quant, strict=True)])
    assert agree >= 0.9, (name, quant)


@pytest.mark.parametrize("name", ["torch", "onnx", "torch-int8", "onnx-int8"])
def test_predict_logits_keeps_input_order_across_lengths(predictor, name):
    pred = predictor(name)  # batch_size 4: 23 inputs of very different lengths make 6 sorted batches
    ids = pred.encode(_mixed_length_texts())
    assert len({len(x) for x in ids}) > 15 and max(len(x) for x in ids) == pred.max_length
    batched = pred.predict_logits(ids)
    one_by_one = np.concatenate([pred.predict_logits([x]) for x in ids])
    assert batched.shape == (len(ids), 2)
    margin = batched[:, 1] - batched[:, 0]
    assert margin.max() > 1 and margin.min() < -1  # both classes present: a misplaced row would show
    assert np.abs(batched - one_by_one).max() <= LOGIT_TOL[name]
    perm = np.random.default_rng(1).permutation(len(ids))
    assert np.abs(pred.predict_logits([ids[i] for i in perm]) - batched[perm]).max() <= LOGIT_TOL[name]


# --------------------------------------------------------------------------------------------- calibration


def _check_rule(entry: dict) -> None:
    """``chosen`` is the fastest backend within ``tolerance_points`` of the reference's accuracy."""
    results = entry["results"]
    floor = results[entry["reference"]]["accuracy"] - entry["tolerance_points"]
    for name, r in results.items():
        assert {"accuracy", "items_per_s", "qualifies"} <= set(r), name
        assert 0.0 <= r["accuracy"] <= 100.0 and r["items_per_s"] > 0
        assert r["qualifies"] == (r["accuracy"] >= floor - 1e-9), name
    qualifying = [n for n, r in results.items() if r["qualifies"]]
    assert entry["reference"] in qualifying
    assert entry["chosen"] == max(qualifying, key=lambda n: results[n]["items_per_s"])


def test_auto_measures_records_and_reuses_its_choice(model_copy, monkeypatch):
    from lmloop.train import bf16_speedup

    said: list[str] = []
    pred = Predictor.from_ref(str(model_copy), backend="auto", say=said.append)
    doc = json.loads((model_copy / bk.CALIBRATION_FILE).read_text())
    threads = bk._threads()
    entry = doc["machines"][bk.machine_key(threads, 32)]
    cands, skipped = bk.available_backends(model_copy, True)
    assert set(entry["results"]) == set(cands) and entry["reference"] == "torch"
    assert {"torch", "torch-int8", "onnx", "onnx-int8"} <= set(cands)
    assert entry["n_validation"] == len(bk.read_validation(model_copy)[0]) > 0
    assert entry["threads"] == threads and entry["tolerance_points"] == bk.DEFAULT_TOLERANCE
    _check_rule(entry)
    assert pred.backend_name == entry["chosen"] and pred.calibration == entry
    assert entry["skipped"] == skipped
    if bf16_speedup() < 1.2:
        assert "torch-bf16" not in entry["results"]
        assert "bf16" in entry["skipped"]["torch-bf16"]
        assert any("torch-bf16" in m and "skipped" in m for m in said)
    assert any(m.startswith("auto -> ") for m in said)

    # the second load reads the record: nothing is measured again
    def no_measuring(*a, **k):
        raise AssertionError("calibrate() ran although backends.json has this machine's choice")

    monkeypatch.setattr(bk, "calibrate", no_measuring)
    again = Predictor.from_ref(str(model_copy), backend="auto", say=said.append)
    assert again.backend_name == entry["chosen"] and again.calibration == entry
    # ... but another thread count is another machine key, and --recalibrate measures again
    assert bk.cached_choice(model_copy, threads + 1) is None
    with pytest.raises(AssertionError, match="calibrate"):
        Predictor.from_ref(str(model_copy), backend="auto", recalibrate=True, say=said.append)

    # new weights (a changed mtime) invalidate the record
    w = model_copy / "model.safetensors"
    st = w.stat()
    os.utime(w, (st.st_atime, st.st_mtime + 100))
    assert bk.cached_choice(model_copy, threads) is None
    with pytest.raises(AssertionError, match="calibrate"):
        Predictor.from_ref(str(model_copy), backend="auto", say=said.append)


def test_auto_without_validation_split_falls_back_to_torch(model_copy, monkeypatch):
    (model_copy / "validation.jsonl").unlink()
    calibrate = bk.calibrate
    monkeypatch.setattr(bk, "calibrate", lambda *a, **k: pytest.fail("nothing to calibrate on"))
    pred = Predictor.from_ref(str(model_copy), backend="auto", say=lambda m: None)
    assert pred.backend_name == "torch" and pred.calibration is None
    assert not (model_copy / bk.CALIBRATION_FILE).exists()
    with pytest.raises(LmloopError, match="validation.jsonl"):
        calibrate(model_copy, make_predictor=lambda n: None, candidates=["torch"], threads=1)


def test_auto_reference_is_fp32_even_where_bf16_is_fast(model_copy, monkeypatch):
    # On a CPU with fast bf16, precision='auto' makes eager torch bf16; the calibration's "torch" candidate
    # is still the exact fp32 reference (torch-bf16 is measured as a candidate of its own).
    import lmloop.train

    monkeypatch.setattr(lmloop.train, "bf16_speedup", lambda device="cpu": 2.0)
    seen = {}

    def spy(model_dir, *, make_predictor, candidates, **kw):
        seen["candidates"] = list(candidates)
        seen["torch"] = make_predictor("torch").backend
        raise LmloopError("stop here")

    monkeypatch.setattr(bk, "calibrate", spy)
    with pytest.raises(LmloopError, match="stop here"):
        Predictor.from_ref(str(model_copy), backend="auto", say=lambda m: None)
    assert seen["candidates"][0] == "torch" and "torch-bf16" in seen["candidates"]
    assert seen["torch"].name == "torch" and seen["torch"].precision == "fp32"


class _Replay:
    """A predictor that replays precomputed probabilities for the whole validation split: far faster than
    any real backend. ``flip`` rows (which the reference got right) get the other label."""

    def __init__(self, inner: Predictor, texts: list[str], flip: list[int]):
        self.inner, self.labels, self.batch_size = inner, inner.labels, inner.batch_size
        self.encode = inner.encode
        probs = inner.predict_ids(inner.encode(texts)).copy()
        for i in flip:
            probs[i] = probs[i][::-1]  # two classes: the other label wins
        self.probs = probs

    def predict_ids(self, ids):
        return self.probs if len(ids) == len(self.probs) else self.inner.predict_ids(ids)


def test_calibrate_never_picks_a_faster_backend_that_loses_accuracy(model_copy, predictor):
    texts, gold = bk.read_validation(model_copy)
    exact = predictor("torch")
    assert len(exact.labels) == 2
    right = [i for i, k in enumerate(exact.predict_proba(texts).argmax(1)) if exact.labels[k] == gold[i]]
    assert len(right) >= 2
    point = 100.0 / len(texts)  # accuracy points one flipped example costs

    def make(name: str):
        return {
            "torch": lambda: exact,
            "fast-wrong": lambda: _Replay(exact, texts, flip=right[:2]),
            "fast-one-off": lambda: _Replay(exact, texts, flip=right[:1]),
            "fast-right": lambda: _Replay(exact, texts, flip=[]),
        }[name]()

    def run(cands, tolerance):
        e = bk.calibrate(
            model_copy,
            make_predictor=make,
            candidates=cands,
            tolerance=tolerance,
            threads=1,
            say=lambda m: None,
        )
        _check_rule(e)
        return e

    e = run(["torch", "fast-wrong"], bk.DEFAULT_TOLERANCE)
    r = e["results"]
    assert r["fast-wrong"]["items_per_s"] > r["torch"]["items_per_s"]  # faster, yet not chosen
    assert r["fast-wrong"]["accuracy"] == pytest.approx(r["torch"]["accuracy"] - 2 * point, abs=0.01)
    assert not r["fast-wrong"]["qualifies"] and e["chosen"] == "torch"

    e = run(["torch", "fast-wrong", "fast-right"], bk.DEFAULT_TOLERANCE)
    assert e["chosen"] == "fast-right" and e["results"]["fast-right"]["agreement_with_reference"] == 100.0

    # the tolerance is the line: one flipped example (~8 points on 12) is out at 0.9 of it, in at 1.1
    e = run(["torch", "fast-one-off"], 0.9 * point)
    assert e["chosen"] == "torch" and not e["results"]["fast-one-off"]["qualifies"]
    e = run(["torch", "fast-one-off"], 1.1 * point)
    assert e["chosen"] == "fast-one-off" and e["results"]["fast-one-off"]["qualifies"]
    # every run replaced the record for this machine key; the file stays one valid document
    doc = json.loads((model_copy / bk.CALIBRATION_FILE).read_text())
    assert doc["machines"][bk.machine_key(1, 32)]["chosen"] == "fast-one-off"


# -------------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(finetuned, tmp_path_factory):
    from lmloop.infer.export import export_model

    out = tmp_path_factory.mktemp("export") / "onnx-export"
    said: list[str] = []
    report = export_model(str(finetuned), out, quantize="int8", say=said.append)
    return out, report, said


def test_export_writes_a_self_contained_checked_export(exported, finetuned):
    out, report, said = exported
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.int8.onnx", "parity.json", "lmloop.json", "config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "validation.jsonl"} <= names
    from lmloop.infer.export import CARRY_FILES

    assert {n for n in CARRY_FILES if (finetuned / n).is_file()} <= names  # vocab.txt where there is one
    assert "model.safetensors" not in names
    assert not [n for n in out.parent.iterdir() if n.name.startswith(".")]  # no staging dir left
    parity = json.loads((out / "parity.json").read_text())
    assert parity == json.loads(json.dumps(report))
    n_val = len(bk.read_validation(finetuned)[0])
    assert parity["onnx"]["n"] == n_val and parity["onnx"]["max_logit_diff"] <= 1e-3
    assert parity["onnx"]["agreement"] == 100.0 and parity["onnx"]["accuracy_delta"] == 0.0
    assert parity["onnx-int8"]["accuracy_delta"] >= -0.3
    assert parity["thresholds"] == {"max_logit_diff": 1e-3, "max_accuracy_drop": 0.3}
    meta = json.loads((out / "lmloop.json").read_text())
    assert meta["format"] == "onnx" and meta["labels"] == ["neg", "pos"]
    assert meta["exported_from"] == str(finetuned)
    assert any("checking parity" in m for m in said)


def test_export_dir_predicts_like_the_torch_model(exported, predictor):
    out, _, _ = exported
    texts = [t for t, _ in CLEAR] + _mixed_length_texts()
    want = predictor("torch").predict_logits(predictor("torch").encode(texts))
    onnx = Predictor.from_ref(str(out), backend="onnx")
    assert onnx.model is None and onnx.labels == ["neg", "pos"]
    got = onnx.predict_logits(onnx.encode(texts))
    assert np.abs(got - want).max() <= 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()
    int8 = Predictor.from_ref(str(out), backend="onnx-int8").predict([t for t, _ in CLEAR])
    assert np.mean([p.label == y for p, (_, y) in zip(int8, CLEAR, strict=True)]) >= 0.9
    for torch_backend in ("torch", "torch-int8", "torch-bf16"):
        with pytest.raises(LmloopError, match="only an ONNX export"):
            Predictor.from_ref(str(out), backend=torch_backend)


def test_auto_on_an_export_measures_the_onnx_backends(exported, tmp_path):
    src, _, _ = exported
    out = tmp_path / "export"
    shutil.copytree(src, out)
    pred = Predictor.from_ref(str(out), backend="auto", say=lambda m: None)
    entry = pred.calibration
    assert set(entry["results"]) == {"onnx", "onnx-int8"} and entry["reference"] == "onnx"
    assert {"torch", "torch-int8", "torch-bf16"} <= set(entry["skipped"])
    _check_rule(entry)
    assert pred.backend_name == entry["chosen"]


def _wrong_graph(monkeypatch, finetuned):
    """Make export_onnx export another random init of the same architecture: a wrong but loadable graph."""
    import torch
    from transformers import AutoConfig, BertForSequenceClassification

    import lmloop.infer.export as ex

    real = ex.export_onnx

    def export_other(model, tokenizer, path):
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            other = BertForSequenceClassification(AutoConfig.from_pretrained(str(finetuned)))
        return real(other.eval(), tokenizer, path)

    monkeypatch.setattr(ex, "export_onnx", export_other)


def test_export_refused_on_parity_failure_keeps_the_old_export(finetuned, tmp_path, monkeypatch):
    from lmloop.infer.export import export_model

    _wrong_graph(monkeypatch, finetuned)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("the previous, good export")
    with pytest.raises(LmloopError, match="parity check failed") as e:
        export_model(str(finetuned), out, force=True, say=lambda m: None)
    assert "max |logit diff|" in str(e.value) and "> 0.001" in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging dir left behind
    assert [p.name for p in out.iterdir()] == ["model.onnx"]
    assert (out / "model.onnx").read_text() == "the previous, good export"


def test_export_refuses_a_non_empty_out_without_force(finetuned, tmp_path, monkeypatch):
    import lmloop.infer.export as ex

    monkeypatch.setattr(ex, "export_onnx", lambda *a: pytest.fail("must refuse before exporting"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(LmloopError, match="already exists.*--force"):
        ex.export_model(str(finetuned), out, say=lambda m: None)
    assert (out / "keep.txt").read_text() == "x"


def test_export_failure_leaves_nothing_and_checks_against_fp32(finetuned, tmp_path, monkeypatch):
    # An error mid-export leaves no file and no staging dir. And where bf16 measures fast, the parity
    # reference is still the exact fp32 model (a bf16 reference would fail the 1e-3 logit bound).
    import lmloop.infer.export as ex
    import lmloop.train

    monkeypatch.setattr(lmloop.train, "bf16_speedup", lambda device="cpu": 2.0)
    seen = {}

    def stop(model, tokenizer, path):
        seen["path"] = Path(path)
        raise LmloopError("stop here")

    real_from_ref = Predictor.from_ref.__func__

    def spy_from_ref(cls, *a, **k):
        seen["reference"] = p = real_from_ref(cls, *a, **k)
        return p

    monkeypatch.setattr(ex, "export_onnx", stop)
    monkeypatch.setattr(Predictor, "from_ref", classmethod(spy_from_ref))
    out = tmp_path / "out"
    with pytest.raises(LmloopError, match="stop here"):
        ex.export_model(str(finetuned), out, say=lambda m: None)
    assert seen["path"].parent.parent == tmp_path and seen["path"].parent.name.startswith(".out.")
    assert list(tmp_path.iterdir()) == []
    ref = seen["reference"].backend
    assert ref.name == "torch" and ref.precision == "fp32"

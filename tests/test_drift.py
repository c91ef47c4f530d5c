"""Drift detectors (lmloop.mlops.drift) on real data: VADER sentences embedded by the packaged MiniLM.

The texts are embedded once per module (800 sentences, ~10 s); the repeated-split checks then reuse those
embeddings, so calibration is measured over many splits in a few seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import kstest

from lmloop.errors import DataError
from lmloop.mlops.drift import (
    Embedder,
    Reference,
    build_reference,
    classifier_test,
    detect,
    mmd_test,
    psi,
    psi_band,
    text_properties,
)

N_MOVIES, N_OTHER = 500, 150  # movies: 250 reference + 250 held-out; tweets / amazon: one traffic window


@pytest.fixture(scope="module")
def corpus(vader_dir):
    """``{domain: texts}``: a seeded sample of each VADER domain."""
    from lmloop.data.builtin import read_vader

    df = read_vader(vader_dir)
    rng = np.random.default_rng(0)
    out = {}
    for domain, n in [("movies", N_MOVIES), ("tweets", N_OTHER), ("amazon", N_OTHER)]:
        texts = df.loc[df["domain"] == domain, "text"].tolist()
        out[domain] = [texts[i] for i in rng.choice(len(texts), n, replace=False)]
    return out


@pytest.fixture(scope="module")
def embedder(minilm_dir):
    import torch

    torch.set_num_threads(1)  # the machine is shared; MiniLM on 1 thread embeds ~100 sentences/s
    return Embedder(str(minilm_dir))


@pytest.fixture(scope="module")
def embedded(corpus, embedder):
    """``{domain: (N, 384) float32}`` aligned with ``corpus``."""
    return {d: embedder(texts) for d, texts in corpus.items()}


@pytest.fixture(scope="module")
def movies_ref(corpus, embedded, embedder):
    """A reference built from the first 250 movie sentences (precomputed embeddings, MiniLM tokenizer)."""
    n = N_MOVIES // 2
    return build_reference(
        corpus["movies"][:n], embedder=embedder, embeddings=embedded["movies"][:n], labels=["a"] * 10
    )


def test_embedder_unit_norm_and_input_order(embedder, corpus, embedded):
    texts = corpus["tweets"][:5]
    e = embedder(texts)
    assert e.shape == (5, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    # batched with other texts, sorted by length, then put back: the same vectors as alone
    np.testing.assert_allclose(embedder([texts[3]])[0], embedded["tweets"][3], atol=1e-5)


def test_text_properties_features(embedder):
    p = text_properties(
        ["@bob loving it!! #win http://x.co 42", "a plain sentence about the film", "привет мир 😀"],
        tokenizer=embedder.tokenizer,
    )
    assert p["mentions"].tolist() == [1, 0, 0] and p["hashtags"].tolist() == [1, 0, 0]
    assert p["urls"].tolist() == [1, 0, 0] and p["exclaim"][0] == 2 and p["digits"][0] > 0
    assert p["words"][1] == 6 and p["stop_words"][1] > 0.3 and p["stop_words"][2] == 0
    assert p["non_latin"][2] == 1.0 and p["non_ascii"][2] > 0.8 and p["non_ascii"][1] == 0
    assert p["unk_rate"][2] > 0 and p["unk_rate"][1] == 0  # the emoji is [UNK] for MiniLM's vocabulary


def test_mmd_pvalue_calibrated_on_random_splits_of_one_domain(embedded):
    """Under no drift the permutation p-value is uniform: 40 random 200-vs-200 splits of movie sentences
    alarm at alpha=0.05 about 5% of the time, and their p-values pass a KS test against uniform."""
    e = embedded["movies"]
    rng = np.random.default_rng(1)
    ps = []
    for i in range(40):
        idx = rng.permutation(len(e))
        ps.append(mmd_test(e[idx[:200]], e[idx[200:400]], permutations=200, seed=i)[1])
    ps = np.array(ps)
    assert np.mean(ps <= 0.05) <= 0.15, ps
    assert kstest(ps, "uniform").pvalue > 0.01, np.sort(ps)


def test_no_alarm_on_held_out_same_domain(corpus, embedded, movies_ref):
    n = N_MOVIES // 2
    report = detect(movies_ref, corpus["movies"][n:], embeddings=embedded["movies"][n:], alpha=0.01)
    assert not report.drifted, report.summary()
    mmd = report.test("embedding.mmd")
    assert mmd.p_value > 0.01 and mmd.extra["n_reference"] == n
    assert {t.group for t in report.tests} == {"text", "embedding"}
    assert "text.unk_rate" in {t.name for t in report.tests}


def test_report_false_positive_rate_on_random_splits(corpus, embedded, embedder):
    """The whole report (12 property tests + MMD) at family-wise alpha=0.05 on 20 random splits of movie
    sentences: alarms at most ~alpha of the time (the text tests are conservative on discrete features)."""
    texts, e = corpus["movies"], embedded["movies"]
    rng = np.random.default_rng(2)
    alarms = []
    for i in range(20):
        idx = rng.permutation(len(texts))
        a, b = idx[:250], idx[250:]
        ref = build_reference([texts[j] for j in a], tokenizer=embedder.tokenizer, embeddings=e[a])
        report = detect(ref, [texts[j] for j in b], embeddings=e[b], alpha=0.05, permutations=200, seed=i)
        alarms.append(report.drifted)
    assert np.mean(alarms) <= 0.15, alarms


@pytest.mark.parametrize("domain", ["tweets", "amazon"])
def test_alarm_on_movies_to_other_domain(corpus, embedded, movies_ref, domain):
    report = detect(movies_ref, corpus[domain], embeddings=embedded[domain], alpha=0.01, classifier=True)
    assert report.drifted, report.summary()
    mmd = report.test("embedding.mmd")
    assert mmd.drifted and mmd.p_value < 0.01
    assert report.test("embedding.classifier").statistic > 0.75  # held-out AUC
    if domain == "tweets":  # shorter, with @mentions: the cheap properties see it without embeddings
        assert report.test("text.chars").drifted and report.test("text.mentions").drifted
    json.dumps(report.to_dict())  # plain JSON


def test_classifier_test_null_and_power(embedded):
    e = embedded["movies"]
    auc, p = classifier_test(e[:300], e[300:], seed=0)
    assert 0.35 < auc < 0.65 and p > 0.01
    auc, p = classifier_test(e[:300], embedded["tweets"], seed=0)
    assert auc > 0.8 and p < 1e-6


def test_prediction_drift_chi2_and_psi():
    rng = np.random.default_rng(0)
    ref = Reference(properties={}, label_counts={"negative": 500, "positive": 500})
    same = rng.choice(["negative", "positive"], 300).tolist()
    shifted = rng.choice(["negative", "positive"], 300, p=[0.1, 0.9]).tolist()
    texts = ["x"] * 300
    ok = detect(ref, texts, predicted_labels=same).test("prediction.chi2")
    assert not ok.drifted and ok.p_value > 0.01 and ok.extra["psi_band"] == "stable"
    bad = detect(ref, texts, predicted_labels=shifted).test("prediction.chi2")
    assert bad.drifted and bad.p_value < 1e-10 and bad.extra["psi_band"] == "major"
    assert bad.extra["current_share"]["positive"] > 0.85
    # a label the reference never saw is a column of its own, not a crash
    new = detect(ref, texts, predicted_labels=["neutral"] * 100 + same[:200]).test("prediction.chi2")
    assert new.drifted and "neutral" in new.extra["current_share"]


def test_psi_bands():
    assert psi([50, 50], [50, 50]) == pytest.approx(0.0)
    assert psi([50, 50], [90, 10]) == pytest.approx(0.4 * np.log(1.8) + 0.4 * np.log(5), rel=1e-6)
    assert [psi_band(v) for v in (0.05, 0.1, 0.2, 0.25, 0.9)] == [
        "stable",
        "moderate",
        "moderate",
        "major",
        "major",
    ]


def test_reference_save_load_round_trip(tmp_path, corpus, embedded, movies_ref):
    path = movies_ref.save(tmp_path / "model" / "drift_reference.npz")
    assert path.is_file() and path.with_suffix(".json").is_file()
    loaded = Reference.load(path.with_suffix(".json"))
    assert loaded.properties.keys() == movies_ref.properties.keys()
    for k, v in movies_ref.properties.items():
        np.testing.assert_array_equal(loaded.properties[k], v)
    np.testing.assert_array_equal(loaded.embeddings, movies_ref.embeddings)
    assert loaded.label_counts == {"a": 10} and loaded.embedder == movies_ref.embedder
    assert loaded.n_texts == movies_ref.n_texts == N_MOVIES // 2
    # same inputs, same seed -> the same report, from the original and from the loaded reference
    kw = dict(embeddings=embedded["tweets"], predicted_labels=["a"] * 150)
    assert (
        detect(loaded, corpus["tweets"], **kw).to_dict()
        == detect(movies_ref, corpus["tweets"], **kw).to_dict()
    )
    (tmp_path / "model" / "drift_reference.json").unlink()
    with pytest.raises(DataError, match="incomplete"):
        Reference.load(path)


def test_errors_and_insufficient_data(corpus, embedded, movies_ref):
    with pytest.raises(DataError, match="no texts"):
        build_reference([])
    with pytest.raises(DataError, match="no texts"):
        detect(movies_ref, [])
    with pytest.raises(DataError, match="one string"):
        detect(movies_ref, "a single string")
    with pytest.raises(DataError, match="2 embeddings for 3 texts"):
        build_reference(["a", "b", "c"], embeddings=np.zeros((2, 4)))
    # too few texts: every test is reported as insufficient, none raises, nothing alarms
    few = detect(
        movies_ref, corpus["tweets"][:5], embeddings=embedded["tweets"][:5], predicted_labels=["a"] * 5
    )
    assert not few.drifted
    assert all(t.p_value is None and t.detail.startswith("insufficient data") for t in few.tests)
    # a permutation p-value cannot go below 1/(1 + permutations): the report says so instead of staying silent
    r = detect(movies_ref, corpus["tweets"], embeddings=embedded["tweets"], alpha=0.001, permutations=99)
    assert "raise permutations" in r.test("embedding.mmd").detail
    # a reference without embeddings or labels: those tests say so
    bare = build_reference(corpus["movies"][:100])
    r = detect(bare, corpus["movies"][100:200], predicted_labels=["a"] * 100)
    assert "no embeddings" in r.test("embedding.mmd").detail
    assert "no label distribution" in r.test("prediction.chi2").detail
    assert "text.unk_rate" not in {t.name for t in r.tests}  # no tokenizer given, none used

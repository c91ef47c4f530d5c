from __future__ import annotations

import json

import pandas as pd
import pytest

from lmloop.data import (
    DataWarning,
    check_labels,
    dedupe,
    fingerprint,
    load_labeled,
    normalise_text,
    prepare,
    prepare_splits,
    split_frame,
    write_card,
)
from lmloop.data.prepare import split_sizes, subsample
from lmloop.errors import ConfigError, DataError


def frame(n_per_label=20, labels=("a", "b"), domains=("x", "y")) -> pd.DataFrame:
    """n_per_label rows of each label, spread evenly over the domains; all texts distinct."""
    rows = [
        {"text": f"text {lab} {dom} {i}", "label": lab, "domain": dom}
        for lab in labels
        for dom in domains
        for i in range(n_per_label // len(domains))
    ]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- normalisation and dedupe


def test_normalise_text():
    assert normalise_text("  Ｈｅｌｌｏ,\t  WORLD!!! ") == "hello, world"
    assert normalise_text("...Straße") == "strasse"
    assert normalise_text("!!!") == "!!!"  # all punctuation: kept, not emptied
    assert normalise_text("nice :)") != normalise_text("nice :(")  # emoticons survive


def test_dedupe_exact_normalised_and_conflicts():
    df = pd.DataFrame(
        {
            "text": ["Great movie", "Great movie", "great   MOVIE!", "bad", "Meh.", "meh", "other"],
            "label": ["pos", "pos", "pos", "neg", "pos", "neg", "neg"],
            "_row": [2, 3, 4, 5, 6, 7, 8],
            "_source": ["d.csv"] * 7,
        }
    )
    with pytest.warns(DataWarning, match="conflicting labels"):
        out, stats = dedupe(df)
    assert out["text"].tolist() == ["Great movie", "bad", "other"]
    assert stats["exact_duplicates_removed"] == 1
    assert stats["normalised_duplicates_removed"] == 1
    assert stats["conflicting_label_rows_removed"] == 2
    assert stats["conflicting_label_texts"] == 1
    ex = stats["conflict_examples"][0]
    assert ex["labels"] == ["neg", "pos"] and ex["where"] == ["d.csv:6", "d.csv:7"]


def test_prepare_records_dedupe_in_card():
    df = pd.concat([frame(), pd.DataFrame({"text": ["text a x 0"], "label": ["a"], "domain": ["x"]})])
    data = prepare(df)
    assert data.card["dedup"]["all"]["exact_duplicates_removed"] == 1
    assert sum(data.card["rows"].values()) == 40


# ---------------------------------------------------------------- splitting


def test_split_is_deterministic_and_seed_dependent():
    df = frame(100)
    a = split_frame(df, seed=1)
    b = split_frame(df, seed=1)
    c = split_frame(df, seed=2)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])
    assert set(a["test"]["text"]) != set(c["test"]["text"])


def test_split_is_stratified_and_disjoint():
    df = frame(200, labels=("a", "b", "c"))
    parts = split_frame(df, seed=0, val_frac=0.1, test_frac=0.2)
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [420, 60, 120]
    for name in ("validation", "test"):
        counts = parts[name].groupby(["label", "domain"]).size()
        assert counts.max() - counts.min() <= 1  # each label x domain stratum gets its share
    texts = [set(p["text"]) for p in parts.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


@pytest.mark.parametrize("n", [3, 4, 5, 7, 10])
def test_tiny_data_fills_every_split_and_keeps_labels_in_train(n):
    df = pd.DataFrame({"text": [f"t{i}" for i in range(n)], "label": ["a"] * (n - 1) + ["b"]})
    for seed in range(5):
        parts = split_frame(df, seed=seed)
        assert set(parts["train"]["label"]) == {"a", "b"}  # the single "b" stays in train
        assert sum(len(p) for p in parts.values()) == n
        if n >= 4:  # 2 training rows (one per label) + 1 validation + 1 test
            assert all(len(p) for p in parts.values()), (n, seed)


def test_split_sizes_edges():
    assert split_sizes(1, 0.1, 0.1) == (0, 0)
    assert split_sizes(2, 0.1, 0.1) == (0, 1)
    assert split_sizes(3, 0.1, 0.1) == (1, 1)
    assert split_sizes(100, 0.1, 0.2) == (10, 20)
    assert split_sizes(10, 0.0, 0.1) == (0, 1)
    with pytest.raises(ConfigError):
        split_sizes(10, 0.6, 0.5)


def test_subsample_keeps_labels_and_size():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(100)], "label": ["a"] * 97 + ["b", "c", "d"]})
    out = subsample(df, 10, seed=3)
    assert len(out) == 10 and set(out["label"]) == {"a", "b", "c", "d"}
    assert subsample(df, 10, seed=3).equals(out)


# ---------------------------------------------------------------- labels


def test_single_class_error():
    df = pd.DataFrame({"text": ["a", "b", "c"], "label": ["x"] * 3, "_source": ["d.csv"] * 3})
    with pytest.raises(
        DataError, match=r"d.csv, field 'label': needs at least 2 classes, found only 'x' in 3 rows"
    ):
        prepare(df)


def test_unseen_label_in_test_names_line(write):
    train = load_labeled(write("train.csv", "text,label\na,x\nb,y\nc,x\nd,y\n"))
    test = load_labeled(write("test.csv", "text,label\ne,x\nf,z\ng,z\n"))
    with pytest.raises(DataError) as info:
        check_labels(train, {"test": test}, "train.csv")
    msg = str(info.value)
    assert "test.csv, line 3, field 'label'" in msg and "label 'z' in the test data" in msg
    assert "training labels: x, y" in msg
    assert info.value.line == 3


def test_labels_sorted_numerically():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(30)], "label": [str(i % 3 * 5) for i in range(30)]})
    assert prepare(df).labels == ["0", "5", "10"]


# ---------------------------------------------------------------- given splits and leakage


def test_prepare_splits_removes_leakage_from_train_only():
    train = pd.DataFrame(
        {"text": ["Same text!", "other", "more", "x1", "x2"], "label": ["a", "b", "a", "b", "a"]}
    )
    test = pd.DataFrame({"text": ["same TEXT", "fresh"], "label": ["a", "b"]})
    validation = pd.DataFrame({"text": ["x1.", "new"], "label": ["b", "a"]})
    with pytest.warns(DataWarning, match="leakage"):
        data = prepare_splits(train, validation, test)
    assert data.train["text"].tolist() == ["other", "more", "x2"]
    assert data.test["text"].tolist() == ["same TEXT", "fresh"]
    assert len(data.validation) == 2
    leak = data.card["leakage"]
    assert (
        leak["train_test"]["train_rows_removed"] == 1 and leak["train_validation"]["train_rows_removed"] == 1
    )
    assert data.card["split"]["method"] == {"train": "given", "validation": "given", "test": "given"}


def test_prepare_splits_carves_missing_validation():
    data = prepare_splits(frame(40), None, frame(8, domains=("z",)))  # 80 training rows
    assert len(data.validation) == 8 and len(data.train) == 72
    assert data.card["split"]["method"]["validation"] == "carved from train"


def test_split_column_is_used(write):
    rows = "".join(f"t{i},{'ab'[i % 2]},{['train', 'train', 'dev', 'test'][i % 4]}\n" for i in range(40))
    data = prepare(load_labeled(write("d.csv", "text,label,split\n" + rows)))
    assert (len(data.train), len(data.validation), len(data.test)) == (20, 10, 10)
    with pytest.raises(DataError, match="no 'train' rows"):
        prepare(load_labeled(write("e.csv", "text,label,split\na,x,test\nb,y,test\n")))


# ---------------------------------------------------------------- fingerprints and card


def test_fingerprint_order_invariant_content_sensitive():
    df = frame(10)
    fp = fingerprint(df)
    assert fingerprint(df.sample(frac=1, random_state=0)) == fp
    changed_label = df.copy()
    changed_label.loc[0, "label"] = "b"
    changed_domain = df.copy()
    changed_domain.loc[0, "domain"] = "z"
    changed_text = df.copy()
    changed_text.loc[0, "text"] += " "
    assert len({fp, fingerprint(changed_label), fingerprint(changed_domain), fingerprint(changed_text)}) == 4
    # a tab inside a text must not collide with a field boundary
    a = pd.DataFrame({"text": ["x\ty"], "label": ["z"]})
    b = pd.DataFrame({"text": ["x"], "label": ["y\tz"]})
    assert fingerprint(a) != fingerprint(b)


def test_prepared_data_and_card(tmp_path):
    data = prepare(frame(40), seed=7, source="mem")
    assert list(data.train.columns) == ["text", "label", "domain"]
    assert data.labels == ["a", "b"]
    assert data.fingerprints["train"] == fingerprint(data.train) and len(data.fingerprint) == 16
    card = data.card
    assert card["rows"] == {"train": 64, "validation": 8, "test": 8}
    tr = card["splits"]["train"]
    assert tr["label_counts"] == {"a": 32, "b": 32} and tr["label_fractions"] == {"a": 0.5, "b": 0.5}
    assert tr["domain_counts"] == {"x": 32, "y": 32}
    assert set(tr["length_chars"]) == {"p5", "p50", "p95", "p99", "max", "mean"}
    assert tr["length_words"]["max"] == 4.0
    assert card["fingerprints"]["test"]["short"] == data.fingerprints["test"][:16]
    assert card["split"]["seed"] == 7 and card["split"]["stratify"] == ["label", "domain"]
    assert "leakage" in card and "dedup" in card and card["source"] == "mem"

    json_path, md_path = write_card(card, tmp_path / "out")
    assert json.loads(json_path.read_text())["fingerprint"] == data.fingerprint
    md = md_path.read_text()
    assert "# Data card: mem" in md and "| train | 64 |" in md and data.fingerprints["train"] in md

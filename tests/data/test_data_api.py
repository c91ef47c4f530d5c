from __future__ import annotations

import dataclasses
import sys
import types

import pytest

from lmloop.data import DataWarning, load_data
from lmloop.errors import ConfigError, DataError


def rows(n: int, offset: int = 0) -> str:
    return "".join(f"sample text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(offset, offset + n))


def test_single_file_is_split(write):
    data = load_data(write("d.csv", "text,label\n" + rows(50)))
    assert (len(data.train), len(data.validation), len(data.test)) == (40, 5, 5)
    assert data.source.endswith("d.csv")
    assert data.card["sources"]["train"].endswith("d.csv")


def test_split_files_replace_path(write):
    train = write("train.csv", "text,label\n" + rows(40))
    test = write("test.tsv", "text\tlabel\nsample text 0\tneg\nnew one\tpos\n")
    with pytest.warns(DataWarning, match="removed 1 training rows"):
        data = load_data("ignored.csv", train=train, test=test, val_frac=0.25)
    assert data.test["text"].tolist() == ["sample text 0", "new one"]
    assert "sample text 0" not in set(data.train["text"])  # leaked row removed from train
    assert len(data.validation) == 10
    assert data.card["split"]["method"]["test"] == "given"


def test_path_used_as_train_with_given_test(write):
    data = load_data(
        write("pool.csv", "text,label\n" + rows(30)), test=write("t.csv", "text,label\nzzz,pos\n")
    )
    assert data.test["text"].tolist() == ["zzz"] and len(data.validation) == 3


def test_limit_caps_splits(write):
    data = load_data(write("d.csv", "text,label\n" + rows(200)), limit=20, seed=3)
    assert (len(data.train), len(data.validation), len(data.test)) == (20, 5, 5)
    assert set(data.train["label"]) == {"pos", "neg"}
    assert data.card["limit"]["rows_before"] == {"train": 160, "validation": 20, "test": 20}
    assert data.card["rows"]["train"] == 20
    full = load_data(write("d.csv", "text,label\n" + rows(200)), seed=3)
    assert data.fingerprints["train"] != full.fingerprints["train"]
    with pytest.raises(ConfigError, match="positive integer"):
        load_data(write("d.csv", "text,label\n" + rows(20)), limit=0)


def test_spec_mapping_and_dataclass(write):
    path = write("d.jsonl", "".join(f'{{"t": "x{i}", "y": {i % 2}}}\n' for i in range(20)))
    data = load_data({"path": path, "text_column": "t", "label_column": "y", "seed": 1})
    assert data.labels == ["0", "1"]

    @dataclasses.dataclass
    class Spec:
        path: object = None
        text_column: str = "t"
        label_column: str = "y"

    assert (
        load_data(Spec(path=path)).fingerprints
        == load_data(path, text_column="t", label_column="y").fingerprints
    )
    with pytest.raises(ConfigError, match="unknown data option.*colour"):
        load_data({"path": path, "colour": "red"})


def test_builtin_name(tmp_path, monkeypatch, make_vader):
    fake = types.ModuleType("lmloop.assets")
    fake.vader_dir = lambda: make_vader(tmp_path / "v", n=40)
    monkeypatch.setitem(sys.modules, "lmloop.assets", fake)
    assert len(load_data("vader-sentiment").train) == 96
    assert len(load_data("vader-sentiment", limit=8).test) == 2


def test_missing_path_mentions_builtins(tmp_path):
    with pytest.raises(DataError, match=r"missing\.csv: train data: file or directory not found \(built-in"):
        load_data(tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match="no data given"):
        load_data()

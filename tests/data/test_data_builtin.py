from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from lmloop.data import BUILTIN_DATASETS, load_builtin, read_vader
from lmloop.data.builtin import VADER_FILES
from lmloop.errors import DataError


@pytest.fixture(scope="module")
def real_vader() -> Path:
    """The real VADER files, fetched and sha256-verified by lmloop.assets (cached under $LMLOOP_HOME)."""
    from lmloop.assets import vader_dir

    return vader_dir()


def test_read_vader_binarises_and_locates(tmp_path, make_vader):
    df = read_vader(make_vader(tmp_path / "v"))
    assert set(df["domain"]) == {"tweets", "movies", "amazon", "nyt"}
    per_domain = df.groupby("domain")["label"].value_counts().unstack()
    assert (per_domain["positive"] == 10).all() and (per_domain["negative"] == 5).all()  # neutral 0.2 dropped
    tweets = df[df["domain"] == "tweets"]
    assert tweets["_row"].tolist()[:3] == [1, 3, 4]  # line 2 (valence 0.2) dropped
    assert tweets["_source"].iloc[0].endswith("tweets_GroundTruth.txt")
    assert not df["text"].str.contains("\r").any()
    assert len(read_vader(tmp_path / "v", keep_neutral=True)) == 80


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("7\t1.5", "expected 3 tab-separated fields"),
        ("7\tabc\tsome text", "field 'valence': expected a valence number from -4 to 4, found 'abc'"),
        ("7\t9.0\tsome text", "found '9.0'"),
        ("7\t1.0\t   ", "field 'text': empty text"),
    ],
)
def test_malformed_vader_line_names_file_and_line(tmp_path, bad_line, expected, make_vader):
    content = "1\t1.0\tfine\r\n2\t-1.0\talso fine\r\n" + bad_line + "\r\n"
    directory = make_vader(tmp_path / "v", override={"movies": content})
    with pytest.raises(DataError) as info:
        read_vader(directory)
    assert "movieReviewSnippets_GroundTruth.txt, line 3" in str(info.value)
    assert expected in str(info.value)


def test_missing_vader_file(tmp_path, make_vader):
    directory = make_vader(tmp_path / "v")
    (directory / VADER_FILES["nyt"]).unlink()
    with pytest.raises(DataError, match="missing nytEditorialSnippets_GroundTruth.txt"):
        read_vader(directory)


def test_load_builtin_uses_assets(tmp_path, monkeypatch, make_vader):
    directory = make_vader(tmp_path / "v", n=40)
    fake = types.ModuleType("lmloop.assets")
    fake.vader_dir = lambda: directory
    monkeypatch.setitem(sys.modules, "lmloop.assets", fake)
    data = load_builtin("vader-sentiment")
    assert data.labels == ["negative", "positive"]
    assert (len(data.train), len(data.validation), len(data.test)) == (96, 12, 12)
    assert set(data.test["domain"]) == {"tweets", "movies", "amazon", "nyt"}
    assert data.card["builtin"]["name"] == "vader-sentiment"
    assert load_builtin("vader-sentiment").fingerprints == data.fingerprints


def test_unknown_builtin():
    with pytest.raises(DataError, match="available: vader-sentiment"):
        load_builtin("nope")
    assert "vader-sentiment" in BUILTIN_DATASETS


def test_real_vader_counts(real_vader):
    df = read_vader(real_vader)
    counts = {d: (len(g), int((g["label"] == "positive").sum())) for d, g in df.groupby("domain")}
    assert counts == {
        "tweets": (3432, 2345),
        "movies": (10072, 4996),
        "amazon": (2985, 1750),
        "nyt": (2970, 1187),
    }


def test_real_vader_documented_split(real_vader):
    data = load_builtin("vader-sentiment")
    assert [len(df) for df in data.splits().values()] == [15462, 1933, 1933]  # as in the module docstring
    assert data.test.groupby("domain").size().to_dict() == {
        "amazon": 296,
        "movies": 1007,
        "nyt": 293,
        "tweets": 337,
    }
    assert data.fingerprint == "0496ee6402c5fffa"

from __future__ import annotations

import json

import pandas as pd
import pytest

from lmloop.data import DataWarning, detect_format, load_labeled
from lmloop.errors import DataError

CSV = "text,label\ngood film,1\nbad film,0\n"


# ---------------------------------------------------------------- formats


def test_csv_rows_are_file_lines_and_labels_strings(write):
    path = write("d.csv", 'text,label\n"a ""quoted""\nmulti-line text",1\nplain,0\n')
    df = load_labeled(path)
    assert list(df.columns) == ["text", "label", "_row", "_source"]
    assert df["text"].tolist() == ['a "quoted"\nmulti-line text', "plain"]
    assert df["label"].tolist() == ["1", "0"]
    # header is line 1, the quoted record covers lines 2-3, so "plain" is on line 4
    assert df["_row"].tolist() == [2, 4]
    assert df["_source"].tolist() == [str(path)] * 2


def test_csv_crlf_bom_and_blank_lines(write):
    path = write("d.csv", "\ufefftext,label\r\n\r\nx,a\r\ny,b\r\n")
    df = load_labeled(path)
    assert df["text"].tolist() == ["x", "y"]
    assert df["_row"].tolist() == [3, 4]


def test_tsv(write):
    df = load_labeled(write("d.tsv", "id\ttext\tlabel\n1\thello, world\tpos\n2\tbye\tneg\n"))
    assert df["text"].tolist() == ["hello, world", "bye"]
    assert df["label"].tolist() == ["pos", "neg"]


def test_jsonl_labels_and_lines(write):
    path = write("d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0.0, "extra": [1]}\n')
    df = load_labeled(path)
    assert df["label"].tolist() == ["1", "0"]
    assert df["_row"].tolist() == [1, 3]


def test_json_lines_and_json_array(write):
    assert load_labeled(write("a.json", '{"text": "a", "label": "x"}\n'))["text"].tolist() == ["a"]
    arr = '[\n  {"text": "a", "label": "x"},\n  {"text": "b",\n   "label": "y"}\n]\n'
    df = load_labeled(write("b.json", arr))
    assert df["label"].tolist() == ["x", "y"]
    assert df["_row"].tolist() == [2, 3]


def test_parquet_int_labels_and_domain(tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame({"review": ["a", "b", "c"], "stars": [1, 0, 1], "domain": ["x", "y", "x"]}).to_parquet(path)
    df = load_labeled(path, text_column="review", label_column="stars")
    assert df["label"].tolist() == ["1", "0", "1"]
    assert df["domain"].tolist() == ["x", "y", "x"]
    assert df["_row"].tolist() == [1, 2, 3]


def test_domain_column_option_renamed(write):
    df = load_labeled(write("d.csv", "text,label,src\na,x,web\nb,y,news\n"), domain_column="src")
    assert df["domain"].tolist() == ["web", "news"]


def test_hf_dataset_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).save_to_disk(str(path))
    assert detect_format(path) == "hf"
    df = load_labeled(path)
    assert df["label"].tolist() == ["0", "1"]
    assert "split" not in df.columns
    assert df["_row"].tolist() == [1, 2]


def test_hf_datasetdict_splits_classlabel_and_unknown_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )

    def ds(texts, labels):
        return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)

    dd = datasets.DatasetDict(
        {
            "train": ds(["a", "b"], [0, 1]),
            "valid": ds(["c"], [1]),
            "test": ds(["d"], [0]),
            "extra": ds(["e"], [0]),
        }
    )
    path = tmp_path / "dd"
    dd.save_to_disk(str(path))
    with pytest.warns(DataWarning, match="ignoring split 'extra'"):
        df = load_labeled(path)
    assert df["split"].tolist() == ["train", "train", "validation", "test"]
    assert df["label"].tolist() == ["neg", "pos", "pos", "neg"]
    assert df["_row"].tolist() == [1, 2, 1, 1]


def test_folder_tree_and_split_folders(write, tmp_path):
    write("f/pos/1.txt", "great\n")
    write("f/pos/sub/2.txt", "fine")
    write("f/neg/1.txt", "awful")
    write("f/neg/.hidden", "ignored")
    write("f/README", "a loose file at the top is ignored")
    df = load_labeled(tmp_path / "f")
    assert sorted(zip(df["label"], df["text"], strict=True)) == [
        ("neg", "awful"),
        ("pos", "fine"),
        ("pos", "great"),
    ]
    assert df["_source"].str.endswith(".txt").all()
    assert df["_row"].isna().all()

    write("s/train/a/1.txt", "one")
    write("s/train/b/1.txt", "two")
    write("s/test/a/1.txt", "three")
    df = load_labeled(tmp_path / "s")
    assert df.sort_values("text")["split"].tolist() == ["train", "test", "train"]  # one, three, two


def test_split_column_normalised(write):
    df = load_labeled(write("d.csv", "text,label,split\na,x,Train\nb,y,dev\nc,x,VAL\nd,y,test\n"))
    assert df["split"].tolist() == ["train", "validation", "validation", "test"]


def test_auto_detection(write, tmp_path):
    assert detect_format(write("a.CSV", CSV)) == "csv"
    assert detect_format(write("a.tsv", CSV)) == "tsv"
    assert detect_format(write("a.jsonl", "{}")) == "jsonl"
    assert detect_format(write("a.parquet", b"x")) == "parquet"
    (tmp_path / "plain").mkdir()
    assert detect_format(tmp_path / "plain") == "folder"
    write("hf/dataset_dict.json", "{}")
    assert detect_format(tmp_path / "hf") == "hf"


# ---------------------------------------------------------------- bad input


def _error(path, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_labeled(path, **kw)
    return str(info.value)


def test_missing_file_and_unknown_suffix(tmp_path, write):
    msg = _error(tmp_path / "nope.csv")
    assert "nope.csv" in msg and "not found" in msg
    msg = _error(write("d.txt", CSV))
    assert "d.txt" in msg and "'.txt'" in msg and "--format" in msg
    assert "expects a directory" in _error(write("d2.csv", CSV), fmt="hf")


def test_empty_file_and_header_only(write):
    assert "d.csv: the file is empty" in _error(write("d.csv", ""))
    assert "the file is empty" in _error(write("e.jsonl", "\n  \n"))
    msg = _error(write("h.csv", "text,label\n"))
    assert "h.csv, line 1" in msg and "no data rows" in msg


def test_missing_columns_are_listed(write):
    msg = _error(write("d.csv", "Text,sentiment\na,1\n"))
    assert "field 'text'" in msg
    assert "columns found: Text, sentiment" in msg
    assert "--text-column" in msg and "did you mean 'Text'" in msg
    msg = _error(write("e.csv", "text,sentiment\na,1\n"))
    assert "field 'label'" in msg and "--label-column" in msg and "columns found: text, sentiment" in msg
    assert "--domain-column" in _error(write("f.csv", CSV), domain_column="site")


def test_empty_text_and_missing_label_name_line(write):
    path = write("d.csv", "text,label\na,1\n   ,0\n")
    msg = _error(path)
    assert msg.startswith(f"{path}, line 3, field 'text':")
    assert "empty text" in msg
    msg = _error(write("e.csv", "text,label\na,1\nb,\n"))
    assert "line 3, field 'label'" in msg and "missing label" in msg
    msg = _error(write("f.jsonl", '{"text": "a", "label": 1}\n{"text": null, "label": 1}\n'))
    assert "line 2, field 'text'" in msg and "missing text" in msg
    msg = _error(write("g.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n'))
    assert "line 2, field 'label'" in msg


def test_nan_text_in_parquet_names_row(tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["a", None, "c"], "label": [1.0, 0.0, None]}).to_parquet(path)
    msg = _error(path)
    assert "d.parquet, row 2, field 'text'" in msg and "missing text" in msg


def test_unbalanced_quote_hint(write):
    msg = _error(write("d.csv", 'text,label\n"oops,1\nnext,0\n'))
    assert "line 2" in msg and "unbalanced double quote" in msg


def test_non_utf8_names_line_and_column(write):
    data = b"text,label\n" + b"ok,1\n" * 15 + "caf\u00e9 na\u00efve ".encode() + b"\xff,0\n"
    msg = _error(write("d.csv", data))
    assert "d.csv, line 17, column 12: invalid UTF-8 byte 0xff; re-save the file as UTF-8" in msg
    assert "UTF-16" in _error(write("u.csv", "text,label\na,1\n".encode("utf-16")))


def test_malformed_json_line(write):
    msg = _error(write("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b" "label": 1}\n'))
    assert "d.jsonl, line 2, column 14: malformed JSON" in msg and "delimiter" in msg
    assert "line 1" in _error(write("e.jsonl", "[1, 2]\n")) and "expected a JSON object" in _error(
        write("e.jsonl", "[1]")
    )


def test_extra_csv_fields(write):
    msg = _error(write("d.csv", "text,label\nhello, world,1\n"))
    assert "line 2" in msg and "expected 2 fields" in msg and "double quotes" in msg


def test_unknown_split_value_names_row(write):
    msg = _error(write("d.csv", "text,label,split\na,x,train\nb,y,holdout\n"))
    assert "line 3, field 'split'" in msg and "'holdout'" in msg


def test_unreadable_parquet_and_hf(write, tmp_path):
    msg = _error(write("d.parquet", b"not parquet at all"))
    assert "d.parquet" in msg and "Parquet" in msg
    write("hf/dataset_info.json", "{broken")
    msg = _error(tmp_path / "hf")
    assert str(tmp_path / "hf") in msg and "save_to_disk" in msg


def test_empty_directory_says_what_is_expected(tmp_path):
    (tmp_path / "empty" / "pos").mkdir(parents=True)
    msg = _error(tmp_path / "empty")
    assert "no usable data" in msg and "one sub-folder per label" in msg


def test_folder_empty_file_names_file(write, tmp_path):
    write("f/pos/1.txt", "good")
    write("f/neg/1.txt", "  \n")
    msg = _error(tmp_path / "f")
    assert str(tmp_path / "f" / "neg" / "1.txt") in msg and "empty text" in msg


# ---------------------------------------------------------------- truncation


def test_long_text_truncated_with_warning(write):
    path = write(
        "d.jsonl", "\n".join(json.dumps({"text": t, "label": "a"}) for t in ["short", "x" * 50]) + "\n"
    )
    with pytest.warns(DataWarning, match=r"1 text\(s\) longer than 10 characters truncated \(line 2\)"):
        df = load_labeled(path, max_chars=10)
    assert df["text"].tolist() == ["short", "x" * 10]

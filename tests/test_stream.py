"""Streaming tables for batch prediction (:mod:`lmloop.infer.stream`): round trips through every format
across chunk boundaries, ids, located errors, atomic output, and constant memory."""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import tracemalloc

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmloop.data._util import DataWarning
from lmloop.errors import ConfigError, DataError
from lmloop.infer.stream import ChunkWriter, count_rows, detect_format, read_chunks

# Texts that break naive readers: delimiters, quotes, newlines, NA-like words, empty, non-ASCII.
TEXTS = [
    "plain text",
    "with, a comma",
    'with "quotes" inside',
    "two\nlines",
    "a\ttab",
    "NA",
    "null",
    "",
    "héllo wörld ✓",
    "None",
]
IDS = ["007", "a-1", "3", "0", "x y", "10", "0010", "id,comma", "-1", "1e3"]
SUFFIXES = ["csv", "tsv", "jsonl", "parquet", "csv.gz", "tsv.gz", "jsonl.gz"]


def _fmt(suffix: str) -> str:
    return suffix.split(".")[0]


def _write_input(path, rows: list[dict], fmt: str | None = None) -> None:
    """Write ``rows`` with the standard libraries (not with ChunkWriter, which is under test)."""
    fmt = fmt or detect_format(path)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
        return
    buf = io.StringIO(newline="")
    if fmt == "jsonl":
        for row in rows:
            buf.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
        w.writeheader()
        w.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    path.write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)


def _read_all(path, **kw) -> tuple[pd.DataFrame, list[int]]:
    chunks = list(read_chunks(path, **kw))
    if not chunks:
        return pd.DataFrame(), []
    return pd.concat(chunks), [len(c) for c in chunks]


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("a.csv", "csv"),
        ("a.CSV", "csv"),
        ("a.tsv", "tsv"),
        ("a.tab", "tsv"),
        ("a.jsonl", "jsonl"),
        ("a.ndjson", "jsonl"),
        ("a.json-lines", "jsonl"),
        ("a.parquet", "parquet"),
        ("a.pq", "parquet"),
        ("a.csv.gz", "csv"),
        ("a.jsonl.gz", "jsonl"),
        ("dir.v2/a.tsv.gz", "tsv"),
    ],
)
def test_detect_format_from_suffix(name, fmt):
    assert detect_format(name) == fmt


def test_detect_format_explicit_wins_and_accepts_aliases():
    assert detect_format("data.txt", "CSV") == "csv"
    assert detect_format("data.json", "ndjson") == "jsonl"
    assert detect_format("data.csv", "parquet") == "parquet"
    with pytest.raises(ConfigError, match="--input-format: unknown format 'xlsx'"):
        detect_format("data.csv", "xlsx")


@pytest.mark.parametrize("name", ["data.txt", "data", "data.gz", "data.json", "data.parquet.gz"])
def test_unknown_suffix_lists_the_accepted_ones(name):
    with pytest.raises(DataError) as ei:
        detect_format(name)
    msg = str(ei.value)
    assert msg.startswith(name)
    if name.endswith("parquet.gz"):
        assert "drop the .gz" in msg
        return
    assert ".csv" in msg and ".jsonl" in msg and ".parquet" in msg and "--input-format" in msg
    if name == "data.json":
        assert "JSON array cannot be streamed" in msg
    with pytest.raises(DataError, match="--output-format"):
        detect_format(name, option="--output-format")


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_across_chunk_boundaries(tmp_path, suffix):
    rows = [{"id": i, "text": t, "other": f"o{n}"} for n, (i, t) in enumerate(zip(IDS, TEXTS, strict=True))]
    src = tmp_path / f"in.{suffix}"
    _write_input(src, rows)

    chunks = list(read_chunks(src, chunk_rows=3))
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    df = pd.concat(chunks)
    assert list(df.columns) == ["id", "text", "other"]
    assert df["id"].tolist() == IDS  # strings as given: "007" keeps its zeros, "1e3" is no number
    assert df["text"].tolist() == TEXTS  # "NA", "null", "" and "None" stay texts
    assert df["other"].tolist() == [f"o{n}" for n in range(10)]
    assert list(df.index) == list(range(10))

    # the writer's half: same format, predictions added, read back through the reader
    dst = tmp_path / f"out.{suffix}"
    scores = [0.1 + n / 3 for n in range(10)]
    with ChunkWriter(dst) as w:
        for c in chunks:
            c = c.copy()
            c["label"] = ["pos" if s > 1 else "neg" for s in scores[c.index[0] : c.index[-1] + 1]]
            c["score"] = scores[c.index[0] : c.index[-1] + 1]
            w.write(c)
    assert w.rows == 10
    back, sizes = _read_all(dst, chunk_rows=4)
    assert sizes == [4, 4, 2]
    assert back["id"].tolist() == IDS and back["text"].tolist() == TEXTS
    assert list(back.columns) == ["id", "text", "other", "label", "score"]
    assert [float(s) for s in back["score"]] == scores  # full float precision in every format
    assert not list(tmp_path.glob(".*.tmp"))


def test_jsonl_output_is_one_object_per_line_with_json_numbers(tmp_path):
    dst = tmp_path / "out.jsonl"
    with ChunkWriter(dst) as w:
        w.write(
            pd.DataFrame({"id": ["007"], "text": ["ünï"], "score": [0.25], "n": [3], "x": [float("nan")]})
        )
    line = dst.read_text(encoding="utf-8")
    assert line == '{"id": "007", "text": "ünï", "score": 0.25, "n": 3, "x": null}\n'


def test_generated_ids_are_global_row_numbers_first(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("text,label\n" + "".join(f"t{i},x\n" for i in range(10)))
    chunks = list(read_chunks(src, chunk_rows=4))
    assert [c["id"].tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(chunks[0].columns) == ["id", "text", "label"]
    # JSONL counts records, not lines (blank lines are skipped)
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\n')
    df, _ = _read_all(src, chunk_rows=2)
    assert df["id"].tolist() == [0, 1, 2]


def test_given_ids_of_other_types_become_strings(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"id": 7, "text": "a"}\n{"id": "007", "text": "b"}\n{"text": "c"}\n{"id": true, "text": 5}\n'
    )
    df, _ = _read_all(src, chunk_rows=3)
    assert df["id"].tolist() == ["7", "007", "", "True"]
    assert df["text"].tolist() == ["a", "b", "c", "5"]
    # parquet ints with gaps stay ints ("2", not "2.0")
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"doc": [1, None, 3], "body": ["a", "b", "c"]}), src)
    df, _ = _read_all(src, text_column="body", id_column="doc")
    assert df["doc"].tolist() == ["1", "", "3"]


def test_jsonl_keys_missing_from_some_records(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n{"text": "b", "extra": 1}\n{"text": "c"}\n')
    chunks = list(read_chunks(src, chunk_rows=2))
    assert list(chunks[0].columns) == ["id", "text", "extra"]
    assert list(chunks[1].columns) == ["id", "text", "extra"]  # later chunks keep earlier keys


# ---------------------------------------------------------------- located errors


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl", "parquet"])
def test_missing_text_column_names_columns_and_option(tmp_path, suffix):
    src = tmp_path / f"in.{suffix}"
    _write_input(src, [{"id": "1", "Text": "a"}])
    with pytest.raises(DataError) as ei:
        next(read_chunks(src))  # the first chunk fails, before any model work
    msg = str(ei.value)
    assert msg.startswith(str(src))
    assert "no text column 'text'" in msg and "columns found: id, Text" in msg
    assert "did you mean 'Text'" in msg and "--text-column" in msg


def test_missing_text_column_fails_even_without_rows(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("id,body\n")
    with pytest.raises(DataError, match="columns found: id, body"):
        list(read_chunks(src))


@pytest.mark.parametrize("delimiter, suffix", [(",", "csv"), ("\t", "tsv")])
def test_csv_missing_text_names_the_physical_line(tmp_path, delimiter, suffix):
    src = tmp_path / f"in.{suffix}"
    d = delimiter
    # line 1 header, lines 2-4 one record with a quoted multi-line text, line 5 blank, line 6 a short row
    src.write_text(f'id{d}text\n1{d}"first\nsecond\nthird"\n\n2\n3{d}ok\n')
    chunks = read_chunks(src, chunk_rows=1)
    assert next(chunks)["text"].tolist() == ["first\nsecond\nthird"]
    with pytest.raises(DataError) as ei:
        next(chunks)
    assert ei.value.line == 6 and ei.value.field == "text"
    assert str(ei.value).startswith(f"{src}, line 6, field 'text': missing text")


def test_jsonl_missing_or_null_text_names_the_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": null}\n')
    with pytest.raises(DataError, match=r"in\.jsonl, line 4, field 'text': missing text"):
        list(read_chunks(src, chunk_rows=2))
    src.write_text('{"text": "a"}\n{"id": 1}\n')
    with pytest.raises(DataError, match=r"line 2, field 'text': missing text"):
        list(read_chunks(src))
    src.write_text('{"text": ["a", "list"]}\n')
    with pytest.raises(DataError, match=r"line 1, field 'text': expected a text string, found list"):
        list(read_chunks(src))


def test_parquet_null_text_names_the_row(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c", None, "e"]}), src)
    with pytest.raises(DataError) as ei:
        list(read_chunks(src, chunk_rows=2))
    assert str(ei.value).startswith(f"{src}, row 4, field 'text': missing text")
    assert ei.value.line == 4


def test_non_string_texts_are_converted(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": [1, 22, 333]}), src)
    df, _ = _read_all(src)
    assert df["text"].tolist() == ["1", "22", "333"]


def test_bad_json_line_names_line_and_column(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n\n{"text": "b",, "id": 1}\n')
    with pytest.raises(DataError) as ei:
        list(read_chunks(src))
    assert str(ei.value).startswith(f"{src}, line 3, column 14: malformed JSON")


@pytest.mark.parametrize("line, found", [("[1, 2]", "an array"), ('"text"', "a string"), ("3", "a number")])
def test_non_object_json_line(tmp_path, line, found):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"line 2: expected a JSON object .* found {found}"):
        list(read_chunks(src))


def test_malformed_csv_names_the_line(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text('id,text\n1,a\n2,"never closed\n3,c\n4,d\n')
    with pytest.raises(DataError, match=r"line 3: a double quote opened here is never closed, so lines 3-5"):
        list(read_chunks(src))
    src.write_text("id,text\n1,a\n2,b,c\n")
    with pytest.raises(DataError, match=r"line 3: expected 2 fields \(id, text\) but found 3"):
        list(read_chunks(src))
    src.write_bytes(b"id,text\r1,a\r")
    with pytest.raises(DataError, match=r"line 1: cannot parse the CSV: .*bare carriage return"):
        list(read_chunks(src))
    src.write_text("id,text\n1,a,\n")  # a trailing empty field is tolerated, as at training time
    assert _read_all(src)[0]["text"].tolist() == ["a"]


def test_encoding_error_names_line_and_column(tmp_path):
    src = tmp_path / "in.csv"
    src.write_bytes(b"id,text\n1,ok\n2,caf\xc3\xa9 \xff\n")
    with pytest.raises(DataError) as ei:
        list(read_chunks(src))
    assert str(ei.value).startswith(f"{src}, line 3, column 8: invalid UTF-8 byte 0xff")
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "a\xfe"}\n')
    with pytest.raises(DataError, match=r"line 1, column 12: invalid UTF-8 byte 0xfe"):
        list(read_chunks(src))


def test_utf8_bom_is_dropped(tmp_path):
    src = tmp_path / "in.csv"
    src.write_bytes(b"\xef\xbb\xbfid,text\n1,a\n")
    assert list(_read_all(src)[0].columns) == ["id", "text"]


def test_missing_file_fails_at_the_call(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_chunks(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    "suffix, content", [("csv", b"id,text\n"), ("csv", b""), ("jsonl", b"\n\n"), ("tsv", b"")]
)
def test_empty_input_yields_nothing(tmp_path, suffix, content):
    src = tmp_path / f"in.{suffix}"
    src.write_bytes(content)
    assert list(read_chunks(src)) == []


def test_empty_parquet_yields_nothing(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), src)
    assert list(read_chunks(src)) == []


# ---------------------------------------------------------------- writer


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet", "csv.gz"])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_writer_failure_leaves_no_file_and_keeps_an_old_one(tmp_path, suffix, exc):
    dst = tmp_path / f"out.{suffix}"
    chunk = pd.DataFrame({"id": ["1", "2"], "score": [0.5, 0.25]})
    with pytest.raises(exc), ChunkWriter(dst) as w:
        w.write(chunk)
        raise exc()
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind

    dst.write_bytes(b"previous output")
    with pytest.raises(exc), ChunkWriter(dst) as w:
        w.write(chunk)
        w.write(chunk)
        raise exc()
    assert dst.read_bytes() == b"previous output"
    assert list(tmp_path.iterdir()) == [dst]


def test_writer_replaces_an_old_file_only_on_success(tmp_path):
    dst = tmp_path / "out.csv"
    dst.write_text("old\n")
    dst.chmod(0o640)
    w = ChunkWriter(dst)
    w.write(pd.DataFrame({"id": [1], "label": ["a"]}))
    assert dst.read_text() == "old\n"  # nothing visible before close
    w.close()
    assert dst.read_text() == "id,label\n1,a\n"
    assert dst.stat().st_mode & 0o777 == 0o640
    w.abort()  # after close: a no-op
    assert dst.exists()


def test_writer_empty_output_uses_columns_hint(tmp_path):
    with ChunkWriter(tmp_path / "out.csv", columns_hint=["id", "label", "score"]):
        pass
    assert (tmp_path / "out.csv").read_text() == "id,label,score\n"
    with ChunkWriter(tmp_path / "out.parquet", columns_hint=["id", "label"]):
        pass
    assert pq.read_table(tmp_path / "out.parquet").column_names == ["id", "label"]
    with ChunkWriter(tmp_path / "out.jsonl", columns_hint=["id"]):
        pass
    assert (tmp_path / "out.jsonl").read_text() == ""


def test_writer_explicit_format_overrides_suffix(tmp_path):
    with ChunkWriter(tmp_path / "out.txt", fmt="tsv") as w:
        w.write(pd.DataFrame({"id": [1], "text": ["a b"]}))
    assert (tmp_path / "out.txt").read_text() == "id\ttext\n1\ta b\n"


def test_writer_columns_are_fixed_by_the_first_chunk(tmp_path):
    dst = tmp_path / "out.parquet"
    with ChunkWriter(dst) as w:
        w.write(pd.DataFrame({"id": ["1"], "note": [None], "score": [0.5]}))  # note: all-null at first
        with pytest.warns(DataWarning, match="column.s. extra first appear after row 1"):
            w.write(pd.DataFrame({"score": [0.75], "id": ["2"], "extra": [1], "note": ["n"]}))
        w.write(pd.DataFrame({"id": ["3"], "score": [1.0]}))  # a missing column is written empty
    t = pq.read_table(dst)
    assert t.column_names == ["id", "note", "score"]
    assert t.to_pydict() == {"id": ["1", "2", "3"], "note": [None, "n", None], "score": [0.5, 0.75, 1.0]}


def test_writer_parquet_type_clash_is_a_data_error(tmp_path):
    dst = tmp_path / "out.parquet"
    match = r"field 'n': holds (large_)?string values after row 1, but int64 before"
    with pytest.raises(DataError, match=match), ChunkWriter(dst) as w:
        w.write(pd.DataFrame({"n": [1]}))
        w.write(pd.DataFrame({"n": ["x"]}))
    assert not dst.exists()


# ---------------------------------------------------------------- counting and memory


def test_count_rows(tmp_path):
    rows = [{"id": str(i), "text": f"t{i}"} for i in range(7)]
    for suffix in ("csv", "tsv", "jsonl", "parquet"):
        _write_input(tmp_path / f"in.{suffix}", rows)
        assert count_rows(tmp_path / f"in.{suffix}", suffix) == 7, suffix
    (tmp_path / "noeol.jsonl").write_text('{"text": "a"}\n{"text": "b"}')
    assert count_rows(tmp_path / "noeol.jsonl", "jsonl") == 2
    (tmp_path / "empty.csv").write_text("")
    assert count_rows(tmp_path / "empty.csv", "csv") == 0
    _write_input(tmp_path / "in.csv.gz", rows)
    assert count_rows(tmp_path / "in.csv.gz", "csv") is None
    assert count_rows(tmp_path / "missing.parquet", "parquet") is None


def test_streaming_memory_stays_flat(tmp_path):
    """200k rows (~13 MB) read in chunks of 2,000 must peak far below reading the whole file at once."""
    src = tmp_path / "big.csv"
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    n = 200_000
    with open(src, "w", encoding="utf-8") as fh:
        fh.write("id,text,label\n")
        for i in range(n):
            fh.write(f"{i},{' '.join(rng.choices(words, k=10))},x\n")

    tracemalloc.start()
    try:
        whole = pd.read_csv(src, dtype=str, keep_default_na=False)
        whole_peak = tracemalloc.get_traced_memory()[1]
        assert len(whole) == n
        del whole
        tracemalloc.reset_peak()
        rows = 0
        for chunk in read_chunks(src, chunk_rows=2000):
            rows += len(chunk)
        stream_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == n
    assert stream_peak * 5 < whole_peak, (stream_peak, whole_peak)

"""Load a labelled text data set into one validated DataFrame.

Formats: ``csv``, ``tsv``, ``jsonl`` (``.json`` may be JSON lines or a JSON array of objects), ``parquet``,
``hf`` (a ``save_to_disk`` directory holding a Dataset or a DatasetDict) and ``folder`` (one sub-folder per
label, one text file per example; optionally under ``train/``, ``test/``... split folders).

Every problem with the input raises :class:`lmloop.errors.DataError` naming the file, the 1-based line
(text formats), row (parquet/HF) or file (folder), and the field. Text files are checked for UTF-8 up front.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lmloop.data._util import (
    DataWarning,
    data_error,
    is_missing,
    label_to_str,
    normalise_split,
    parse_json_line,
    read_utf8,
)

FORMATS = ("csv", "tsv", "jsonl", "parquet", "hf", "folder")
_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Files `datasets.save_to_disk` writes: Dataset -> dataset_info.json/state.json, DatasetDict -> dataset_dict.json.
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_FOLDER_HINT = (
    "expected one sub-folder per label, each holding one UTF-8 text file per example "
    "(e.g. DIR/positive/0001.txt), or a Hugging Face dataset saved with save_to_disk"
)


@dataclass
class _Table:
    """Raw columns as read, before validation; ``rows[i]`` locates record i (None for folder files)."""

    path: Path
    kind: str  # what rows count: "line", "row" or "file"
    data: dict[str, list] = field(default_factory=dict)
    rows: list[int | None] = field(default_factory=list)
    sources: list[str] | None = None  # per-record file, when not `path` itself
    ends: list[int] | None = None  # last line of a multi-line CSV record
    context: list[str] | None = None  # e.g. "split 'train'" for a DatasetDict

    def __len__(self) -> int:
        return len(self.rows)


def detect_format(path: str | os.PathLike) -> str:
    """Guess the format of ``path``: from the file suffix, or for a directory ``hf`` when it holds
    ``dataset_info.json``/``state.json``/``dataset_dict.json`` and ``folder`` otherwise."""
    p = Path(path)
    if not p.exists():
        raise data_error("file or directory not found", path=p)
    if p.is_dir():
        return "hf" if any((p / m).is_file() for m in _HF_MARKERS) else "folder"
    fmt = _SUFFIX_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise data_error(
            f"cannot tell the format from the suffix '{p.suffix}'; use .csv, .tsv, .jsonl or .parquet, "
            f"or pass --format ({', '.join(FORMATS)})",
            path=p,
        )
    return fmt


def load_labeled(
    path: str | os.PathLike,
    *,
    fmt: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    domain_column: str | None = None,
    max_chars: int | None = 20000,
) -> pd.DataFrame:
    """Read a labelled data set and return a validated frame with columns ``text``, ``label`` (strings),
    ``domain`` (when ``domain_column`` is given or a ``domain`` column exists), ``split`` (when the source
    has one; normalised to train/validation/test), ``_row`` (1-based line for csv/tsv/jsonl with the CSV
    header as line 1, row number for parquet/HF, missing for folder) and ``_source`` (the file). Texts are
    stripped; those longer than ``max_chars`` are truncated with a :class:`DataWarning` naming the lines.
    Raises DataError for anything unusable, naming file, line/row and field."""
    p = Path(path)
    if not p.exists():
        raise data_error("file or directory not found", path=p)
    fmt = detect_format(p) if fmt is None else fmt.strip().lower()
    if fmt not in FORMATS:
        raise data_error(f"unknown format '{fmt}'; expected one of {', '.join(FORMATS)}", path=p)
    if fmt in ("hf", "folder") and not p.is_dir():
        raise data_error(f"format '{fmt}' expects a directory, but this is a file", path=p)
    if fmt not in ("hf", "folder") and p.is_dir():
        raise data_error(f"format '{fmt}' expects a file, but this is a directory", path=p)

    if fmt == "csv":
        table = _read_delimited(p, ",")
    elif fmt == "tsv":
        table = _read_delimited(p, "\t")
    elif fmt == "jsonl":
        table = _read_json(p)
    elif fmt == "parquet":
        table = _read_parquet(p)
    elif fmt == "hf":
        table = _read_hf(p, label_column)
    else:
        table = _read_folder(p)
        text_column, label_column, domain_column = "text", "label", None
    return _finish(table, text_column, label_column, domain_column, max_chars)


# ---------------------------------------------------------------- readers


def _read_delimited(p: Path, delimiter: str) -> _Table:
    text = read_utf8(p)
    if not text.strip():
        raise data_error("the file is empty", path=p)
    name = "CSV" if delimiter == "," else "TSV"
    # newline="" keeps quoted newlines intact, as the csv module requires.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    records: list[list[str]] = []
    starts: list[int] = []
    ends: list[int] = []
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # long texts are truncated later with a warning, not rejected here
    try:
        prev = 0
        for fields in reader:
            start, prev = prev + 1, reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            if header is None:
                header = [h.strip() for h in fields]
                continue
            if len(fields) > len(header) and any(f.strip() for f in fields[len(header) :]):
                sep = "comma" if delimiter == "," else "tab"
                raise data_error(
                    f"expected {len(header)} fields ({', '.join(header)}) but found {len(fields)}; "
                    f"put texts that contain a {sep} in double quotes",
                    path=p,
                    line=start,
                )
            records.append(fields)
            starts.append(start)
            ends.append(prev)
    except csv.Error as e:
        raise data_error(f"cannot parse the {name}: {e}", path=p, line=reader.line_num) from None
    finally:
        csv.field_size_limit(old_limit)
    if header is None:
        raise data_error("the file is empty", path=p)
    if not records:
        raise data_error(f"the file has a header ({', '.join(header)}) but no data rows", path=p, line=1)
    table = _Table(p, "line", rows=starts, ends=ends)
    for j, col in enumerate(header):
        if col not in table.data:  # a repeated header name keeps its first column
            table.data[col] = [r[j] if j < len(r) else None for r in records]
    return table


def _read_json(p: Path) -> _Table:
    text = read_utf8(p)
    if not text.strip():
        raise data_error("the file is empty", path=p)
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        objs, rows = _parse_json_array(p, text)
    else:
        objs, rows = [], []
        # Split on "\n" only: JSON strings may legally hold raw U+2028 etc., which splitlines() would cut.
        for i, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            objs.append(parse_json_line(line, p, i))
            rows.append(i)
    table = _Table(p, "line", rows=rows)
    for obj, row in zip(objs, rows, strict=True):
        if not isinstance(obj, dict):
            raise data_error(f"expected a JSON object, found {type(obj).__name__}", path=p, line=row)
        for key in obj:
            table.data.setdefault(key, [])
    for key, values in table.data.items():
        values.extend(obj.get(key) for obj in objs)
    return table


_WS = re.compile(r"\s*")


def _parse_json_array(p: Path, text: str) -> tuple[list, list[int]]:
    """Parse ``[ {...}, {...} ]`` element by element so each record keeps the line it starts on."""
    dec = json.JSONDecoder()
    objs: list = []
    rows: list[int] = []
    i = _WS.match(text).end() + 1  # past "["
    line, counted = 1, 0

    def line_at(idx: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, idx)
        counted = idx
        return line

    i = _WS.match(text, i).end()
    if text[i : i + 1] == "]":
        raise data_error("the JSON array is empty", path=p, line=line_at(i))
    while True:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise data_error(f"malformed JSON: {e.msg}", path=p, line=e.lineno, column=e.colno) from None
        objs.append(obj)
        rows.append(line_at(i))
        i = _WS.match(text, end).end()
        ch = text[i : i + 1]
        if ch == ",":
            i = _WS.match(text, i + 1).end()
        elif ch == "]":
            break
        else:
            raise data_error(
                "malformed JSON: expected ',' or ']' after an array element", path=p, line=line_at(i)
            )
    return objs, rows


def _read_parquet(p: Path) -> _Table:
    try:
        df = pd.read_parquet(p)
    except Exception as e:  # pyarrow raises many types; all mean "not a readable parquet file"
        raise data_error(
            f"cannot read the file as Parquet ({type(e).__name__}: {e}); expected an Apache Parquet file",
            path=p,
        ) from None
    if len(df) == 0:
        raise data_error(f"the file has no rows (columns: {', '.join(map(str, df.columns))})", path=p)
    return _table_from_frame(p, df)


def _table_from_frame(p: Path, df: pd.DataFrame) -> _Table:
    table = _Table(p, "row", rows=list(range(1, len(df) + 1)))
    for col in df.columns:
        table.data.setdefault(str(col), df[col].tolist())
    return table


def _read_hf(p: Path, label_column: str) -> _Table:
    try:
        import datasets

        obj = datasets.load_from_disk(str(p))
    except Exception as e:  # corrupt arrow files, wrong directory layout, version mismatch...
        raise data_error(
            f"cannot read the Hugging Face dataset ({type(e).__name__}: {e}); "
            "expected a directory written by datasets' save_to_disk",
            path=p,
        ) from None
    parts = list(obj.items()) if isinstance(obj, datasets.DatasetDict) else [(None, obj)]
    tables: list[tuple[str | None, _Table]] = []
    for split_name, ds in parts:
        norm = None
        if split_name is not None:
            norm = normalise_split(split_name)
            if norm is None:
                # e.g. IMDB's "unsupervised" split: no labels, not an evaluation split.
                warnings.warn(
                    f"{p}: ignoring split '{split_name}' (only train/validation/test are used)",
                    DataWarning,
                    stacklevel=3,
                )
                continue
        df = ds.to_pandas()
        feature = ds.features.get(label_column)
        if isinstance(feature, datasets.ClassLabel) and label_column in df.columns:
            # ClassLabel stores ints; the names are what the labels mean. -1 is datasets' "no label".
            df[label_column] = [
                None if is_missing(v) or int(v) < 0 else feature.int2str(int(v)) for v in df[label_column]
            ]
        if norm is not None:
            df["split"] = norm
        tables.append((split_name, _table_from_frame(p, df)))
    if not tables:
        names = ", ".join(name for name, _ in parts)
        raise data_error(f"no train/validation/test split found (splits: {names})", path=p)
    if len(tables) == 1 and tables[0][0] is None:
        return tables[0][1]
    table = _Table(p, "row", context=[])
    for split_name, part in tables:
        for col, values in part.data.items():
            # a column absent from earlier splits is padded with None so rows stay aligned
            table.data.setdefault(col, [None] * len(table)).extend(values)
        for col in table.data:
            if col not in part.data:
                table.data[col].extend([None] * len(part))
        table.rows.extend(part.rows)
        table.context.extend([f"split '{split_name}'"] * len(part))
    return table


def _read_folder(p: Path) -> _Table:
    subdirs = _visible_dirs(p)
    if subdirs and all(normalise_split(d.name) for d in subdirs):
        roots = [(normalise_split(d.name), d) for d in subdirs]  # train/<label>/..., test/<label>/...
    else:
        roots = [(None, p)]
    table = _Table(p, "file", data={"text": [], "label": []}, sources=[])
    if roots[0][0] is not None:
        table.data["split"] = []
    for split, root in roots:
        for label_dir in _visible_dirs(root):
            files = sorted(
                f
                for f in label_dir.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(label_dir).parts)
            )
            for f in files:
                table.data["text"].append(read_utf8(f))
                table.data["label"].append(label_dir.name)
                if split is not None:
                    table.data["split"].append(split)
                table.sources.append(str(f))
                table.rows.append(None)
    if not table.rows:
        raise data_error(f"no usable data in this directory; {_FOLDER_HINT}", path=p)
    return table


def _visible_dirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


# ---------------------------------------------------------------- validation


def _finish(
    table: _Table, text_column: str, label_column: str, domain_column: str | None, max_chars: int | None
) -> pd.DataFrame:
    _require_column(table, text_column, "--text-column")
    _require_column(table, label_column, "--label-column")
    if domain_column is not None:
        _require_column(table, domain_column, "--domain-column")
    elif "domain" in table.data:
        domain_column = "domain"
    has_split = "split" in table.data

    def fail(i: int, message: str, name: str):
        where = table.sources[i] if table.sources else table.path
        ctx = f"{table.context[i]}: " if table.context else ""
        if table.ends and table.ends[i] != table.rows[i]:
            message += (
                f" (this record spans lines {table.rows[i]}-{table.ends[i]}; "
                "an unbalanced double quote may have joined lines)"
            )
        return data_error(ctx + message, path=where, line=table.rows[i], kind=table.kind, field=name)

    n = len(table)
    texts, labels, domains, splits = [], [], [], []
    truncated: list[int] = []
    raw_texts = table.data[text_column]
    raw_labels = table.data[label_column]
    for i in range(n):
        value = raw_texts[i]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not is_missing(value):
            value = str(value)  # a numeric "text" is odd but usable
        if is_missing(value):
            raise fail(i, "missing text; every example needs a non-empty text", text_column)
        if not isinstance(value, str):
            raise fail(i, f"expected a text string, found {type(value).__name__}", text_column)
        value = value.strip()
        if not value:
            raise fail(i, "empty text; every example needs a non-empty text", text_column)
        if max_chars and len(value) > max_chars:
            value = value[:max_chars]
            truncated.append(i)
        texts.append(value)
        labels.append(_cell(raw_labels[i], i, label_column, "label", fail))
        if domain_column is not None:
            domains.append(_cell(table.data[domain_column][i], i, domain_column, "domain", fail))
        if has_split:
            raw = table.data["split"][i]
            split = normalise_split(raw)
            if split is None:
                raise fail(
                    i,
                    f"unknown split {raw!r}; expected train, validation or test (also accepted: valid, val, dev)",
                    "split",
                )
            splits.append(split)
    if truncated:
        _warn_truncated(table, truncated, max_chars)

    out: dict[str, object] = {"text": texts, "label": labels}
    if domain_column is not None:
        out["domain"] = domains
    if has_split:
        out["split"] = splits
    out["_row"] = pd.array(table.rows, dtype="Int64")
    out["_source"] = table.sources if table.sources else [str(table.path)] * n
    return pd.DataFrame(out)


def _cell(value: object, i: int, column: str, what: str, fail) -> str:
    if isinstance(value, (list, dict)):
        raise fail(i, f"expected a string or number {what}, found {type(value).__name__}", column)
    text = label_to_str(value)
    if text is None:
        raise fail(i, f"missing {what}; every example needs one", column)
    return text


def _require_column(table: _Table, name: str, option: str) -> None:
    if name in table.data:
        return
    found = list(table.data)
    close = difflib.get_close_matches(name, found, n=1, cutoff=0.6) or [
        c for c in found if c.lower() == name.lower()
    ]
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise data_error(
        f"no column '{name}' (columns found: {', '.join(found) or 'none'}); "
        f"{hint}pass {option} NAME to choose the column",
        path=table.path,
        field=name,
    )


def _warn_truncated(table: _Table, idx: list[int], max_chars: int) -> None:
    if table.kind == "file":
        where = ", ".join(table.sources[i] for i in idx[:5])
    else:
        where = f"{table.kind} " + ", ".join(str(table.rows[i]) for i in idx[:10])
    more = " ..." if len(idx) > (5 if table.kind == "file" else 10) else ""
    warnings.warn(
        f"{table.path}: {len(idx)} text(s) longer than {max_chars} characters truncated ({where}{more})",
        DataWarning,
        stacklevel=4,
    )

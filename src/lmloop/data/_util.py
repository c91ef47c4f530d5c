"""Shared helpers for the data layer: located errors, strict UTF-8 decoding, label/split normalisation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from lmloop.errors import DataError

# Names users give their evaluation splits, mapped onto the three splits lmloop knows.
SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}
SPLITS = ("train", "validation", "test")


class DataWarning(UserWarning):
    """Input data was usable but altered (e.g. a text truncated); the CLI shows it as a warning."""


def data_error(
    message: str,
    *,
    path: str | os.PathLike | None = None,
    line: int | None = None,
    kind: str = "line",
    column: int | None = None,
    field: str | None = None,
) -> DataError:
    """Build a :class:`DataError` whose message starts with the location, e.g. ``f.csv, line 3, field 'text'``.

    ``kind`` names what ``line`` counts ("line" in text files, "row" in parquet/HF data, "record" in a
    JSON array); ``column`` is a 1-based character column inside that line. The structured attributes
    ``path``/``line``/``field`` are set whatever the kind, so callers can inspect them.
    """
    return DataError(message, path=path, line=line, field=field, kind=kind, column=column)


def decode_utf8(data: bytes, path: str | os.PathLike) -> str:
    """Decode ``data`` as UTF-8 (a leading BOM is dropped) or raise a DataError naming line and column.

    The whole buffer is decoded in one C call (fast for 100 MB); only on failure is the offending line
    located, so the error can say exactly where to look.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise data_error("the file is UTF-16 encoded; re-save it as UTF-8", path=path, line=1)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line_no = data.count(b"\n", 0, e.start) + 1
        # Column in characters, as an editor shows it; the bytes before the error are valid UTF-8.
        column = len(data[line_start : e.start].decode("utf-8")) + 1
        raise data_error(
            f"invalid UTF-8 byte 0x{data[e.start]:02x}; re-save the file as UTF-8",
            path=path,
            line=line_no,
            column=column,
        ) from None


def read_utf8(path: Path) -> str:
    """Read a whole text file strictly as UTF-8, with located errors for bad bytes."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise data_error(f"cannot read the file: {e.strerror or e}", path=path) from None
    return decode_utf8(data, path)


def is_missing(value: object) -> bool:
    """True for None, NaN and pandas' NA/NaT (anything a reader uses for 'no value')."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, (float, np.floating)):
        return bool(np.isnan(value))
    return False


def label_to_str(value: object) -> str | None:
    """Turn a label cell into its string form, or None when missing/blank.

    Integral floats (``1.0``, as pandas makes of an int column with gaps) become ``"1"`` so labels from
    CSV, parquet and JSON agree; booleans and other scalars use ``str``.
    """
    if is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif hasattr(value, "item") and not isinstance(value, (str, bytes)):
        # numpy scalars: go through the Python value so 1.0 -> "1" as above
        return label_to_str(value.item())
    text = str(value).strip()
    return text or None


def normalise_split(value: object) -> str | None:
    """Map a split name (case-insensitive, aliases like ``dev``/``val``) to train/validation/test, else None."""
    if not isinstance(value, str):
        return None
    return SPLIT_ALIASES.get(value.strip().lower())


def sort_labels(labels) -> list[str]:
    """Sort label strings; numerically when they are all integers (so "10" follows "9")."""
    labels = sorted(set(labels))
    if labels and all(_is_int(x) for x in labels):
        return sorted(labels, key=int)
    return labels


def _is_int(text: str) -> bool:
    t = text[1:] if text[:1] in "+-" else text
    return t.isdigit() and t.isascii()


def parse_json_line(line: str, path: str | os.PathLike, lineno: int):
    """One JSON Lines record (any JSON value); a syntax error names the file, the line and the column.

    Shared by every JSONL reader: training data, batch prediction and pretraining corpora."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise data_error(
            f"malformed JSON: {e.msg}; each line must hold one complete JSON object",
            path=path,
            line=lineno,
            column=e.colno,
        ) from None

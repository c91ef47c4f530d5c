"""Stream tables of texts in and predictions out in constant memory, for ``lmloop predict``.

:func:`read_chunks` yields CSV/TSV/JSONL/Parquet inputs (CSV/TSV/JSONL may be gzip-compressed) as
DataFrames of ``chunk_rows`` rows, in input order, each with an id column; :class:`ChunkWriter` appends
such frames to a temp file next to the output and renames it onto the output only when everything went
well, so a failed or interrupted run never leaves a half-written file and never clobbers an old one.

CSV/TSV are parsed with the ``csv`` module line by line, not ``pandas.read_csv``: only that gives the
physical line of every record (multi-line quoted texts included), tells a short row (a missing text) from
an empty cell, and reads exactly as :func:`lmloop.data.load.load_labeled` does at training time (header
names stripped, blank lines skipped, trailing empty extra fields tolerated). Every cell stays a string:
``NA``, ``null`` and empty texts are texts. Problems raise :class:`lmloop.errors.DataError` naming the
file, the line (CSV/TSV: the record's first physical line, the header being line 1; JSONL: the line;
Parquet: the 1-based row, ``kind="row"``) and the field.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import gzip
import io
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from lmloop.data._util import DataWarning, is_missing, parse_json_line
from lmloop.errors import ConfigError, DataError
from lmloop.fsutil import fsync_dir

FORMATS = ("csv", "tsv", "jsonl", "parquet")
_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json-lines": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_ALIASES = {"ndjson": "jsonl", "json-lines": "jsonl", "jsonlines": "jsonl", "pq": "parquet", "tab": "tsv"}
_DELIMITERS = {"csv": ",", "tsv": "\t"}
_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"


def detect_format(
    path: str | os.PathLike, explicit: str | None = None, *, option: str = "--input-format"
) -> str:
    """The table format of ``path``: ``explicit`` when given (``csv``, ``tsv``, ``jsonl``, ``parquet`` or an
    alias such as ``ndjson``), else from the suffix; a ``.gz`` suffix is looked through (``x.csv.gz`` is
    csv). ``option`` is the CLI flag the error message suggests; raises DataError for an unknown suffix and
    ConfigError for an unknown ``explicit`` name."""
    if explicit is not None:
        name = explicit.strip().lower().lstrip(".")
        fmt = _ALIASES.get(name, name)
        if fmt not in FORMATS:
            raise ConfigError(f"{option}: unknown format '{explicit}'; expected one of {', '.join(FORMATS)}")
        return fmt
    p = Path(path)
    name = p.name.lower()
    gz = name.endswith(".gz")
    suffix = Path(name[:-3]).suffix if gz else p.suffix.lower()
    fmt = _SUFFIX_FORMATS.get(suffix)
    if fmt == "parquet" and gz:
        raise DataError("Parquet files are compressed inside; drop the .gz", path=p)
    if fmt is not None:
        return fmt
    accepted = ", ".join(_SUFFIX_FORMATS)
    hint = ""
    if suffix == ".json":
        hint = (
            " (a .json file holding one JSON object per line is JSON lines; a JSON array cannot be streamed)"
        )
    shown = suffix + (".gz" if gz else "") if suffix else "(none)"
    raise DataError(
        f"cannot tell the table format from the suffix '{shown}'; accepted suffixes: {accepted} "
        f"(csv, tsv and jsonl may also end in .gz); or pass {option} {{{','.join(FORMATS)}}}{hint}",
        path=p,
    )


def count_rows(path: str | os.PathLike, fmt: str) -> int | None:
    """A cheap row total for a progress bar: Parquet metadata, or the newline count of a text file
    (minus the CSV/TSV header), read in binary chunks. Approximate when records span lines or blank lines
    are present; None for a compressed or unreadable file (read_chunks reports the real problem)."""
    p = Path(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(p).metadata.num_rows
        except Exception:  # not parquet, unreadable...: the reader will say what is wrong
            return None
    try:
        with open(p, "rb") as fh:
            if fh.read(2) == _GZIP_MAGIC:
                return None
            fh.seek(0)
            lines, last = 0, b"\n"
            while block := fh.read(1 << 20):
                lines += block.count(b"\n")
                last = block[-1:]
    except OSError:
        return None
    if last != b"\n":
        lines += 1  # a last line without a newline
    if fmt in _DELIMITERS:
        lines -= 1  # the header
    return max(lines, 0)


def read_chunks(
    path: str | os.PathLike,
    *,
    text_column: str = "text",
    id_column: str = "id",
    chunk_rows: int = 4096,
    fmt: str | None = None,
) -> Iterator[pd.DataFrame]:
    """Yield the table at ``path`` as DataFrames of at most ``chunk_rows`` rows, in input order, holding
    the original columns plus an ``id_column`` column: the input's own (values as strings, a missing id as
    ``""``) or else a 0-based row number counted across chunks (placed first). ``text_column`` holds strings:
    non-strings are converted with ``str()``, a missing/null text raises DataError naming the line or row.
    A missing text column fails on the first chunk. An empty input (no rows) yields nothing. The file is
    opened on the first ``next()``; a missing file or unknown format raises at once."""
    p = Path(path)
    fmt = detect_format(p, fmt)
    if not p.exists():
        raise DataError("file not found", path=p)
    if p.is_dir():
        raise DataError(f"expected a {fmt} file, but this is a directory", path=p)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if fmt in _DELIMITERS:
        return _read_delimited(p, fmt, text_column, id_column, chunk_rows)
    if fmt == "jsonl":
        return _read_jsonl(p, text_column, id_column, chunk_rows)
    return _read_parquet(p, text_column, id_column, chunk_rows)


# ---------------------------------------------------------------- readers


def _open_binary(p: Path):
    """The file for binary reading, through gzip when it starts with the gzip magic bytes."""
    try:
        with open(p, "rb") as fh:
            magic = fh.read(2)
        return gzip.open(p, "rb") if magic == _GZIP_MAGIC else open(p, "rb")
    except OSError as e:
        raise DataError(f"cannot read the file: {e.strerror or e}", path=p) from None


class _Lines:
    """Decoded lines of a binary file, split on ``\\n`` only (keeping it, as ``csv`` needs), strictly
    UTF-8 with located errors. ``pending`` collects the lines since the caller last took it, so a CSV
    reader can look at the raw text of the record it just got."""

    def __init__(self, fh, p: Path):
        self.fh, self.p, self.lineno = fh, p, 0
        self.pending: list[str] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = self.fh.readline()
        if not raw:
            raise StopIteration
        self.lineno += 1
        text = _decode_line(raw, self.p, self.lineno)
        self.pending.append(text)
        return text


def _decode_line(raw: bytes, p: Path, lineno: int) -> str:
    if lineno == 1:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataError("the file is UTF-16 encoded; re-save it as UTF-8", path=p, line=1)
        if raw.startswith(_UTF8_BOM):
            raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # Column in characters, as an editor shows it; the bytes before the error are valid UTF-8.
        column = len(raw[: e.start].decode("utf-8")) + 1
        raise DataError(
            f"invalid UTF-8 byte 0x{raw[e.start]:02x} (byte {e.start + 1} of the line); "
            "re-save the file as UTF-8",
            path=p,
            line=lineno,
            column=column,
        ) from None


@contextlib.contextmanager
def _long_fields():
    """Let csv read texts of any length, only while our code runs (the limit is process-global)."""
    old = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _read_delimited(p: Path, fmt: str, text_column: str, id_column: str, chunk_rows: int):
    delimiter, name = _DELIMITERS[fmt], fmt.upper()
    with _open_binary(p) as fh:
        lines = _Lines(fh, p)
        reader = csv.reader(lines, delimiter=delimiter)
        header: list[str] | None = None
        prev, offset, last_start = 0, 0, 0
        last_lines: list[str] = []  # the raw lines of the record just read
        done = False
        while not done:
            records: list[list[str]] = []
            starts: list[int] = []
            ends: list[int] = []
            with _long_fields():
                try:
                    for fields in reader:
                        start, prev = prev + 1, reader.line_num
                        last_start, last_lines, lines.pending = start, lines.pending, []
                        if not fields or (len(fields) == 1 and not fields[0].strip()):
                            continue  # a blank line
                        if header is None:
                            header = _column_names(fields)
                            _require_column(p, header, text_column)
                            continue
                        if len(fields) > len(header) and any(f.strip() for f in fields[len(header) :]):
                            sep = "comma" if delimiter == "," else "tab"
                            raise DataError(
                                f"expected {len(header)} fields ({', '.join(header)}) but found "
                                f"{len(fields)}; put texts that contain a {sep} in double quotes"
                                + _span_hint(start, prev),
                                path=p,
                                line=start,
                            )
                        records.append(fields)
                        starts.append(start)
                        ends.append(prev)
                        if len(records) >= chunk_rows:
                            break
                    else:
                        done = True
                        _check_closed_quotes(p, delimiter, last_lines, last_start, prev)
                except csv.Error as e:
                    why = str(e)
                    if "new-line character" in why:  # lines split only on \n, so these are bare \r ends
                        why = "it ends lines with a bare carriage return (\\r); re-save it with \\n line ends"
                    raise DataError(f"cannot parse the {name}: {why}", path=p, line=reader.line_num) from None
            if not records:
                break
            assert header is not None
            data = {col: [r[j] if j < len(r) else None for r in records] for j, col in enumerate(header)}

            def fail(i: int, message: str, starts=starts, ends=ends) -> DataError:
                return DataError(
                    message + _span_hint(starts[i], ends[i]), path=p, line=starts[i], field=text_column
                )

            data[text_column] = _texts(data[text_column], fail)
            yield _frame(data, offset, id_column)
            offset += len(records)


def _check_closed_quotes(p: Path, delimiter: str, pending: list[str], start: int, end: int) -> None:
    """The csv module (like pandas) silently ends an unterminated quoted field at the end of the file,
    swallowing every line after the quote into one text; re-parse that last record strictly to catch it."""
    if not pending or start == end:
        return
    try:
        list(csv.reader(io.StringIO("".join(pending), newline=""), delimiter=delimiter, strict=True))
    except csv.Error as e:
        if "end of data" in str(e):
            raise DataError(
                f"a double quote opened here is never closed, so lines {start}-{end} (the end of the file) "
                "were read as one field; close the quote or double the quote characters inside the text",
                path=p,
                line=start,
            ) from None


def _span_hint(start: int, end: int) -> str:
    if start == end:
        return ""
    return f" (this record spans lines {start}-{end}; an unbalanced double quote may have joined lines)"


def _column_names(fields: list[str]) -> list[str]:
    """Header names, stripped; blank ones become ``Unnamed: j`` and repeats ``name.1`` (as pandas does)."""
    names: list[str] = []
    seen: set[str] = set()
    for j, raw in enumerate(fields):
        name = raw.strip() or f"Unnamed: {j}"
        base, k = name, 0
        while name in seen:
            k += 1
            name = f"{base}.{k}"
        seen.add(name)
        names.append(name)
    return names


def _read_jsonl(p: Path, text_column: str, id_column: str, chunk_rows: int):
    known: dict[str, None] = {}  # columns in first-seen order, across chunks, so chunks agree
    offset = 0
    with _open_binary(p) as fh:
        records: list[dict] = []
        rows: list[int] = []
        for lineno, raw in enumerate(fh, 1):
            text = _decode_line(raw, p, lineno)
            if not text.strip():
                continue
            obj = parse_json_line(text, p, lineno)
            if not isinstance(obj, dict):
                raise DataError(
                    "expected a JSON object ({...}) on each line, found "
                    + _JSON_TYPES.get(type(obj), "a number"),
                    path=p,
                    line=lineno,
                )
            records.append(obj)
            rows.append(lineno)
            if len(records) >= chunk_rows:
                yield _jsonl_frame(p, records, rows, known, offset, text_column, id_column)
                offset += len(records)
                records, rows = [], []
        if records:
            yield _jsonl_frame(p, records, rows, known, offset, text_column, id_column)


def _jsonl_frame(
    p: Path, records: list[dict], rows: list[int], known: dict, offset: int, text_column: str, id_column: str
) -> pd.DataFrame:
    for rec in records:
        known.update(dict.fromkeys(rec))
    if offset == 0:
        _require_column(p, list(known), text_column)
    data = {col: [rec.get(col) for rec in records] for col in known}
    if text_column not in data:
        data[text_column] = [None] * len(records)

    def fail(i: int, message: str) -> DataError:
        return DataError(message, path=p, line=rows[i], field=text_column)

    data[text_column] = _texts(data[text_column], fail)
    return _frame(data, offset, id_column)


_JSON_TYPES = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}


def _read_parquet(p: Path, text_column: str, id_column: str, chunk_rows: int):
    import pyarrow.parquet as pq

    def unreadable(e: Exception) -> DataError:
        return DataError(
            f"cannot read the file as Parquet ({type(e).__name__}: {e}); expected an Apache Parquet file",
            path=p,
        )

    try:
        # pre_buffer=False + a read buffer: decode column chunks as a stream instead of loading each whole
        # row group's bytes first (memory then follows chunk_rows, not the writer's row-group size).
        pf = pq.ParquetFile(p, pre_buffer=False, buffer_size=1 << 20)
    except Exception as e:  # pyarrow raises many types; all mean "not a readable parquet file"
        raise unreadable(e) from None
    with contextlib.closing(pf):
        _require_column(p, pf.schema_arrow.names, text_column)
        offset = 0
        batches = pf.iter_batches(batch_size=chunk_rows)
        while True:
            try:
                batch = next(batches, None)
            except Exception as e:
                raise unreadable(e) from None
            if batch is None:
                break
            if batch.num_rows == 0:
                continue
            # integer_object_nulls: an int column with gaps keeps ints (ids "7", not "7.0")
            df = batch.to_pandas(integer_object_nulls=True)
            data = {str(col): df[col] for col in df.columns}

            def fail(i: int, message: str, offset=offset) -> DataError:
                return DataError(message, path=p, line=offset + i + 1, kind="row", field=text_column)

            data[text_column] = _texts(data[text_column].tolist(), fail)
            yield _frame(data, offset, id_column)
            offset += batch.num_rows


# ---------------------------------------------------------------- shared column handling


def _require_column(p: Path, found: Iterable[str], name: str) -> None:
    found = list(found)
    if name in found:
        return
    close = difflib.get_close_matches(name, found, n=1, cutoff=0.6) or [
        c for c in found if c.lower() == name.lower()
    ]
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise DataError(
        f"no text column '{name}' (columns found: {', '.join(found) or 'none'}); "
        f"{hint}pass --text-column NAME to choose the column",
        path=p,
        field=name,
    )


def _texts(values: list, fail: Callable[[int, str], DataError]) -> list[str]:
    """The text column as strings: a null raises ``fail(i, ...)``, other scalars go through ``str()``."""
    if all(type(v) is str for v in values):
        return values
    out = list(values)
    for i, v in enumerate(out):
        if type(v) is str:
            continue
        if is_missing(v):
            raise fail(i, "missing text; every row needs a text to predict")
        if isinstance(v, (bytes, bytearray)):
            try:
                out[i] = bytes(v).decode("utf-8")
            except UnicodeDecodeError:
                raise fail(i, "the text is binary data that is not valid UTF-8") from None
        elif isinstance(v, (dict, list, tuple, np.ndarray)):
            raise fail(i, f"expected a text string, found {type(v).__name__}")
        else:
            out[i] = str(v)  # a number or boolean "text" is odd but usable
    return out


def _ids(values) -> list[str]:
    """Given ids as strings, kept as they are ("007" stays "007"); a missing id becomes ""."""
    return ["" if is_missing(v) else v if type(v) is str else str(v) for v in values]


def _frame(data: dict, offset: int, id_column: str) -> pd.DataFrame:
    n = len(next(iter(data.values())))
    index = pd.RangeIndex(offset, offset + n)
    if id_column in data:
        data[id_column] = _ids(data[id_column])
    else:
        data = {id_column: np.arange(offset, offset + n, dtype=np.int64), **data}
    df = pd.DataFrame(data)  # Series from a parquet batch align on their own 0-based index
    df.index = index
    return df


# ---------------------------------------------------------------- writer


class ChunkWriter:
    """Write DataFrames one after another to ``path`` (CSV/TSV/JSONL, optionally ``.gz``, or Parquet),
    through a temp file in the same folder that :meth:`close` fsyncs and renames onto ``path``.

    :meth:`abort` (called by the context manager on any exception, KeyboardInterrupt included) deletes the
    temp file, so ``path`` is either the complete new output or whatever was there before. Columns are
    fixed by the first frame written; later frames are reordered to them (a missing column is written
    empty, a new one is dropped with a :class:`DataWarning`). ``columns_hint`` gives the columns of an
    output that receives no frame at all (a CSV header, an empty Parquet table)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        fmt: str | None = None,
        columns_hint: Iterable[str] | None = None,
    ):
        self.path = Path(path)
        self.fmt = detect_format(self.path, fmt, option="--output-format")
        self.compressed = self.path.name.lower().endswith(".gz")
        if self.compressed and self.fmt == "parquet":
            raise DataError("Parquet files are compressed inside; drop the .gz", path=self.path)
        self.columns_hint = None if columns_hint is None else [str(c) for c in columns_hint]
        self.columns: list[str] | None = None
        self.rows = 0
        self._warned = self._header_done = self._finished = False
        self._raw = self._gz = self._text = self._pq = None
        self._schema = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp creates 0600; keep the old output's mode, else the usual 0644 (as fsutil does).
        self._mode = self.path.stat().st_mode & 0o777 if self.path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._tmp = Path(tmp)
        try:
            if self.fmt == "parquet":
                os.close(fd)  # pyarrow opens the path itself
            else:
                self._raw = os.fdopen(fd, "wb")
                sink = self._raw
                if self.compressed:
                    # mtime=0 and no name: the same predictions give byte-identical .gz files. Level 6 (gzip's
                    # own default) is ~3x faster than Python's 9 for a few percent more bytes.
                    self._gz = sink = gzip.GzipFile(
                        filename="", mode="wb", fileobj=self._raw, compresslevel=6, mtime=0
                    )
                self._text = io.TextIOWrapper(sink, encoding="utf-8", newline="", write_through=False)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, df: pd.DataFrame) -> None:
        """Append the rows of ``df`` (its index is not written)."""
        if self._finished:
            raise ValueError(f"{self.path}: the writer is already closed")
        df = self._conform(df)
        if self.fmt in _DELIMITERS:
            df.to_csv(
                self._text,
                sep=_DELIMITERS[self.fmt],
                index=False,
                header=not self._header_done,
                lineterminator="\n",
            )
            self._header_done = True
        elif self.fmt == "jsonl":
            self._text.write("".join(line + "\n" for line in _json_lines(df)))
        else:
            self._write_parquet(df)
        self.rows += len(df)

    def _conform(self, df: pd.DataFrame) -> pd.DataFrame:
        cols = [str(c) for c in df.columns]
        if len(set(cols)) != len(cols):
            raise ValueError(f"{self.path}: duplicate column names in {cols}")
        df = df.set_axis(cols, axis=1) if cols != list(df.columns) else df
        if self.columns is None:
            self.columns = cols
            return df
        if cols == self.columns:
            return df
        extra = [c for c in cols if c not in self.columns]
        if extra and not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.path}: column(s) {', '.join(extra)} first appear after row {self.rows} and are "
                f"not written (the output's columns are fixed by its first rows: {', '.join(self.columns)})",
                DataWarning,
                stacklevel=3,
            )
        return df.reindex(columns=self.columns)

    def _write_parquet(self, df: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pandas(df, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DataError(f"cannot write these rows as Parquet: {e}", path=self.path) from None
        if self._pq is None:
            # A column that is all-null in the first chunk would be typed "null" and reject later values.
            fields = [f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema]
            self._schema = pa.schema(fields)
            self._pq = pq.ParquetWriter(str(self._tmp), self._schema)
        schema = self._schema
        try:
            table = table.cast(schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            raise self._cast_error(table, schema) from None
        self._pq.write_table(table)

    def _cast_error(self, table, schema) -> DataError:
        for f in schema:
            col = table.column(f.name)
            try:
                col.cast(f.type)
            except Exception:
                return DataError(
                    f"holds {col.type} values after row {self.rows}, but {f.type} before; "
                    "Parquet needs one type per column (write CSV or JSONL instead, or fix the input)",
                    path=self.path,
                    field=f.name,
                )
        return DataError("these rows do not match the Parquet schema of the first rows", path=self.path)

    def close(self) -> None:
        """Finish the file (an empty output gets ``columns_hint``), fsync it and rename it onto ``path``."""
        if self._finished:
            return
        try:
            if self.columns is None and self.columns_hint is not None:
                self.write(pd.DataFrame({c: pd.Series([], dtype=object) for c in self.columns_hint}))
            if self.fmt == "parquet":
                if self._pq is None:
                    import pyarrow as pa
                    import pyarrow.parquet as pq

                    pq.write_table(pa.table({}), str(self._tmp))
                else:
                    self._pq.close()
                    self._pq = None
                fd = os.open(self._tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            else:
                self._text.flush()
                self._text.detach()  # the gzip/raw file below is closed here, after fsync
                self._text = None
                if self._gz is not None:
                    self._gz.close()  # writes the gzip trailer; leaves the raw file open
                    self._gz = None
                self._raw.flush()
                os.fsync(self._raw.fileno())
                self._raw.close()
                self._raw = None
            os.chmod(self._tmp, self._mode)
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._finished = True
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Drop the temp file; ``path`` keeps whatever it held before. Safe to call more than once."""
        if self._finished:
            return
        self._finished = True
        for handle in (self._text, self._gz, self._raw, self._pq):
            if handle is not None:
                with contextlib.suppress(Exception):
                    handle.close()
        self._text = self._gz = self._raw = self._pq = None
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)


def _json_lines(df: pd.DataFrame) -> list[str]:
    """One JSON object per row: NaN/NA as null, floats as JSON numbers, numpy values as Python ones."""
    names = list(df.columns)
    columns = [_json_column(df[c]) for c in names]
    return [
        json.dumps(dict(zip(names, row, strict=True)), ensure_ascii=False, default=_json_default)
        for row in zip(*columns, strict=True)
    ]


def _json_column(s: pd.Series) -> list:
    kind = s.dtype.kind if isinstance(s.dtype, np.dtype) else None
    if kind in ("i", "u", "b"):
        return s.tolist()
    if kind == "f":
        values = s.tolist()
        if not np.isfinite(s.to_numpy()).all():
            values = [v if math.isfinite(v) else None for v in values]
        return values
    values = s.tolist()
    if pd.api.types.is_string_dtype(s.dtype) and s.dtype != object:
        if s.hasnans:
            values = [None if is_missing(v) else v for v in values]
        return values
    return [_jsonable(v) for v in values]


def _jsonable(v: object) -> object:
    if type(v) is str or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    if is_missing(v):
        return None
    return v


def _json_default(o: object) -> object:
    if hasattr(o, "isoformat"):  # datetime, date, pandas Timestamp
        return o.isoformat()
    if isinstance(o, (bytes, bytearray)):
        return bytes(o).decode("utf-8", errors="replace")
    return str(o)

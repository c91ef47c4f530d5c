"""Unlabelled text for pretraining: stream documents, clean and de-duplicate them, split, pack token blocks.

The pipeline, one streaming pass per stage::

    docs = iter_documents(["corpus/", "extra.jsonl"], doc_mode="paragraph")   # Document(text, source, line)
    stats = CorpusStats()
    docs = clean_documents(docs, stats)              # NFC, whitespace, empty and exact-duplicate docs dropped
    train, val = split_documents(docs, val_frac=0.05)   # by a hash of the text: stable as the corpus grows
    ids = encode_documents(tokenizer, (d.text for d in train))        # lmloop.data.tokenizer
    write_packed(pack(ids, 128, eos_id=tokenizer.eos_token_id), "train.npy", vocab_size=len(tokenizer))
    blocks = load_packed("train.npy")                # (N, 128) uint16 memmap

Sources: ``.txt``/``.md`` text files, folders of them (recursive, sorted, hidden files skipped), ``.jsonl``
and ``.parquet`` (one document per record, from ``text_column``), and any of these gzipped (``.txt.gz``...).
Bad input raises :class:`lmloop.errors.DataError` naming the file, line (or row) and byte/character column.
"""

from __future__ import annotations

import contextlib
import difflib
import gzip
import hashlib
import os
import re
import unicodedata
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmloop.data._util import DataWarning, data_error, decode_utf8, parse_json_line
from lmloop.fsutil import atomic_write

DOC_MODES = ("file", "paragraph", "line")
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
_ALL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


@dataclass(frozen=True)
class Document:
    """One document: its text, the file it came from and where in it it starts.

    ``line`` is the 1-based line the document starts on (text and JSONL files), the 1-based row (Parquet),
    or None for a whole file (``doc_mode="file"``).
    """

    text: str
    source: str
    line: int | None = None


@dataclass
class CorpusStats:
    """Counts from :func:`clean_documents`, filled in as the documents stream past.

    ``chars``/``bytes`` count the kept, cleaned text (bytes as UTF-8). ``fingerprint`` is the sha256 of
    the kept documents in order (see :func:`corpus_fingerprint`); it changes when any kept text changes.
    """

    docs_read: int = 0
    dropped_empty: int = 0
    dropped_duplicate: int = 0
    lines_dropped_duplicate: int = 0
    chars: int = 0
    bytes: int = 0
    _hash: object = field(default_factory=hashlib.sha256, repr=False, compare=False)

    @property
    def docs_kept(self) -> int:
        return self.docs_read - self.dropped_empty - self.dropped_duplicate

    @property
    def fingerprint(self) -> str:
        return self._hash.hexdigest()

    def as_dict(self) -> dict:
        return {
            "docs_read": self.docs_read,
            "docs_kept": self.docs_kept,
            "dropped_empty": self.dropped_empty,
            "dropped_duplicate": self.dropped_duplicate,
            "lines_dropped_duplicate": self.lines_dropped_duplicate,
            "chars": self.chars,
            "bytes": self.bytes,
            "fingerprint": self.fingerprint,
        }


# ---------------------------------------------------------------- reading


def iter_documents(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    text_column: str = "text",
    doc_mode: str = "file",
) -> Iterator[Document]:
    """Stream the documents of one or more files or folders, in a stable order.

    ``doc_mode`` says what a document is in a plain-text file: the whole ``file``, each ``paragraph``
    (blank-line separated) or each non-blank ``line``. JSONL and Parquet records are always one document
    each, read from ``text_column`` (a null value gives an empty document, which cleaning drops). Folders
    are walked recursively in sorted order; hidden files and files of other types are skipped. Texts are
    returned as read (see :func:`clean_documents`). Raises DataError for a missing path, a folder with
    nothing readable, invalid UTF-8 (with line and column), malformed JSON or a missing column.
    """
    if doc_mode not in DOC_MODES:
        raise ValueError(f"doc_mode must be one of {', '.join(DOC_MODES)}, not {doc_mode!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in paths:
        for f in _expand(Path(path)):
            kind = _kind(f)
            if kind == "jsonl":
                yield from _read_jsonl(f, text_column)
            elif kind == "parquet":
                yield from _read_parquet(f, text_column)
            else:
                yield from _read_text(f, doc_mode)


def _base_suffix(p: Path) -> str:
    """``a.jsonl.gz`` -> ``.jsonl``; ``a.gz`` -> ``.txt`` (a bare gzip is read as text)."""
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        return suffixes[-2] if len(suffixes) > 1 and suffixes[-2] in _ALL_SUFFIXES else ".txt"
    return suffixes[-1] if suffixes else ""


def _kind(p: Path) -> str:
    suffix = _base_suffix(p)
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def _expand(p: Path) -> list[Path]:
    if not p.exists():
        raise data_error("file or directory not found", path=p)
    if p.is_file():
        if _base_suffix(p) not in _ALL_SUFFIXES:
            raise data_error(
                f"cannot read '{p.suffix}' files as a corpus; expected {', '.join(_ALL_SUFFIXES)} "
                "(optionally gzipped, .gz)",
                path=p,
            )
        return [p]
    found = sorted(
        f
        for f in p.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )
    usable = [f for f in found if _base_suffix(f) in _ALL_SUFFIXES]
    if not usable:
        seen = sorted({f.suffix or "(no suffix)" for f in found})
        raise data_error(
            f"no corpus files in this directory (found {len(found)} file(s): {', '.join(seen) or 'none'}); "
            f"expected {', '.join(_ALL_SUFFIXES)} files, optionally gzipped",
            path=p,
        )
    return usable


@contextlib.contextmanager
def _open_binary(p: Path):
    try:
        fh = gzip.open(p, "rb") if p.suffix.lower() == ".gz" else open(p, "rb")  # noqa: SIM115
    except OSError as e:
        raise data_error(f"cannot read the file: {e.strerror or e}", path=p) from None
    try:
        yield fh
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        # gzip errors surface while reading, not on open
        raise data_error(f"cannot read the file: {e}", path=p) from None
    finally:
        fh.close()


def _iter_lines(p: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its ending), decoded strictly as UTF-8, one line at a time."""
    with _open_binary(p) as fh:
        for no, raw in enumerate(fh, 1):
            if no == 1:
                if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                    raise data_error("the file is UTF-16 encoded; re-save it as UTF-8", path=p, line=1)
                if raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[: e.start].decode("utf-8")) + 1
                raise data_error(
                    f"invalid UTF-8 byte 0x{raw[e.start]:02x} (byte {e.start + 1} of the line); "
                    "re-save the file as UTF-8",
                    path=p,
                    line=no,
                    column=column,
                ) from None
            yield no, text.rstrip("\r\n")


def _read_text(p: Path, doc_mode: str) -> Iterator[Document]:
    src = str(p)
    if doc_mode == "file":
        with _open_binary(p) as fh:
            data = fh.read()
        yield Document(decode_utf8(data, p), src, None)
        return
    if doc_mode == "line":
        for no, line in _iter_lines(p):
            if line.strip():
                yield Document(line, src, no)
        return
    para: list[str] = []
    start = 0
    for no, line in _iter_lines(p):
        if line.strip():
            if not para:
                start = no
            para.append(line)
        elif para:
            yield Document("\n".join(para), src, start)
            para = []
    if para:
        yield Document("\n".join(para), src, start)


def _text_value(value: object, p: Path, line: int, column: str, kind: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise data_error(
            f"expected a text string, found {type(value).__name__}",
            path=p,
            line=line,
            kind=kind,
            field=column,
        )
    return value


def _missing_column(p: Path, column: str, found: list[str], line: int | None = None, kind: str = "line"):
    close = difflib.get_close_matches(column, found, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return data_error(
        f"no column '{column}' (columns found: {', '.join(found) or 'none'}){hint}",
        path=p,
        line=line,
        kind=kind,
        field=column,
    )


def _read_jsonl(p: Path, column: str) -> Iterator[Document]:
    src = str(p)
    for no, line in _iter_lines(p):
        if not line.strip():
            continue
        obj = parse_json_line(line, p, no)
        if not isinstance(obj, dict):
            raise data_error(f"expected a JSON object, found {type(obj).__name__}", path=p, line=no)
        if column not in obj:
            raise _missing_column(p, column, list(obj), line=no)
        yield Document(_text_value(obj[column], p, no, column, "line"), src, no)


def _read_parquet(p: Path, column: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises many types; all mean "not a readable parquet file"
        raise data_error(f"cannot read the file as Parquet ({type(e).__name__}: {e})", path=p) from None
    names = pf.schema_arrow.names
    if column not in names:
        raise _missing_column(p, column, names)
    src, row = str(p), 0
    for batch in pf.iter_batches(columns=[column], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            yield Document(_text_value(value, p, row, column, "row"), src, row)


# ---------------------------------------------------------------- cleaning


_NEWLINES = re.compile(r"\r\n?|[\u2028\u2029\x85\x0b\x0c]")
_HSPACE = re.compile(r"[^\S\n]+")  # any whitespace except the newline: spaces, tabs, NBSP, ...
_BLANKS = re.compile(r"\n{3,}")


def clean_text(text: str, *, dedupe_lines: bool = False) -> tuple[str, int]:
    """Normalise one document: NFC, one ``\\n`` line ending, runs of spaces/tabs -> one space, lines
    stripped, 3+ newlines -> one blank line, ends stripped. With ``dedupe_lines`` a non-blank line equal to
    an earlier line of the same document is dropped. Returns (text, number of lines dropped)."""
    text = unicodedata.normalize("NFC", text)
    text = _NEWLINES.sub("\n", text)
    lines = [_HSPACE.sub(" ", line).strip() for line in text.split("\n")]
    dropped = 0
    if dedupe_lines:
        seen: set[str] = set()
        kept = []
        for line in lines:
            if line and line in seen:
                dropped += 1
                continue
            seen.add(line)
            kept.append(line)
        lines = kept
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip(), dropped


def clean_documents(
    docs: Iterable[Document],
    stats: CorpusStats | None = None,
    *,
    dedupe: bool = True,
    dedupe_lines: bool = False,
) -> Iterator[Document]:
    """Clean each document (:func:`clean_text`), drop empty ones and (with ``dedupe``) exact duplicates of
    an earlier cleaned document, and count all of it in ``stats``. Duplicates are found by the sha256 of
    the cleaned text: memory is 32 bytes per distinct document, whatever their length."""
    stats = CorpusStats() if stats is None else stats
    seen: set[bytes] = set()
    for doc in docs:
        stats.docs_read += 1
        text, dropped = clean_text(doc.text, dedupe_lines=dedupe_lines)
        if not text:
            stats.dropped_empty += 1
            continue
        data = text.encode("utf-8")
        digest = hashlib.sha256(data).digest()
        if dedupe:
            if digest in seen:
                stats.dropped_duplicate += 1
                continue
            seen.add(digest)
        stats.lines_dropped_duplicate += dropped
        stats.chars += len(text)
        stats.bytes += len(data)
        stats._hash.update(digest)
        yield Document(text, doc.source, doc.line)


def corpus_fingerprint(texts: Iterable[str]) -> str:
    """sha256 over the sha256 of each text, in order: the same value :attr:`CorpusStats.fingerprint`
    gives for the cleaned documents."""
    h = hashlib.sha256()
    for text in texts:
        h.update(hashlib.sha256(text.encode("utf-8")).digest())
    return h.hexdigest()


# ---------------------------------------------------------------- splitting


def assign_split(text: str, val_frac: float = 0.05, seed: int = 0) -> str:
    """``"validation"`` or ``"train"`` for one document, from a hash of (seed, text) alone.

    Because nothing else enters the decision, a document keeps its split when others are added or removed,
    and (after de-duplication) one text can never be on both sides.
    """
    h = hashlib.sha256(f"{seed}\0".encode() + text.encode("utf-8")).digest()
    u = int.from_bytes(h[:8], "big") / 2**64  # uniform in [0, 1)
    return "validation" if u < val_frac else "train"


def split_documents(
    docs: Iterable[Document], val_frac: float = 0.05, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, validation) by :func:`assign_split`; whole documents only.

    The validation share is ``val_frac`` in expectation, not exactly; with few documents (e.g. whole
    plays) it may be empty, which gives a :class:`DataWarning` — use ``doc_mode="paragraph"``.
    """
    if not 0.0 <= val_frac < 1.0:
        raise ValueError(f"val_frac must be in [0, 1), not {val_frac}")
    train: list[Document] = []
    val: list[Document] = []
    for doc in docs:
        (val if assign_split(doc.text, val_frac, seed) == "validation" else train).append(doc)
    if val_frac > 0 and not val and train:
        warnings.warn(
            f"no document of {len(train)} fell into the validation split (val_frac={val_frac}); "
            "use smaller documents (doc_mode='paragraph') or a larger val_frac",
            DataWarning,
            stacklevel=2,
        )
    return train, val


# ---------------------------------------------------------------- packing


def pack_with_doc_ids(
    token_id_docs: Iterable[list[int]],
    seq_len: int,
    *,
    eos_id: int | None,
    bos_id: int | None = None,
    pad_id: int | None = None,
) -> Iterator[tuple[list[int], list[int]]]:
    """Like :func:`pack`, but each block comes with a parallel list of document indices (0-based position
    in ``token_id_docs``; -1 for padding). A caller can turn equal neighbouring ids into a block-diagonal
    attention mask, or reset position ids at each document start. BOS/EOS count as their document's."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, not {seq_len}")
    buf: list[int] = []
    ids: list[int] = []
    for i, doc in enumerate(token_id_docs):
        n0 = len(buf)
        if bos_id is not None:
            buf.append(bos_id)
        buf.extend(doc)
        if eos_id is not None:
            buf.append(eos_id)
        ids.extend([i] * (len(buf) - n0))
        if len(buf) >= seq_len:
            # cut every full block now; slicing once per document keeps this O(tokens)
            full = len(buf) - len(buf) % seq_len
            for start in range(0, full, seq_len):
                yield buf[start : start + seq_len], ids[start : start + seq_len]
            buf, ids = buf[full:], ids[full:]
    if buf and pad_id is not None:
        n = seq_len - len(buf)
        yield buf + [pad_id] * n, ids + [-1] * n


def pack(
    token_id_docs: Iterable[list[int]],
    seq_len: int,
    *,
    eos_id: int | None,
    bos_id: int | None = None,
    pad_id: int | None = None,
) -> Iterator[list[int]]:
    """Concatenate tokenised documents and cut them into blocks of exactly ``seq_len`` tokens.

    Each document becomes ``[bos_id] + ids + [eos_id]`` (either left out when None): EOS for a causal LM,
    [SEP] (with [CLS] as ``bos_id``) for a masked LM, so the model sees where one text ends. A document may
    run on into the next block; nothing is padded. The final partial block is dropped, unless ``pad_id`` is
    given: then it is padded to ``seq_len`` with it (the only padding ever written).
    """
    for block, _ in pack_with_doc_ids(token_id_docs, seq_len, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id):
        yield block


def packed_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab < 65536): half the disk and memory of int32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def write_packed(
    blocks: Iterable[list[int]] | np.ndarray, path: str | os.PathLike, *, vocab_size: int | None = None
) -> Path:
    """Write packed blocks as one ``(n_blocks, seq_len)`` ``.npy`` array, atomically (temp file, fsync,
    rename). The dtype is uint16 when ``vocab_size`` (default: the largest id + 1) is at most 65536, else
    int32. Blocks must all have the same length; ids must be in ``[0, vocab_size)``."""
    path = Path(path)
    chunks: list[np.ndarray] = []
    pending: list[list[int]] = []
    width: int | None = None

    def flush() -> None:
        if pending:
            chunks.append(np.asarray(pending, dtype=np.int64))
            pending.clear()

    if isinstance(blocks, np.ndarray):
        if blocks.ndim != 2:
            raise ValueError(f"expected a 2-D array of blocks, got shape {blocks.shape}")
        chunks.append(np.asarray(blocks, dtype=np.int64))
        width = blocks.shape[1]
    else:
        for k, block in enumerate(blocks):
            if width is None:
                width = len(block)
            elif len(block) != width:
                raise ValueError(f"block {k} has {len(block)} tokens, the first had {width}")
            pending.append(block)
            if len(pending) >= 8192:  # convert in chunks: a list of Python ints costs ~9x the array
                flush()
        flush()
    arr = np.concatenate(chunks) if chunks else np.zeros((0, width or 0), dtype=np.int64)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise ValueError(f"token ids must be >= 0, found {lo}")
        if vocab_size is not None and hi >= vocab_size:
            raise ValueError(f"token id {hi} is outside the vocabulary (size {vocab_size})")
        vocab_size = hi + 1 if vocab_size is None else vocab_size
    arr = arr.astype(packed_dtype(vocab_size or 1))
    atomic_write(path, lambda fh: np.save(fh, arr, allow_pickle=False))
    return path


def load_packed(path: str | os.PathLike) -> np.memmap:
    """Memory-map blocks written by :func:`write_packed`: a read-only ``(n_blocks, seq_len)`` array."""
    path = Path(path)
    if not path.is_file():
        raise data_error("packed token file not found", path=path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise data_error(f"not a .npy array written by write_packed ({e})", path=path) from None
    if arr.ndim != 2 or arr.dtype not in (np.uint16, np.int32):
        raise data_error(
            f"expected a 2-D uint16/int32 array of token blocks, found shape {arr.shape} dtype {arr.dtype}",
            path=path,
        )
    return arr

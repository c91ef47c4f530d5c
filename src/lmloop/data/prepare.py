"""Turn loaded rows into train/validation/test: de-duplicate, split (stratified, seeded), remove leakage,
check labels, fingerprint each split and describe it all in a data card.

Splitting is stratified systematic sampling: rows are shuffled with the seed, grouped by stratum
(label, then domain, so neighbouring strata share a label), and every k-th row of that order goes to test
(then validation) from a random phase. Each stratum so gets its proportional share (+/- 1) and a stratum too
small for a share falls back to its label's proportion, with no minimum size and no crash on tiny data.
"""

from __future__ import annotations

import hashlib
import math
import os
import unicodedata
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lmloop.data._util import SPLITS, DataWarning, data_error, sort_labels
from lmloop.data.card import build_card, combined_fingerprint
from lmloop.errors import ConfigError

_TEXT_SUFFIXES = {".csv", ".tsv", ".tab", ".jsonl", ".ndjson", ".json", ".txt"}


@dataclass
class PreparedData:
    """Ready-to-use splits (columns ``text``, ``label`` and, when known, ``domain``) with their provenance."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]
    fingerprints: dict[str, str]  # split -> sha256 hex of the split's canonical content
    card: dict = field(default_factory=dict)
    source: str = ""

    def splits(self) -> dict[str, pd.DataFrame]:
        """The three splits by name, in train/validation/test order."""
        return {"train": self.train, "validation": self.validation, "test": self.test}

    @property
    def fingerprint(self) -> str:
        """16-hex digest over all three split fingerprints: one tag for 'exactly this data'."""
        return combined_fingerprint(self.fingerprints)


# ---------------------------------------------------------------- normalisation and de-duplication


def normalise_text(text: str) -> str:
    """Key for near-duplicate detection: NFKC, casefold, whitespace collapsed, leading/trailing punctuation
    and whitespace stripped. Brackets are not stripped, so emoticons such as ":)" and ":'(" keep texts apart
    that differ only by them; a text that is all punctuation keeps it, so "!!!" and "?" stay distinct."""
    t = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    i, j = 0, len(t)
    while i < j and _is_punct(t[i]):
        i += 1
    while j > i and _is_punct(t[j - 1]):
        j -= 1
    return t[i:j] or t


def _is_punct(ch: str) -> bool:
    # Ps/Pe (brackets) excluded: at a text's edge they are usually emoticons, which carry sentiment.
    return ch.isspace() or unicodedata.category(ch) in ("Po", "Pd", "Pi", "Pf", "Pc")


def dedupe(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Remove exact and normalised duplicate texts. Copies sharing a label keep the first occurrence; texts
    whose copies disagree on the label are dropped entirely (a warning and the stats give up to 5 examples).
    Returns the kept rows and a stats dict (counts per kind, conflict examples)."""
    texts = df["text"].tolist()
    labels = df["label"].tolist()
    keys = [normalise_text(t) for t in texts]
    label_sets: dict[str, set] = defaultdict(set)
    for k, lab in zip(keys, labels, strict=True):
        label_sets[k].add(lab)
    conflicts = {k for k, s in label_sets.items() if len(s) > 1}

    keep = np.zeros(len(df), dtype=bool)
    seen_norm: set[str] = set()
    seen_exact: set[str] = set()
    exact = normalised = conflict_rows = 0
    conflict_rows_by_key: dict[str, list[int]] = defaultdict(list)
    for i, (k, t) in enumerate(zip(keys, texts, strict=True)):
        if k in conflicts:
            conflict_rows += 1
            conflict_rows_by_key[k].append(i)
        elif k in seen_norm:
            if t in seen_exact:
                exact += 1
            else:
                normalised += 1
        else:
            keep[i] = True
            seen_norm.add(k)
        seen_exact.add(t)

    examples = []
    for idx in list(conflict_rows_by_key.values())[:5]:
        examples.append(
            {
                "text": _clip(texts[idx[0]]),
                "labels": sort_labels(labels[i] for i in idx),
                "copies": len(idx),
                "where": [row_location(df.iloc[i]) for i in idx[:5]],
            }
        )
    stats = {
        "rows_in": len(df),
        "exact_duplicates_removed": exact,
        "normalised_duplicates_removed": normalised,
        "conflicting_label_rows_removed": conflict_rows,
        "conflicting_label_texts": len(conflicts),
        "conflict_examples": examples,
        "rows_out": int(keep.sum()),
    }
    if conflicts:
        shown = "; ".join(
            f"{e['text']!r} labelled {', '.join(e['labels'])} at {e['where'][0]}" for e in examples
        )
        warnings.warn(
            f"dropped {conflict_rows} rows: {len(conflicts)} text(s) appear with conflicting labels ({shown})",
            DataWarning,
            stacklevel=2,
        )
    return df[keep].reset_index(drop=True), stats


def _no_dedupe(df: pd.DataFrame) -> dict:
    return {"rows_in": len(df), "skipped": True, "rows_out": len(df)}


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------- locating rows for messages


def row_location(row: pd.Series) -> str:
    """Human location of a row: ``file:line`` for text formats, ``file row N`` otherwise, the file alone
    for folder data, ``row N`` when the frame carries no source."""
    source = row.get("_source")
    line = row.get("_row")
    has_line = line is not None and not pd.isna(line)
    if source is None or (isinstance(source, float) and math.isnan(source)):
        return f"row {int(line)}" if has_line else "unknown location"
    if not has_line:
        return str(source)
    return f"{source}:{int(line)}" if _row_kind(source) == "line" else f"{source} row {int(line)}"


def _row_kind(source: str) -> str:
    return "line" if Path(str(source)).suffix.lower() in _TEXT_SUFFIXES else "row"


def _located_error(message: str, row: pd.Series | None, fallback: str | None, field: str) -> Exception:
    if row is None or "_source" not in row or pd.isna(row.get("_source")):
        return data_error(message, path=fallback, field=field)
    line = row.get("_row")
    line = None if line is None or pd.isna(line) else int(line)
    return data_error(message, path=row["_source"], line=line, kind=_row_kind(row["_source"]), field=field)


# ---------------------------------------------------------------- label checks


def check_labels(
    train: pd.DataFrame, others: dict[str, pd.DataFrame | None], path_hint: str | os.PathLike | None = None
) -> None:
    """Raise DataError unless train has at least 2 classes and every validation/test label occurs in train;
    the error for an unseen label names the label and the first row/line where it appears.
    ``path_hint`` is the file named when the frames carry no ``_source`` column."""
    hint = None if path_hint is None else str(path_hint)
    if len(train) == 0:
        raise data_error("no training rows left", path=hint)
    counts = train["label"].value_counts()
    if len(counts) < 2:
        raise data_error(
            f"needs at least 2 classes, found only '{counts.index[0]}' in {len(train)} rows",
            path=hint,
            field="label",
        )
    known = set(counts.index)
    for name, frame in others.items():
        if frame is None or len(frame) == 0:
            continue
        unseen = [lab for lab in frame["label"].unique() if lab not in known]
        if not unseen:
            continue
        first = frame[frame["label"] == unseen[0]].iloc[0]
        more = f"; other unseen labels: {', '.join(map(repr, unseen[1:6]))}" if len(unseen) > 1 else ""
        raise _located_error(
            f"label '{unseen[0]}' in the {name} data does not occur in the training data "
            f"(training labels: {', '.join(sort_labels(known))}){more}",
            first,
            hint,
            "label",
        )


# ---------------------------------------------------------------- splitting


def split_sizes(n: int, val_frac: float, test_frac: float) -> tuple[int, int]:
    """(n_validation, n_test) for n rows: rounded fractions, at least 1 each when the fraction is positive
    and rows allow, always leaving at least 1 training row."""
    for name, f in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0 <= f < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {f}")
    if val_frac + test_frac >= 1:
        raise ConfigError(f"val_frac + test_frac must be below 1 (got {val_frac} + {test_frac})")
    n_test = math.floor(n * test_frac + 0.5)
    n_val = math.floor(n * val_frac + 0.5)
    if test_frac > 0 and n_test == 0 and n >= 2:
        n_test = 1
    if val_frac > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    while n_val + n_test > max(n - 1, 0):
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def _stratified_order(df: pd.DataFrame, stratify, rng: np.random.Generator) -> np.ndarray:
    perm = rng.permutation(len(df))
    cols = [c for c in stratify if c in df.columns]
    if not cols:
        return perm
    # sorted group codes: label first, so the strata of one label sit next to each other
    codes = df.groupby(cols, sort=True, dropna=False).ngroup().to_numpy()
    return perm[np.argsort(codes[perm], kind="stable")]


def _systematic(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct positions evenly spread over range(n) from a random phase."""
    if k <= 0 or n <= 0:
        return np.zeros(0, dtype=int)
    return np.floor((np.arange(k) + rng.random()) * n / k).astype(int)


def _ensure_labels_in(labels: np.ndarray, chosen: np.ndarray, rng: np.random.Generator) -> None:
    """Make every label present in ``chosen`` (bool mask, edited in place) by swapping one of its rows in for
    a row of the most frequent chosen label, so tiny classes never vanish from training."""
    for lab in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == lab)
        if chosen[rows].any():
            continue
        counts = Counter(labels[chosen].tolist())
        chosen[rows[0]] = True
        donors = [d for d, c in counts.most_common() if c > 1]
        if donors:
            candidates = np.flatnonzero(chosen & (labels == donors[0]))
            chosen[rng.choice(candidates)] = False


def split_frame(
    df: pd.DataFrame,
    *,
    seed: int = 42,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    stratify=("label", "domain"),
) -> dict[str, pd.DataFrame]:
    """Split one frame into train/validation/test by seeded stratified systematic sampling (see module
    docstring). Deterministic for a seed; every label keeps at least one training row."""
    n = len(df)
    n_val, n_test = split_sizes(n, val_frac, test_frac)
    rng = np.random.default_rng(seed)
    order = _stratified_order(df, stratify, rng)
    assign = np.zeros(n, dtype=np.int8)  # 0 train, 1 validation, 2 test
    assign[order[_systematic(n, n_test, rng)]] = 2
    rest = order[assign[order] == 0]  # still in stratified order
    assign[rest[_systematic(len(rest), n_val, rng)]] = 1
    if n:
        labels = df["label"].to_numpy(dtype=object)
        in_train = assign == 0
        before = in_train.copy()
        _ensure_labels_in(labels, in_train, rng)
        # rows swapped out of train go to the split that lost one; rows swapped in leave theirs
        moved_in = np.flatnonzero(in_train & ~before)
        moved_out = np.flatnonzero(before & ~in_train)
        # fewer rows leave than enter when no label could spare one, hence strict=False
        for a, b in zip(moved_in, moved_out, strict=False):
            assign[b] = assign[a]
        assign[moved_in] = 0
    return {name: df[assign == i].reset_index(drop=True) for i, name in enumerate(SPLITS)}


def subsample(df: pd.DataFrame, k: int, *, seed: int = 42, stratify=("label", "domain")) -> pd.DataFrame:
    """At most ``k`` rows of ``df``, drawn stratified and seeded, keeping every label when k allows and the
    original row order."""
    if k >= len(df):
        return df.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    order = _stratified_order(df, stratify, rng)
    chosen = np.zeros(len(df), dtype=bool)
    chosen[order[_systematic(len(df), k, rng)]] = True
    if k >= df["label"].nunique():
        _ensure_labels_in(df["label"].to_numpy(dtype=object), chosen, rng)
    return df[chosen].reset_index(drop=True)


# ---------------------------------------------------------------- leakage


def remove_leakage(parts: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, dict]:
    """Drop training rows whose normalised text also occurs in validation or test (evaluation sets are never
    touched). Returns the new train frame and stats per pair, with up to 5 examples each; a validation/test
    overlap is only counted."""
    train = parts["train"]
    train_keys = train["text"].map(normalise_text)
    eval_keys = {name: set(parts[name]["text"].map(normalise_text)) for name in ("validation", "test")}
    drop = np.zeros(len(train), dtype=bool)
    stats: dict = {}
    for name, keys in eval_keys.items():
        hit = train_keys.isin(keys).to_numpy()
        stats[f"train_{name}"] = {
            "shared_texts": int(train_keys[hit].nunique()),
            "train_rows_removed": int((hit & ~drop).sum()),
            "examples": [_clip(t) for t in train["text"][hit].head(5)],
        }
        drop |= hit
    stats["validation_test_shared_texts"] = len(eval_keys["validation"] & eval_keys["test"])
    if drop.any():
        warnings.warn(
            f"removed {int(drop.sum())} training rows whose text also appears in validation/test (leakage)",
            DataWarning,
            stacklevel=3,
        )
    return train[~drop].reset_index(drop=True), stats


# ---------------------------------------------------------------- fingerprints


def fingerprint(df: pd.DataFrame) -> str:
    """sha256 hex over the sorted lines ``text<TAB>label[<TAB>domain]`` (tabs/newlines escaped): independent
    of row order, sensitive to any change of content."""
    cols = ["text", "label"] + (["domain"] if "domain" in df.columns else [])
    lines = sorted(
        "\t".join(_escape(str(v)) for v in row) for row in zip(*(df[c] for c in cols), strict=True)
    )
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


# ---------------------------------------------------------------- entry points


def prepare(
    df: pd.DataFrame,
    *,
    seed: int = 42,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    stratify=("label", "domain"),
    dedupe: bool = True,
    source: str | None = None,
) -> PreparedData:
    """Prepare one loaded frame: when it has a ``split`` column use it (see :func:`prepare_splits`), else
    de-duplicate, check there are 2+ classes, split stratified and seeded, remove leakage, fingerprint and
    build the data card. ``source`` names the data in messages and the card (default: from ``_source``)."""
    source = source or _describe_sources(df)
    if "split" in df.columns:
        parts = {name: df[df["split"] == name].drop(columns="split") for name in SPLITS}
        if len(parts["train"]) == 0:
            found = ", ".join(sorted(df["split"].unique()))
            raise data_error(
                f"the split column has no 'train' rows (found: {found})", path=source, field="split"
            )
        return prepare_splits(
            parts["train"],
            parts["validation"] if len(parts["validation"]) else None,
            parts["test"] if len(parts["test"]) else None,
            seed=seed,
            val_frac=val_frac,
            test_frac=test_frac,
            stratify=stratify,
            dedupe=dedupe,
            source=source,
        )
    frame, stats = _dedupe_fn(df) if dedupe else (df.reset_index(drop=True), _no_dedupe(df))
    check_labels(frame, {}, source)
    parts = split_frame(frame, seed=seed, val_frac=val_frac, test_frac=test_frac, stratify=stratify)
    method = {"train": "stratified split", "validation": "stratified split", "test": "stratified split"}
    return _finalise(parts, {"all": stats}, method, source, seed, val_frac, test_frac, stratify)


def prepare_splits(
    train_df: pd.DataFrame,
    validation_df: pd.DataFrame | None = None,
    test_df: pd.DataFrame | None = None,
    *,
    seed: int = 42,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    stratify=("label", "domain"),
    dedupe: bool = True,
    source: str | None = None,
) -> PreparedData:
    """Prepare data whose splits are (partly) given: each given split is de-duplicated on its own; a missing
    validation or test split is carved from train (``val_frac``/``test_frac`` of the training rows,
    stratified and seeded); training rows that leak into validation/test are removed; labels are checked."""
    source = source or _describe_sources(train_df)
    given = {"train": train_df, "validation": validation_df, "test": test_df}
    stats = {}
    for name, frame in given.items():
        if frame is not None:
            given[name], stats[name] = (
                _dedupe_fn(frame) if dedupe else (frame.reset_index(drop=True), _no_dedupe(frame))
            )
    check_labels(given["train"], {}, source)
    method = {name: ("given" if frame is not None else "carved from train") for name, frame in given.items()}
    method["train"] = "given"
    if validation_df is None or test_df is None:
        carved = split_frame(
            given["train"],
            seed=seed,
            val_frac=val_frac if validation_df is None else 0.0,
            test_frac=test_frac if test_df is None else 0.0,
            stratify=stratify,
        )
        given["train"] = carved["train"]
        for name in ("validation", "test"):
            if given[name] is None:
                given[name] = carved[name]
    return _finalise(given, stats, method, source, seed, val_frac, test_frac, stratify)


def _dedupe_fn(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    return dedupe(df)


def _finalise(parts, dedup_stats, method, source, seed, val_frac, test_frac, stratify) -> PreparedData:
    parts = dict(parts)
    parts["train"], leakage = remove_leakage(parts)
    check_labels(parts["train"], {"validation": parts["validation"], "test": parts["test"]}, source)
    sources = {name: _describe_sources(frame) for name, frame in parts.items()}
    clean = {name: _public_columns(frame) for name, frame in parts.items()}
    labels = sort_labels(clean["train"]["label"])
    fps = {name: fingerprint(frame) for name, frame in clean.items()}
    card = build_card(
        clean,
        labels=labels,
        fingerprints=fps,
        dedup=dedup_stats,
        leakage=leakage,
        source=source,
        sources=sources,
        split={
            "method": method,
            "seed": seed,
            "val_frac": val_frac,
            "test_frac": test_frac,
            "stratify": [c for c in stratify if c in clean["train"].columns],
        },
    )
    return PreparedData(clean["train"], clean["validation"], clean["test"], labels, fps, card, source)


def _public_columns(df: pd.DataFrame) -> pd.DataFrame:
    cols = ["text", "label"] + (["domain"] if "domain" in df.columns else [])
    return df[cols].reset_index(drop=True)


def _describe_sources(df: pd.DataFrame) -> str:
    if "_source" not in df.columns or len(df) == 0:
        return ""
    uniq = list(dict.fromkeys(df["_source"].astype(str)))
    if len(uniq) <= 3:
        return ", ".join(uniq)
    # folder data: one file per row, so name the common directory instead
    return f"{os.path.commonpath(uniq)} ({len(uniq)} files)"

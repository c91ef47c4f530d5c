"""One entry point for the CLI and recipes: a data spec in, :class:`PreparedData` out."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from lmloop.data._util import DataWarning, data_error
from lmloop.data.builtin import BUILTIN_DATASETS, load_builtin
from lmloop.data.card import build_card
from lmloop.data.load import load_labeled
from lmloop.data.prepare import PreparedData, fingerprint, prepare, prepare_splits, subsample
from lmloop.errors import ConfigError

_SPEC_KEYS = (
    "path",
    "train",
    "validation",
    "test",
    "format",
    "text_column",
    "label_column",
    "domain_column",
    "seed",
    "val_frac",
    "test_frac",
    "max_chars",
    "limit",
)


def load_data(
    path=None,
    *,
    train: str | os.PathLike | None = None,
    validation: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    format: str | None = None,  # shadows the builtin on purpose: the recipe/CLI key is "format"
    text_column: str = "text",
    label_column: str = "label",
    domain_column: str | None = None,
    seed: int = 42,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    max_chars: int | None = 20000,
    limit: int | None = None,
) -> PreparedData:
    """Load and prepare data from a spec. ``path`` is a file, a directory or a built-in name
    (``vader-sentiment``; its split is fixed 80/10/10, column options ignored); ``train``/``validation``/
    ``test`` files are used instead of it when given (``path`` then serves as train if ``train`` is not).
    A missing validation/test split is carved from train; a ``split`` column in a single file is honoured.
    ``limit`` (for quick runs) keeps at most ``limit`` training rows and ``max(limit // 4, number of
    labels)`` validation and test rows, each drawn stratified with ``seed``; the card records it.
    ``path`` may also be a mapping or dataclass holding these keys."""
    if isinstance(path, Mapping) or (dataclasses.is_dataclass(path) and not isinstance(path, type)):
        spec = dict(path) if isinstance(path, Mapping) else dataclasses.asdict(path)
        unknown = sorted(set(spec) - set(_SPEC_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown data option(s): {', '.join(unknown)}; expected: {', '.join(_SPEC_KEYS)}"
            )
        return load_data(**spec)

    train_path = train if train is not None else path
    if train_path is None:
        raise ConfigError(
            "no data given: set path (a file, a directory or a built-in data set: "
            f"{', '.join(BUILTIN_DATASETS)}) or train"
        )
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer, got {limit!r}")

    if str(train_path) in BUILTIN_DATASETS and not Path(train_path).exists():
        if validation is not None or test is not None:
            raise ConfigError(f"built-in data set '{train_path}' has fixed splits; drop validation/test")
        data = load_builtin(str(train_path), seed=seed)
    else:
        options = {
            "fmt": format,
            "text_column": text_column,
            "label_column": label_column,
            "domain_column": domain_column,
            "max_chars": max_chars,
        }
        frames = {}
        for name, p in (("train", train_path), ("validation", validation), ("test", test)):
            if p is None:
                continue
            if not Path(p).exists():
                hint = f" (built-in data sets: {', '.join(BUILTIN_DATASETS)})" if name == "train" else ""
                raise data_error(f"{name} data: file or directory not found{hint}", path=p)
            frames[name] = load_labeled(p, **options)
        if len(frames) == 1:
            data = prepare(
                frames["train"], seed=seed, val_frac=val_frac, test_frac=test_frac, source=str(train_path)
            )
        else:
            for name, frame in frames.items():
                if "split" in frame.columns:
                    # the file was named as one split, which overrides what its rows say
                    warnings.warn(
                        f"{frame['_source'].iloc[0]}: ignoring its 'split' column; it was given as the {name} data",
                        DataWarning,
                        stacklevel=2,
                    )
                    frames[name] = frame.drop(columns="split")
            data = prepare_splits(
                frames["train"],
                frames.get("validation"),
                frames.get("test"),
                seed=seed,
                val_frac=val_frac,
                test_frac=test_frac,
                source=str(train_path),
            )
    return limit_data(data, limit, seed=seed) if limit is not None else data


def limit_data(data: PreparedData, limit: int, *, seed: int = 42) -> PreparedData:
    """Shrink prepared data for a quick run: at most ``limit`` training rows and ``max(limit // 4, number of
    labels)`` validation/test rows, stratified and seeded, every label kept where the size allows.
    Fingerprints and card are recomputed; ``card["limit"]`` records the original sizes."""
    if limit < len(data.labels):
        raise ConfigError(f"limit {limit} is below the number of labels ({len(data.labels)}); raise it")
    eval_cap = max(limit // 4, len(data.labels))
    caps = {"train": limit, "validation": eval_cap, "test": eval_cap}
    splits = {name: subsample(df, caps[name], seed=seed) for name, df in data.splits().items()}
    fps = {name: fingerprint(df) for name, df in splits.items()}
    old = data.card
    card = build_card(
        splits,
        labels=data.labels,
        fingerprints=fps,
        dedup=old.get("dedup", {}),
        leakage=old.get("leakage", {}),
        source=data.source,
        sources=old.get("sources", {}),
        split=old.get("split", {}),
    )
    for key, value in old.items():
        card.setdefault(key, value)  # keep extras such as "builtin"
    card["limit"] = {
        "limit": limit,
        "caps": caps,
        "rows_before": {name: len(df) for name, df in data.splits().items()},
        "fingerprint_before": old.get("fingerprint"),
    }
    return PreparedData(
        splits["train"], splits["validation"], splits["test"], data.labels, fps, card, data.source
    )

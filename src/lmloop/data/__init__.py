"""lmloop's data layer: load labelled text from files or built-in sets, validate it with located errors,
de-duplicate, split, fingerprint and describe it in a data card.

Most callers need only :func:`load_data`, which returns a :class:`PreparedData`.
"""

from __future__ import annotations

from lmloop.data._util import DataWarning
from lmloop.data.api import limit_data, load_data
from lmloop.data.builtin import BUILTIN_DATASETS, load_builtin, read_vader
from lmloop.data.card import build_card, card_markdown, write_card
from lmloop.data.load import FORMATS, detect_format, load_labeled
from lmloop.data.prepare import (
    PreparedData,
    check_labels,
    dedupe,
    fingerprint,
    normalise_text,
    prepare,
    prepare_splits,
    split_frame,
    subsample,
)

__all__ = [
    "BUILTIN_DATASETS",
    "FORMATS",
    "DataWarning",
    "PreparedData",
    "build_card",
    "card_markdown",
    "check_labels",
    "dedupe",
    "detect_format",
    "fingerprint",
    "limit_data",
    "load_builtin",
    "load_data",
    "load_labeled",
    "normalise_text",
    "prepare",
    "prepare_splits",
    "read_vader",
    "split_frame",
    "subsample",
    "write_card",
]

"""Built-in data sets.

``vader-sentiment``: the human-rated sentence sets of Hutto & Gilbert (ICWSM 2014, the VADER paper),
binarised into positive/negative sentiment across four domains. Construction:

1. Read the four ``*_GroundTruth.txt`` files (tab-separated, no header: id, mean human valence on -4..4,
   text; CRLF line endings; UTF-8) as domains ``tweets`` (tweets_GroundTruth.txt), ``movies``
   (movieReviewSnippets_GroundTruth.txt), ``amazon`` (amazonReviewSnippets_GroundTruth.txt) and ``nyt``
   (nytEditorialSnippets_GroundTruth.txt). The domain column is ``domain``.
2. Label ``positive`` if valence >= 0.5, ``negative`` if valence <= -0.5; anything in between (neutral) is
   dropped. Rows kept: tweets 3,432 (2,345 positive), movies 10,072 (4,996 positive), amazon 2,985
   (1,750 positive), nyt 2,970 (1,187 positive); 19,459 in all.
3. De-duplicate (exact and normalised text; copies with conflicting labels dropped), as
   :func:`lmloop.data.prepare.dedupe`, across all domains (the first copy, in the domain order above, is
   kept): 49 exact and 82 normalised duplicates removed, no label conflicts; 19,328 rows remain
   (tweets 3,363, movies 10,070, amazon 2,967, nyt 2,928).
4. Split stratified by label x domain, 80/10/10, seed 42. Final sizes, positive/negative:

   ========  ==========================  ===================  ===================
   domain    train                       validation           test
   ========  ==========================  ===================  ===================
   tweets    2,689 (1,851/838)           337 (232/105)        337 (232/105)
   movies    8,056 (3,995/4,061)         1,007 (500/507)      1,007 (500/507)
   amazon    2,375 (1,391/984)           296 (173/123)        296 (173/123)
   nyt       2,342 (940/1,402)           293 (117/176)        293 (117/176)
   all       15,462 (8,177/7,285)        1,933 (1,022/911)    1,933 (1,022/911)
   ========  ==========================  ===================  ===================

   Combined fingerprint (``PreparedData.fingerprint``): ``0496ee6402c5fffa``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from lmloop.data._util import data_error, read_utf8
from lmloop.data.prepare import PreparedData, prepare
from lmloop.errors import AssetError, DataError

VADER_FILES = {
    "tweets": "tweets_GroundTruth.txt",
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
# Valence at or beyond these bounds counts as clearly positive/negative; in between is neutral and dropped.
POSITIVE_MIN = 0.5
NEGATIVE_MAX = -0.5

BUILTIN_DATASETS = {
    "vader-sentiment": (
        "English sentences rated by humans (VADER, Hutto & Gilbert 2014), positive vs negative, "
        "4 domains (tweets, movies, amazon, nyt); stratified 80/10/10 split, seed 42"
    ),
}


def read_vader(directory: str | os.PathLike, *, keep_neutral: bool = False) -> pd.DataFrame:
    """Read the four VADER ground-truth files in ``directory`` into a frame with ``text``, ``label``
    (positive/negative; ``neutral`` too when ``keep_neutral``), ``domain``, ``valence``, ``_row`` (line)
    and ``_source``. Raises DataError naming the file and line for a malformed line or missing file."""
    d = Path(directory)
    missing = [name for name in VADER_FILES.values() if not (d / name).is_file()]
    if missing:
        raise data_error(f"VADER data incomplete; missing {', '.join(missing)}", path=d)
    frames = [_read_vader_file(d / name, domain, keep_neutral) for domain, name in VADER_FILES.items()]
    return pd.concat(frames, ignore_index=True)


def _read_vader_file(path: Path, domain: str, keep_neutral: bool) -> pd.DataFrame:
    texts, labels, valences, rows = [], [], [], []
    for i, line in enumerate(read_utf8(path).split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise data_error(
                f"expected 3 tab-separated fields (id, mean valence, text), found {len(parts)}",
                path=path,
                line=i,
            )
        try:
            valence = float(parts[1])
        except ValueError:
            valence = math.nan
        if not -4 <= valence <= 4:  # also false for NaN
            raise data_error(
                f"expected a valence number from -4 to 4, found {parts[1]!r}",
                path=path,
                line=i,
                field="valence",
            )
        text = parts[2].strip()
        if not text:
            raise data_error("empty text", path=path, line=i, field="text")
        if valence >= POSITIVE_MIN:
            label = "positive"
        elif valence <= NEGATIVE_MAX:
            label = "negative"
        elif keep_neutral:
            label = "neutral"
        else:
            continue
        texts.append(text)
        labels.append(label)
        valences.append(valence)
        rows.append(i)
    if not texts:
        raise data_error("no rated sentences found", path=path)
    return pd.DataFrame(
        {
            "text": texts,
            "label": labels,
            "domain": domain,
            "valence": valences,
            "_row": pd.array(rows, dtype="Int64"),
            "_source": str(path),
        }
    )


def load_builtin(name: str, *, seed: int = 42) -> PreparedData:
    """Load a built-in data set by name (see ``BUILTIN_DATASETS``), prepared as its module docstring
    describes. ``seed`` other than 42 gives a different split than the documented one."""
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown built-in data set '{name}'; available: {', '.join(BUILTIN_DATASETS)}")
    try:
        from lmloop.assets import vader_dir
    except ImportError as e:
        raise AssetError(
            f"built-in data set '{name}' needs lmloop.assets, which is unavailable ({e})"
        ) from None
    directory = vader_dir()
    df = read_vader(directory).drop(columns="valence")
    data = prepare(
        df,
        seed=seed,
        val_frac=0.1,
        test_frac=0.1,
        stratify=("label", "domain"),
        source=f"builtin:{name} ({directory})",
    )
    data.card["builtin"] = {"name": name, "description": BUILTIN_DATASETS[name]}
    return data

"""Lineage both ways: from a model version up to its run, data and feedback; from a feedback record down
to the versions that learned from it.

A version trained on feedback carries the ids of those feedback records in a tag as ranges
(``"12-480,502,510-530"``: ids arrive in order, so a few thousand records usually take a few dozen
characters) and, always, as ``feedback_ids.json`` in its model directory (logged with the model). When the
ranges do not fit a tag (:data:`MAX_TAG_CHARS`: PostgreSQL's column for registry tags), the file is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmloop.errors import ConfigError

MAX_TAG_CHARS = 5000
IDS_FILE = "feedback_ids.json"


def encode_ids(ids: Iterable[int]) -> str:
    """Sorted, de-duplicated ids as ranges: [1, 2, 3, 7, 9, 10] -> "1-3,7,9-10"."""
    xs = sorted({int(i) for i in ids})
    out: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def decode_ids(text: str) -> list[tuple[int, int]]:
    """``encode_ids`` text (or a JSON list, the older form) -> inclusive (lo, hi) ranges."""
    text = (text or "").strip()
    if not text:
        return []
    if text.startswith("["):
        return [(int(i), int(i)) for i in json.loads(text) if str(i).isdigit()]  # older tags: prediction ids
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.append((int(lo), int(hi or lo)))
    return out


def contains(ranges: list[tuple[int, int]], i: int) -> bool:
    return any(lo <= i <= hi for lo, hi in ranges)


def write_ids(model_dir: str | Path, feedback_ids: Iterable[int], prediction_ids: Iterable[str] = ()) -> Path:
    """``feedback_ids.json`` in a model directory: the feedback records (and their predictions' ids) it is
    about to be trained on."""
    p = Path(model_dir) / IDS_FILE
    doc = {"train": sorted({int(i) for i in feedback_ids}), "predictions": sorted(set(prediction_ids))}
    p.write_text(json.dumps(doc), encoding="utf-8")
    return p


def _read_ids(reg, v) -> dict | None:
    local = Path(v.tags.get("lmloop.model_dir", "")) / IDS_FILE
    path = local if local.is_file() else reg.resolve(v.uri) / IDS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


@dataclass
class Lineage:
    """One version and where it came from (``lmloop registry lineage NAME VERSION``)."""

    name: str
    version: int
    run_id: str | None
    train_run_id: str | None
    base_model: str
    data: dict[str, str]  # split -> sha256
    feedback: dict[str, Any]  # n, fingerprint, ranges
    ancestors: list[dict[str, Any]] = field(
        default_factory=list
    )  # parent, grandparent, ... (version, reason)
    aliases: list[str] = field(default_factory=list)


def _version_ranges(reg, v) -> list[tuple[int, int]] | None:
    """The feedback ids a version learned from; None when it recorded none."""
    fb = v.feedback or {}
    if fb.get("ids"):
        return decode_ids(fb["ids"])
    if not int(fb.get("n") or 0):
        return None
    # too many ranges for a tag: read the list from the model directory (local, else downloaded once)
    doc = _read_ids(reg, v)
    return [(i, i) for i in doc.get("train", [])] if doc else None


def trained_on(
    reg, feedback_id: int | None = None, name: str | None = None, *, prediction: str | None = None
) -> list:
    """Every registered version (of ``name``, or of every model) whose training data held this feedback
    record (its integer id) or the labelled prediction (its id), oldest first."""
    if (feedback_id is None) == (prediction is None):
        raise ConfigError("give one of a feedback id (--feedback ID) or a prediction id (--prediction ID)")
    if feedback_id is not None and feedback_id < 1:
        raise ConfigError(f"--feedback: a feedback id is a positive integer, got {feedback_id}")
    out = []
    for v in reg.list(name):
        if not int((v.feedback or {}).get("n") or 0):
            continue
        if prediction is not None:
            doc = _read_ids(reg, v)
            if doc and prediction in doc.get("predictions", []):
                out.append(v)
            continue
        r = _version_ranges(reg, v)
        if r and contains(r, feedback_id):
            out.append(v)
    return out


def lineage(reg, name: str, ref: str | int | None = None) -> Lineage:
    """The version (default: champion), its runs, data, feedback and its chain of parents."""
    v = reg.show(name, ref)
    chain, seen, parent = [], {v.version}, v.parent
    while parent is not None and parent not in seen:
        seen.add(parent)
        p = reg.show(name, parent)
        chain.append({"version": p.version, "reason": p.description, "aliases": p.aliases,
                      "feedback_n": int((p.feedback or {}).get("n") or 0)})  # fmt: skip
        parent = p.parent
    fb = dict(v.feedback or {})
    return Lineage(
        name=v.name,
        version=v.version,
        run_id=v.run_id,
        train_run_id=v.tags.get("lmloop.train_run_id"),
        base_model=v.base_model,
        data=dict(v.data_fingerprints),
        feedback={"n": int(fb.get("n") or 0), "fingerprint": fb.get("fingerprint"), "ids": fb.get("ids")},
        ancestors=chain,
        aliases=v.aliases,
    )


def format_lineage(x: Lineage) -> str:
    lines = [f"{x.name} v{x.version}" + (f"  [{', '.join(x.aliases)}]" if x.aliases else "")]
    lines.append(
        f"  run          {x.run_id or '-'}" + (f" (training run {x.train_run_id})" if x.train_run_id else "")
    )
    lines.append(f"  base model   {x.base_model or '-'}")
    for split, fp in sorted(x.data.items()):
        lines.append(f"  data.{split:<8}{fp[:16]}")
    if x.feedback["n"]:
        ids = x.feedback.get("ids") or f"(in {IDS_FILE})"
        lines.append(
            f"  feedback     {x.feedback['n']} records, fingerprint {x.feedback.get('fingerprint') or '-'}"
        )
        lines.append(f"  feedback ids {ids if len(ids) <= 200 else ids[:200] + '...'}")
    else:
        lines.append("  feedback     none")
    for a in x.ancestors:
        lines.append(f"  <- v{a['version']}" + (f" [{', '.join(a['aliases'])}]" if a["aliases"] else "")
                     + f"  {a['reason'] or ''}".rstrip())  # fmt: skip
    return "\n".join(lines)

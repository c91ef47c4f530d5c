"""The data card: what went into each split, as a JSON-able dict and a readable Markdown page."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from lmloop.data._util import SPLITS

_PERCENTILES = (5, 50, 95, 99)


def combined_fingerprint(fingerprints: dict[str, str]) -> str:
    """16-hex digest over the train/validation/test fingerprints: one tag for 'exactly this data'."""
    joined = "\n".join(f"{k}:{fingerprints[k]}" for k in SPLITS)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def length_stats(lengths) -> dict:
    """p5/p50/p95/p99/max/mean of a sequence of lengths (None values when it is empty)."""
    arr = np.asarray(list(lengths), dtype=float)
    keys = [f"p{p}" for p in _PERCENTILES] + ["max", "mean"]
    if arr.size == 0:
        return dict.fromkeys(keys)
    values = [*np.percentile(arr, _PERCENTILES), arr.max(), arr.mean()]
    return {k: round(float(v), 1) for k, v in zip(keys, values, strict=True)}


def split_summary(df: pd.DataFrame, labels: list[str]) -> dict:
    """Rows, label counts and fractions, domain counts and text length percentiles of one split."""
    n = len(df)
    counts = df["label"].value_counts()
    # training labels first, in their order, then anything else present
    order = list(labels) + sorted(set(counts.index) - set(labels))
    label_counts = {lab: int(counts.get(lab, 0)) for lab in order}
    summary = {
        "rows": n,
        "label_counts": label_counts,
        "label_fractions": {lab: (round(c / n, 4) if n else 0.0) for lab, c in label_counts.items()},
    }
    if "domain" in df.columns:
        summary["domain_counts"] = {str(k): int(v) for k, v in sorted(df["domain"].value_counts().items())}
    summary["length_chars"] = length_stats(df["text"].str.len())
    summary["length_words"] = length_stats(len(t.split()) for t in df["text"])
    return summary


def build_card(
    splits: dict[str, pd.DataFrame],
    *,
    labels: list[str],
    fingerprints: dict[str, str],
    dedup: dict,
    leakage: dict,
    source: str,
    sources: dict[str, str],
    split: dict,
) -> dict:
    """Assemble the data card dict (JSON-serialisable) from the final splits and the preparation stats."""
    from lmloop import __version__

    return {
        "source": source,
        "sources": sources,
        "labels": list(labels),
        "num_labels": len(labels),
        "rows": {name: len(df) for name, df in splits.items()},
        "splits": {name: split_summary(df, labels) for name, df in splits.items()},
        "dedup": dedup,
        "leakage": leakage,
        "split": split,
        "fingerprints": {name: {"sha256": fp, "short": fp[:16]} for name, fp in fingerprints.items()},
        "fingerprint": combined_fingerprint(fingerprints),
        "created_by": f"lmloop {__version__}",
    }


def write_card(card: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``data_card.json`` and ``data_card.md`` into ``out_dir`` (created if needed); return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "data_card.json", out / "data_card.md"
    json_path.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(card_markdown(card), encoding="utf-8")
    return json_path, md_path


def card_markdown(card: dict) -> str:
    """Render a data card dict as Markdown: sources, split sizes, label and domain balance, lengths,
    de-duplication, leakage and fingerprints."""
    splits = card.get("splits", {})
    names = list(splits)
    lines = [f"# Data card: {card.get('source') or 'data'}", ""]
    lines += [f"- Labels ({card.get('num_labels', 0)}): {', '.join(card.get('labels', []))}"]
    lines += [f"- Fingerprint: `{card.get('fingerprint', '')}`"]
    split = card.get("split", {})
    if split:
        how = ", ".join(f"{k}: {v}" for k, v in split.get("method", {}).items())
        lines += [
            f"- Split: {how}; seed {split.get('seed')}, val_frac {split.get('val_frac')}, "
            f"test_frac {split.get('test_frac')}, stratified on {' x '.join(split.get('stratify', [])) or 'nothing'}"
        ]
    if card.get("limit"):
        lines += [f"- Limited for a quick run: {card['limit']}"]
    lines += ["", "## Sources", ""] + [f"- {k}: {v}" for k, v in card.get("sources", {}).items()]

    lines += [
        "",
        "## Splits",
        "",
        _row(["split", "rows", *card.get("labels", [])]),
        _rule(2 + card.get("num_labels", 0)),
    ]
    for name in names:
        s = splits[name]
        cells = [f"{c} ({s['label_fractions'].get(lab, 0):.1%})" for lab, c in s["label_counts"].items()]
        lines.append(_row([name, s["rows"], *cells[: card.get("num_labels", 0)]]))

    domains = sorted({d for s in splits.values() for d in s.get("domain_counts", {})})
    if domains:
        lines += ["", "## Domains", "", _row(["split", *domains]), _rule(1 + len(domains))]
        for name in names:
            lines.append(_row([name, *(splits[name].get("domain_counts", {}).get(d, 0) for d in domains)]))

    lines += [
        "",
        "## Text length",
        "",
        _row(["split", "unit", "p5", "p50", "p95", "p99", "max", "mean"]),
        _rule(8),
    ]
    for name in names:
        for unit in ("chars", "words"):
            st = splits[name][f"length_{unit}"]
            lines.append(_row([name, unit, *(st[k] for k in ("p5", "p50", "p95", "p99", "max", "mean"))]))

    lines += ["", "## De-duplication", ""]
    for name, st in card.get("dedup", {}).items():
        if st.get("skipped"):
            lines.append(f"- {name}: skipped ({st['rows_in']} rows)")
            continue
        lines.append(
            f"- {name}: {st['rows_in']} -> {st['rows_out']} rows; exact duplicates {st['exact_duplicates_removed']}, "
            f"normalised duplicates {st['normalised_duplicates_removed']}, conflicting labels "
            f"{st['conflicting_label_rows_removed']} rows ({st['conflicting_label_texts']} texts)"
        )
        for ex in st.get("conflict_examples", []):
            lines.append(f"  - {ex['text']!r}: {', '.join(ex['labels'])} ({', '.join(ex['where'])})")

    leak = card.get("leakage", {})
    lines += ["", "## Leakage", ""]
    for pair in ("train_validation", "train_test"):
        if pair in leak:
            st = leak[pair]
            lines.append(
                f"- {pair}: {st['shared_texts']} shared texts, {st['train_rows_removed']} train rows removed"
            )
    if "validation_test_shared_texts" in leak:
        lines.append(f"- validation_test: {leak['validation_test_shared_texts']} shared texts (kept)")

    lines += ["", "## Fingerprints (sha256)", ""]
    lines += [f"- {k}: `{v['sha256']}`" for k, v in card.get("fingerprints", {}).items()]
    return "\n".join(lines) + "\n"


def _row(cells) -> str:
    return "| " + " | ".join("" if c is None else str(c) for c in cells) + " |"


def _rule(n: int) -> str:
    return "|" + "---|" * n

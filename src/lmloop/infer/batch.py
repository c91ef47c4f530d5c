"""Batch prediction over files of any size: ``lmloop predict``.

Reads ``window`` rows at a time (:func:`lmloop.infer.stream.read_chunks`), tokenises the window once,
lets the predictor sort it by length so batches pad to near-equal lengths, and writes the window's
rows back in input order (:class:`lmloop.infer.stream.ChunkWriter`: temp file + atomic rename). Memory
is bounded by the window, not the file.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class BatchResult:
    rows: int
    seconds: float
    backend: str
    output: str

    @property
    def items_per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


def score_columns(labels: list[str]) -> list[str]:
    return [f"score_{lab}" for lab in labels]


def predict_file(
    predictor,
    input_path: str | Path,
    output_path: str | Path,
    *,
    text_column: str = "text",
    id_column: str = "id",
    keep_columns: bool = True,
    keep_text: bool = False,
    window: int = 4096,
    input_format: str | None = None,
    output_format: str | None = None,
    progress: bool = True,
) -> BatchResult:
    """Label every row of ``input_path`` into ``output_path``: id, [other input columns], label, score,
    score_<class> for each class. ``keep_text`` also copies the text column (off by default: outputs of
    large corpora stay small and no text is duplicated by accident)."""
    from tqdm.auto import tqdm

    from lmloop.infer.stream import ChunkWriter, count_rows, detect_format, read_chunks

    fmt = detect_format(input_path, input_format)
    out_fmt = detect_format(output_path, output_format, option="--output-format")
    labels = predictor.labels
    extra = ["label", "score", *score_columns(labels)]
    total = count_rows(input_path, fmt)
    t0 = time.perf_counter()
    n = 0
    chunks = read_chunks(input_path, text_column=text_column, id_column=id_column, chunk_rows=window, fmt=fmt)
    # read the first chunk before any progress bar or output file: bad input fails fast and cleanly
    first = next(chunks, None)
    chunks = itertools.chain([first] if first is not None else [], chunks)
    bar = tqdm(total=total, unit="items", desc="predict", disable=not progress, smoothing=0.1)
    with ChunkWriter(output_path, fmt=out_fmt, columns_hint=[id_column, *extra]) as writer:
        for chunk in chunks:
            probs = predictor.predict_proba(chunk[text_column].tolist())  # (N, C)
            cols = (
                [c for c in chunk.columns if c != text_column or keep_text] if keep_columns else [id_column]
            )
            out = chunk[cols].copy()
            for c in extra:  # an input column named like an output column would be ambiguous
                if c in out.columns:
                    out = out.rename(columns={c: f"input_{c}"})
            k = probs.argmax(1) if len(probs) else np.zeros(0, dtype=int)
            out["label"] = [labels[i] for i in k]
            out["score"] = probs.max(1) if len(probs) else np.zeros(0, dtype=np.float32)
            for j, c in enumerate(score_columns(labels)):
                out[c] = probs[:, j]
            writer.write(out)
            n += len(out)
            bar.update(len(out))
    bar.close()
    return BatchResult(n, time.perf_counter() - t0, predictor.backend_name, str(output_path))

"""Batch prediction for sequence classifiers.

Texts are tokenised once, sorted by length so each batch pads to a near-equal length, run through
the exact fast forward (:mod:`lmloop.models`) under ``torch.inference_mode``, then put back in input
order. Used by ``lmloop evaluate`` and by the fine-tuning stage's evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

META_FILE = "lmloop.json"


@dataclass
class Prediction:
    label: str
    score: float
    scores: dict[str, float]


def read_meta(model_dir: str | Path) -> dict:
    """The ``lmloop.json`` written next to a fine-tuned model (labels, max_length, data fingerprints)."""
    p = Path(model_dir) / META_FILE
    if p.is_file():
        return json.loads(p.read_text())
    return {}


class Predictor:
    """Holds a tokenizer + classifier; ``predict_proba(texts) -> (N, C)``, ``predict(texts) -> [Prediction]``."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        labels: list[str],
        max_length: int = 128,
        batch_size: int = 64,
        precision: str = "fp32",
        fast: bool = True,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.labels, self.max_length, self.batch_size = list(labels), max_length, batch_size
        self.precision, self.fast = precision, fast

    @classmethod
    def from_ref(cls, ref: str, *, batch_size: int = 64, precision: str = "auto") -> Predictor:
        from lmloop.assets import resolve_model
        from lmloop.models import load_classifier
        from lmloop.train import pick_precision

        path = resolve_model(ref)
        tok, model = load_classifier(path)
        meta = read_meta(path)
        id2label = model.config.id2label
        labels = meta.get("labels") or [id2label[i] for i in range(len(id2label))]
        return cls(
            model,
            tok,
            labels=labels,
            max_length=int(meta.get("max_length", 128)),
            batch_size=batch_size,
            precision=pick_precision(precision),
        )

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    def predict_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Softmax probabilities (N, C) for pre-tokenised inputs, in input order."""
        import torch

        from lmloop.models import classifier_logits
        from lmloop.train import pad_batch

        n = len(ids)
        out = np.zeros((n, len(self.labels)), dtype=np.float32)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        pad = self.tokenizer.pad_token_id or 0
        with (
            torch.inference_mode(),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"),
        ):
            for s in range(0, n, self.batch_size):
                idx = order[s : s + self.batch_size]
                input_ids, mask = pad_batch([ids[i] for i in idx], pad)
                logits = classifier_logits(self.model, input_ids, mask, fast=self.fast).float()
                out[idx] = torch.softmax(logits, dim=-1).numpy()
        return out

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.predict_ids(self.encode(texts))

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        probs = self.predict_proba(texts)
        preds = []
        for row in probs:
            k = int(row.argmax())
            preds.append(
                Prediction(
                    self.labels[k],
                    float(row[k]),
                    {lab: float(p) for lab, p in zip(self.labels, row, strict=False)},
                )
            )
        return preds


def load(ref: str, **kwargs) -> Predictor:
    """Notebook entry point: ``lmloop.load("runs/sentiment").predict(["great!"])``."""
    return Predictor.from_ref(ref, **kwargs)

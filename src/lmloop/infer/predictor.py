"""Batch prediction for sequence classifiers.

Texts are tokenised once, sorted by length so each batch pads to a near-equal length, run through a
backend (:mod:`lmloop.infer.backends`: eager torch, int8, ONNX Runtime), then put back in input order.
Used by ``lmloop predict``/``evaluate``/``serve`` and by the fine-tuning stage's evaluation.
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
    """Tokenizer + backend; ``predict_proba(texts) -> (N, C)``, ``predict(texts) -> [Prediction]``.

    ``model`` is the PyTorch classifier (None for an ONNX-only export). Without an explicit ``backend``
    the predictor runs ``model`` in eager PyTorch, which is what fine-tuning's evaluation uses (it sees
    the weights change between evaluations).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        labels: list[str],
        max_length: int = 128,
        batch_size: int = 32,
        precision: str = "fp32",
        fast: bool = True,
        backend=None,
    ):
        from lmloop.infer.backends import TorchBackend

        self.model, self.tokenizer = model, tokenizer
        self.labels, self.max_length, self.batch_size = list(labels), max_length, batch_size
        self.backend = backend or TorchBackend(model, precision=precision, fast=fast)
        self.calibration: dict | None = None  # the backends.json entry behind an `auto` choice
        # temperature scaling (lmloop.calibration): probabilities are softmax(logits / T); labels never change
        self.temperature: float = 1.0
        self.overhead_tokens = 64  # a forward pass's fixed cost in token-equivalents (plan_batches)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @classmethod
    def from_ref(
        cls,
        ref: str,
        *,
        backend: str = "torch",
        batch_size: int = 32,
        precision: str = "fp32",
        recalibrate: bool = False,
        calibrated: bool = True,
        say=None,
    ) -> Predictor:
        """Load a model directory / packaged name / Hub id on ``backend`` (``auto``: measured, cached).

        ``precision`` applies to an explicit ``torch`` backend (default fp32: exact; 'auto' takes bf16
        only where measured faster). Under ``auto``, torch is the fp32 reference and torch-bf16 a candidate.
        With ``calibrated`` (default) the temperature in the directory's ``calibration.json`` is applied to
        the probabilities on every backend; ``calibrated=False`` gives the raw softmax.
        """
        from lmloop.assets import resolve_model
        from lmloop.infer import backends as bk
        from lmloop.train import pick_precision

        if backend not in bk.CHOICES:
            from lmloop.errors import ConfigError

            raise ConfigError(f"unknown backend '{backend}'; choose one of: {', '.join(bk.CHOICES)}")
        path = Path(resolve_model(ref))
        meta = read_meta(path)
        onnx_only = not (path / "model.safetensors").is_file() and (path / "model.onnx").is_file()
        if onnx_only:
            tok, model = _load_tokenizer(path), None
            labels = meta.get("labels") or _config_labels(path)
        else:
            from lmloop.models import load_classifier

            tok, model = load_classifier(str(path))
            id2label = model.config.id2label
            labels = meta.get("labels") or [id2label[i] for i in range(len(id2label))]
        threads = bk._threads()
        from lmloop.calibration import temperature_of

        temperature = temperature_of(path) if calibrated else 1.0
        kw = dict(labels=labels, max_length=int(meta.get("max_length", 128)), batch_size=batch_size)

        def make(name: str) -> Predictor:
            if name == "torch" and model is not None:
                from lmloop.models import supports_fast_path

                # under auto, "torch" is the exact fp32 reference the others are measured against
                # (torch-bf16 is a candidate of its own); `precision` applies to an explicit "torch"
                prec = pick_precision(precision) if backend == "torch" else "fp32"
                b = bk.TorchBackend(model, precision=prec, fast=supports_fast_path(model))
            else:
                b = bk.build_backend(name, path, model=model, tokenizer=tok, threads=threads)
            p = cls(model, tok, backend=b, **kw)
            p.temperature = temperature
            return p

        if backend != "auto":
            return make(backend)
        entry = None if recalibrate else bk.cached_choice(path, threads, batch_size)
        if entry is None:
            if bk.read_validation(path) is None:
                # nothing to measure accuracy on: the exact backend is the only safe choice
                return make("torch" if model is not None else "onnx")
            say = say or (lambda m: print(f"[lmloop] {m}", flush=True))
            cands, skipped = bk.available_backends(path, model is not None)
            say(
                f"measuring backends {', '.join(cands)} on {path / 'validation.jsonl'} ({threads} threads) ..."
            )
            for name, why in skipped.items():
                say(f"  {name:11s} skipped: {why}")
            entry = bk.calibrate(
                path,
                make_predictor=make,
                candidates=cands,
                skipped=skipped,
                threads=threads,
                batch_size=batch_size,
                say=say,
            )
            say(f"auto -> {entry['chosen']} (recorded in {path / bk.CALIBRATION_FILE})")
        pred = make(entry["chosen"])
        pred.calibration = entry
        return pred

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    def predict_logits(self, ids: Sequence[Sequence[int]], on_rows=None) -> np.ndarray:
        """Logits (N, C) for pre-tokenised inputs, in input order.

        ``on_rows(idx, logits)`` is called after every forward pass with the input positions it covered:
        the server answers each request as soon as its texts are done instead of after the whole batch.

        Sorted by length (longest first), then cut into batches by :func:`plan_batches` so each pads to
        a near-equal length: on the vader test split sorting alone is ~2x over batching in input order,
        and on a server's micro-batch of 64 mixed-length texts the cut is another ~2x over one batch.
        """
        n = len(ids)
        out = np.zeros((n, len(self.labels)), dtype=np.float32)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        lengths = [len(ids[i]) for i in order]
        pad = self.tokenizer.pad_token_id or 0
        for s, e in plan_batches(lengths, self.batch_size, self.overhead_tokens):
            idx = order[s:e]
            input_ids, mask = pad_numpy([ids[i] for i in idx], pad)
            out[idx] = self.backend.logits(input_ids, mask)
            if on_rows is not None:
                on_rows(idx, out[idx])
        return out

    def predict_ids(self, ids: Sequence[Sequence[int]], on_rows=None) -> np.ndarray:
        """Softmax probabilities (N, C) of ``logits / temperature`` for pre-tokenised inputs, in input
        order (``on_rows`` gets probabilities too)."""
        t = self.temperature
        cb = None if on_rows is None else (lambda idx, logits: on_rows(idx, softmax(logits / t)))
        return softmax(self.predict_logits(ids, cb) / t)

    def predict_proba(self, texts: Sequence[str], on_rows=None) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.predict_ids(self.encode(texts), on_rows)

    def to_predictions(self, probs: np.ndarray) -> list[Prediction]:
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

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        return self.to_predictions(self.predict_proba(texts))


def plan_batches(lengths: Sequence[int], max_batch: int, overhead_tokens: int = 64) -> list[tuple[int, int]]:
    """Cut a longest-first list of lengths into batches [(start, end)] that minimise padded work.

    Cost of a batch = ``overhead_tokens`` (a forward pass's fixed cost, in token-equivalents) + its
    size x its longest length (the padded tokens computed). Exact dynamic programme over the sorted
    list, O(N * max_batch): ~10 ms for a 4,096-row window, nothing next to the model.
    """
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest plan for the first j items
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_batch), j):
            # items i..j-1 in one batch; lengths[i] is its longest (sorted descending)
            c = best[i] + overhead_tokens + (j - i) * lengths[i]
            if c < best[j]:
                best[j], cut[j] = c, i
    plan, j = [], n
    while j > 0:
        plan.append((cut[j], j))
        j = cut[j]
    return plan[::-1]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def pad_numpy(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest: (B, T) int64 ids and (B, T) int64 attention mask."""
    T = max((len(s) for s in seqs), default=0)
    ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def _config_labels(path: Path) -> list[str]:
    cfg = json.loads((path / "config.json").read_text())
    id2label = cfg.get("id2label") or {}
    return [id2label[str(i)] for i in range(len(id2label))]


def load(ref: str, *, backend: str = "auto", **kwargs) -> Predictor:
    """Notebook entry point: ``lmloop.load("runs/sentiment").predict(["great!"])``.

    ``backend='auto'`` uses the fastest backend measured to keep accuracy (see
    :mod:`lmloop.infer.backends`); the first call on a machine measures (~30 s for MiniLM), later calls
    read the recorded choice. ``backend='torch'`` is the exact fp32 model.
    """
    return Predictor.from_ref(ref, backend=backend, **kwargs)

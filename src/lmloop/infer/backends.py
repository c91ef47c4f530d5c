"""Inference backends for sequence classifiers, and the measured choice between them.

A backend maps one padded batch to logits: ``logits(input_ids (B, T) int64, mask (B, T) int64) -> (B, C)``.

==============  ==========================================================================================
``torch``       fp32 eager PyTorch with the exact [CLS]-only last layer (:mod:`lmloop.models`)
``torch-bf16``  the same under bf16 autocast (only pays off on CPUs with native bf16: AVX-512-BF16 / AMX)
``torch-int8``  dynamic int8 quantisation of every Linear (per-channel weights, activations per batch)
``onnx``        ONNX Runtime, fp32, on the graph exported by :mod:`lmloop.infer.export`
``onnx-int8``   ONNX Runtime on the same graph with per-channel dynamic int8 MatMuls
==============  ==========================================================================================

``auto`` is not a guess: :func:`calibrate` runs each candidate over the model's saved validation split
(``validation.jsonl``, written by fine-tuning), times it, measures its accuracy, and picks the fastest
backend whose accuracy stays within ``tolerance`` points of fp32. The result is written to
``backends.json`` in the model directory, keyed by machine, thread count and model weights, so the
next ``auto`` on the same machine costs nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmloop.errors import ConfigError, LmloopError

BACKENDS = ("torch", "torch-bf16", "torch-int8", "onnx", "onnx-int8")
CHOICES = ("auto", *BACKENDS)
CALIBRATION_FILE = "backends.json"
ONNX_DIR = "onnx"  # inside a model directory: cached exports used by the onnx backends
DEFAULT_TOLERANCE = 0.3  # accuracy points a faster backend may lose against fp32


class TorchBackend:
    """Eager PyTorch. ``precision`` 'fp32' or 'bf16' (autocast); ``fast`` = exact [CLS]-only last layer."""

    def __init__(self, model, *, precision: str = "fp32", fast: bool = True, name: str | None = None):
        self.model, self.precision, self.fast = model.eval(), precision, fast
        self.name = name or ("torch-bf16" if precision == "bf16" else "torch")

    def logits(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        from lmloop.models import classifier_logits

        ids, m = (
            torch.from_numpy(np.ascontiguousarray(input_ids)),
            torch.from_numpy(np.ascontiguousarray(mask)),
        )
        with (
            torch.inference_mode(),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"),
        ):
            return classifier_logits(self.model, ids, m, fast=self.fast).float().numpy()


def quantize_torch_int8(model):
    """A copy of ``model`` whose nn.Linear layers are dynamic int8 (per-channel weights), except the FFN
    down-projections (in_features == intermediate_size), kept fp32 for accuracy: see
    :func:`lmloop.infer.export.quantize_onnx` for why and the measurements.

    Per-channel scales keep noticeably more accuracy than one scale per tensor on MiniLM (measured:
    98.1% vs 97.0% agreement with fp32); activations are quantised per batch at run time.
    """
    import copy
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's "migrate to torchao" notice; the API works in 2.13
        m = copy.deepcopy(model).eval()
        inter = getattr(m.config, "intermediate_size", None)
        spec = {
            name: per_channel_dynamic_qconfig
            for name, mod in m.named_modules()
            if isinstance(mod, torch.nn.Linear) and mod.in_features != inter
        }
        return quantize_dynamic(m, spec)


class OnnxBackend:
    """ONNX Runtime on CPU with the graph's ``input_ids``/``attention_mask`` inputs and ``logits`` output."""

    def __init__(self, path: str | Path, *, threads: int | None = None, name: str = "onnx"):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or _threads()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.path, self.name = Path(path), name
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise LmloopError(f"ONNX Runtime could not load {path}: {str(e).splitlines()[0][:300]}") from None
        self.inputs = {i.name for i in self.session.get_inputs()}

    def logits(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids.astype(np.int64, copy=False)}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = mask.astype(np.int64, copy=False)
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        return self.session.run(["logits"], feed)[0]


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def onnx_paths(model_dir: Path) -> dict[str, Path]:
    """Where the onnx backends find their graphs: an export directory's own files, else the cache."""
    model_dir = Path(model_dir)
    if (model_dir / "model.onnx").is_file():
        return {"onnx": model_dir / "model.onnx", "onnx-int8": model_dir / "model.int8.onnx"}
    return {
        "onnx": model_dir / ONNX_DIR / "model.onnx",
        "onnx-int8": model_dir / ONNX_DIR / "model.int8.onnx",
    }


def build_backend(
    name: str, model_dir: str | Path, *, model=None, tokenizer=None, threads: int | None = None
):
    """A ready backend for ``name``; exports/quantises the ONNX graph into the model dir when missing."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend '{name}'; choose one of: {', '.join(CHOICES)}")
    model_dir = Path(model_dir)
    if name.startswith("onnx"):
        paths = onnx_paths(model_dir)
        cached = paths["onnx"].parent / "source.json"
        if model is not None and paths["onnx"].parent.name == ONNX_DIR:
            # a cached export is only valid for the weights it was exported from (a resumed or re-run
            # fine-tune rewrites model.safetensors): re-export when they changed
            try:
                stale = json.loads(cached.read_text()).get("weights") != weights_key(model_dir)
            except (OSError, ValueError):
                stale = True
            if stale:
                for p in paths.values():
                    p.unlink(missing_ok=True)
        if not paths[name].is_file():
            if model is None:
                raise LmloopError(
                    f"{model_dir} has no {paths[name].name} and no PyTorch weights to export it from; "
                    "re-run `lmloop export` with --quantize int8, or pick another --backend"
                )
            from lmloop.infer.export import export_onnx, quantize_onnx

            if not paths["onnx"].is_file():
                export_onnx(model, tokenizer, paths["onnx"])
                from lmloop.fsutil import atomic_write_text

                atomic_write_text(cached, json.dumps({"weights": weights_key(model_dir)}))
            if name == "onnx-int8":
                quantize_onnx(paths["onnx"], paths["onnx-int8"])
        return OnnxBackend(paths[name], threads=threads, name=name)
    if model is None:
        raise LmloopError(f"{model_dir} holds only an ONNX export; use --backend onnx (or auto)")
    from lmloop.models import supports_fast_path

    fast = supports_fast_path(model)
    if name == "torch-int8":
        return TorchBackend(quantize_torch_int8(model), fast=fast, name="torch-int8")
    return TorchBackend(model, precision="bf16" if name == "torch-bf16" else "fp32", fast=fast)


# ------------------------------------------------------------------------------------------ calibration


def read_validation(model_dir: str | Path) -> tuple[list[str], list[str]] | None:
    """(texts, labels) of the validation split saved beside a fine-tuned model, or None."""
    p = Path(model_dir) / "validation.jsonl"
    if not p.is_file():
        return None
    texts, labels = [], []
    with p.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                r = json.loads(line)
                texts.append(str(r["text"]))
                labels.append(str(r["label"]))
    return texts, labels


def weights_key(model_dir: Path) -> str:
    """Identifies the weights a calibration was measured on (size + mtime of the weight files)."""
    parts = []
    for name in ("model.safetensors", "model.onnx"):
        p = Path(model_dir) / name
        if p.is_file():
            st = p.stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return ";".join(parts)


def machine_key(threads: int, batch_size: int) -> str:
    # int8 activations are scaled per batch, so accuracy (not only speed) depends on the batch size
    from lmloop.train import _cpu_key

    return f"{_cpu_key()}|threads{threads}|batch{batch_size}|ort{_ort_version()}"


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return "none"


def cached_choice(model_dir: str | Path, threads: int, batch_size: int = 32) -> dict | None:
    """The calibration recorded for this machine/threads/weights, if any."""
    p = Path(model_dir) / CALIBRATION_FILE
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    entry = doc.get("machines", {}).get(machine_key(threads, batch_size))
    if entry and entry.get("weights") == weights_key(Path(model_dir)):
        return entry
    return None


def available_backends(model_dir: Path, has_torch_weights: bool) -> tuple[list[str], dict[str, str]]:
    """Candidates worth measuring here, and the reason each other backend is skipped."""
    from lmloop.train import bf16_speedup

    cands, skipped = [], {}
    for name in BACKENDS:
        if name.startswith("torch") and not has_torch_weights:
            skipped[name] = "no PyTorch weights in this directory (an ONNX export)"
        elif name == "torch-bf16" and bf16_speedup() < 1.2:
            skipped[name] = f"no native bf16 on this CPU (bf16 GEMM measured {bf16_speedup():.2f}x fp32)"
        elif name.startswith("onnx") and _ort_version() == "none":
            skipped[name] = "onnxruntime is not installed"
        elif (
            name == "onnx-int8" and not has_torch_weights and not onnx_paths(model_dir)["onnx-int8"].is_file()
        ):
            skipped[name] = "the export has no model.int8.onnx"
        else:
            cands.append(name)
    return cands, skipped


def calibrate(
    model_dir: str | Path,
    *,
    make_predictor: Callable[[str], Any],
    candidates: Sequence[str],
    skipped: dict[str, str] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    threads: int,
    batch_size: int = 32,
    say: Callable[[str], None] = print,
) -> dict:
    """Measure each backend on the saved validation split; record and return the choice.

    ``make_predictor(name)`` builds a predictor on that backend. fp32 (``torch``, else ``onnx``) is the
    reference: a backend qualifies when its accuracy >= reference - ``tolerance`` points; the fastest
    qualifying one is chosen. Items/s is the best of two timed passes over the split (after a warm-up
    batch), so a noisy neighbour is less likely to decide the choice.
    """
    model_dir = Path(model_dir)
    val = read_validation(model_dir)
    if val is None:
        raise LmloopError(
            f"{model_dir} has no validation.jsonl to measure backends on (models fine-tuned by lmloop save "
            "it); pass an explicit --backend instead of auto"
        )
    texts, gold = val
    results: dict[str, dict] = {}
    ref_probs = None
    for name in candidates:
        t0 = time.perf_counter()
        pred = make_predictor(name)
        setup_s = time.perf_counter() - t0
        ids = pred.encode(texts)
        pred.predict_ids(ids[: pred.batch_size])  # warm-up (allocations, ORT first-run)
        best, probs = float("inf"), None
        for _ in range(2):
            t = time.perf_counter()
            probs = pred.predict_ids(ids)
            best = min(best, time.perf_counter() - t)
        labels = pred.labels
        y = np.array([labels.index(g) if g in labels else -1 for g in gold])
        acc = float((probs.argmax(1) == y).mean()) * 100
        if ref_probs is None:
            ref_probs = probs
        results[name] = {
            "accuracy": round(acc, 3),
            "items_per_s": round(len(texts) / best, 1),
            "agreement_with_reference": round(
                float((probs.argmax(1) == ref_probs.argmax(1)).mean()) * 100, 3
            ),
            "max_prob_diff": round(float(np.abs(probs - ref_probs).max()), 6),
            "setup_s": round(setup_s, 2),
        }
        say(
            f"  {name:11s} accuracy {acc:6.2f}%  {results[name]['items_per_s']:8.1f} items/s  "
            f"(agrees with {candidates[0]} on {results[name]['agreement_with_reference']:.1f}%)"
        )
    reference = candidates[0]
    floor = results[reference]["accuracy"] - tolerance
    ok = [n for n in candidates if results[n]["accuracy"] >= floor - 1e-9]
    chosen = max(ok, key=lambda n: results[n]["items_per_s"])
    for n, r in results.items():
        r["qualifies"] = n in ok
    entry = {
        "chosen": chosen,
        "reference": reference,
        "tolerance_points": tolerance,
        "n_validation": len(texts),
        "threads": threads,
        "batch_size": batch_size,
        "weights": weights_key(model_dir),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
        "skipped": skipped or {},
    }
    _record(model_dir, machine_key(threads, batch_size), entry)
    return entry


def _record(model_dir: Path, key: str, entry: dict) -> None:
    from lmloop.fsutil import atomic_write_text

    p = model_dir / CALIBRATION_FILE
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        doc = {}
    doc.setdefault("machines", {})[key] = entry
    try:
        atomic_write_text(p, json.dumps(doc, indent=2))
    except OSError as e:  # a read-only model directory still gets its answer, just not cached
        print(f"[lmloop] could not record {p}: {e}", flush=True)

"""Export a fine-tuned classifier to ONNX, prove the export is faithful, then (and only then) write it.

``lmloop export --model REF --format onnx --out DIR`` builds the export in a temporary directory beside
``DIR``, runs the exported graph with ONNX Runtime against the PyTorch model on the saved validation
split (or a sample of texts when a model has none), and compares:

* max |logit difference| over every example (fp32 graph: <= ``max_logit_diff``, default 1e-3),
* validation accuracy delta (<= ``max_accuracy_drop`` points, default 0.3; applies to int8 too).

Only a passing export is moved into place (an atomic rename), with ``parity.json`` recording the figures;
a failing one is deleted and the command exits non-zero saying which check failed and by how much.

The exported graph is the exact fast forward of :func:`lmloop.models.classifier_logits` (the last layer
computed for [CLS] only), with dynamic batch and sequence axes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from lmloop.errors import LmloopError

OPSET = 18
# copied from the model directory so an export serves on its own (lmloop serve --model DIR)
CARRY_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "lmloop.json",
    "validation.jsonl",
    "metrics.json",
    "calibration.json",  # the temperature (lmloop.calibration): the export's confidences stay calibrated
)


def export_onnx(model, tokenizer, path: str | Path) -> Path:
    """Write ``model`` as an ONNX graph (inputs input_ids/attention_mask (B, T), output logits (B, C))."""
    import torch

    from lmloop.models import classifier_logits, supports_fast_path

    fast = supports_fast_path(model)

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return classifier_logits(self.m, input_ids, attention_mask, fast=fast)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    enc = tokenizer(["an example sentence to trace", "short"], padding=True, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"])
    tmp = path.with_name(f".{path.name}.tmp")
    # The wrapper must be in eval mode too: the exporter puts the module it was given back in that
    # module's own mode afterwards, and a fresh nn.Module is in training mode, which would leave the
    # caller's model with dropout on (export_model's PyTorch reference then fails its own parity check).
    wrapper = Logits(model).eval()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        # The TorchScript exporter traces MiniLM in ~8 s and its graph ran ~10% faster under ORT than
        # the dynamo exporter's here; dynamo is the fallback for models the tracer cannot handle.
        try:
            torch.onnx.export(
                wrapper,
                args,
                str(tmp),
                dynamo=False,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                opset_version=OPSET,
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    "logits": {0: "batch"},
                },
            )
        except Exception:
            B, T = torch.export.Dim("batch"), torch.export.Dim("sequence", max=4096)
            torch.onnx.export(
                wrapper,
                args,
                str(tmp),
                dynamo=True,
                external_data=False,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                opset_version=OPSET,
                dynamic_shapes={"input_ids": {0: B, 1: T}, "attention_mask": {0: B, 1: T}},
            )
    tmp.replace(path)
    return path


def ffn_down_projections(path: str | Path) -> list[str]:
    """MatMul nodes whose constant weight maps a wider input to a narrower output ((I, H) with I > H):
    the FFN down-projections (intermediate 1536 -> hidden 384 in MiniLM)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    shapes = {t.name: list(t.dims) for t in g.initializer}
    out = []
    for n in g.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in shapes:
            dims = shapes[n.input[1]]
            if len(dims) == 2 and dims[0] > dims[1]:
                out.append(n.name)
    return out


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """Per-channel dynamic int8 MatMul weights (activations quantised per batch at run time), except the
    FFN down-projections, which stay fp32.

    Why keep those: their input is the GELU output, whose few large outliers per token force a coarse
    per-tensor activation scale (Bondarenko et al. 2021, "Understanding and overcoming the challenges of
    efficient transformer quantization"). Measured on the demo model's validation split: everything int8
    87.48% vs fp32 87.95% (-0.47 points, over the 0.3 bound); down-projections fp32 87.84-88.10%, at
    1.26-1.41x the fp32 graph's items/s instead of 1.56x.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    keep_fp32 = ffn_down_projections(src)
    tmp = dst.with_name(f".{dst.name}.tmp")
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT logs a "consider pre-processing" WARNING on every call
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=keep_fp32
            )
    finally:
        root.setLevel(level)
    tmp.replace(dst)
    return dst


def parity(
    reference,
    candidate,
    texts: list[str],
    gold: list[str] | None,
) -> dict:
    """Compare two predictors on ``texts``: max logit difference, argmax agreement, accuracy of each."""
    ids = reference.encode(texts)
    ref_logits = reference.predict_logits(ids)
    cand_logits = candidate.predict_logits(ids)
    out = {
        "n": len(texts),
        "max_logit_diff": float(np.abs(ref_logits - cand_logits).max()) if len(texts) else 0.0,
        "agreement": float((ref_logits.argmax(1) == cand_logits.argmax(1)).mean() * 100)
        if len(texts)
        else 100.0,
    }
    if gold is not None:
        labels = reference.labels
        y = np.array([labels.index(g) if g in labels else -1 for g in gold])
        out["reference_accuracy"] = float((ref_logits.argmax(1) == y).mean() * 100)
        out["accuracy"] = float((cand_logits.argmax(1) == y).mean() * 100)
        out["accuracy_delta"] = out["accuracy"] - out["reference_accuracy"]
    return out


def export_model(
    ref: str,
    out: str | Path,
    *,
    quantize: str | None = None,
    max_logit_diff: float = 1e-3,
    max_accuracy_drop: float = 0.3,
    force: bool = False,
    say=print,
) -> dict:
    """``lmloop export``: ONNX (and optionally int8) export of ``ref`` into ``out``, parity-checked."""
    from lmloop.assets import resolve_model
    from lmloop.fsutil import atomic_write_text, fsync_dir
    from lmloop.infer.backends import OnnxBackend, read_validation
    from lmloop.infer.predictor import Predictor

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise LmloopError(f"{out} already exists and is not empty; pass --force to replace it")
    src = Path(resolve_model(ref))
    # fp32 whatever the CPU: a bf16 reference would fail the fp32 graph's 1e-3 logit bound
    reference = Predictor.from_ref(str(src), backend="torch", precision="fp32")
    val = read_validation(src)
    if val is not None:
        texts, gold = val
        source = f"{src / 'validation.jsonl'} ({len(texts)} examples)"
    else:
        texts, gold = _probe_texts(), None
        source = (
            f"{len(texts)} built-in probe sentences (the model has no validation.jsonl: accuracy not checked)"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t0 = time.perf_counter()
        say(f"exporting {src} to ONNX (opset {OPSET}) ...")
        export_onnx(reference.backend.model, reference.tokenizer, staging / "model.onnx")
        reference.tokenizer.save_pretrained(staging)  # every file this tokenizer needs, whatever its kind
        for name in CARRY_FILES:
            if (src / name).is_file() and not (staging / name).exists():
                shutil.copy2(src / name, staging / name)
        graphs = {"onnx": staging / "model.onnx"}
        if quantize == "int8":
            say("quantising MatMul weights to int8 (per channel) ...")
            graphs["onnx-int8"] = quantize_onnx(staging / "model.onnx", staging / "model.int8.onnx")
        export_s = time.perf_counter() - t0

        say(f"checking parity against PyTorch on {source} ...")
        report: dict = {"source_model": str(src), "checked_on": source, "export_seconds": round(export_s, 2)}
        failures = []
        for name, path in graphs.items():
            cand = Predictor(
                None,
                reference.tokenizer,
                labels=reference.labels,
                max_length=reference.max_length,
                backend=OnnxBackend(path, name=name),
            )
            r = parity(reference, cand, texts, gold)
            r["file"] = path.name
            r["bytes"] = path.stat().st_size
            report[name] = r
            line = f"  {name:10s} max |logit diff| {r['max_logit_diff']:.2e}  agreement {r['agreement']:.2f}%"
            if "accuracy" in r:
                line += f"  accuracy {r['accuracy']:.2f}% (PyTorch {r['reference_accuracy']:.2f}%)"
            say(line)
            # int8 changes logits by design; its contract is the accuracy bound alone
            if name == "onnx" and r["max_logit_diff"] > max_logit_diff:
                failures.append(f"{name}: max |logit diff| {r['max_logit_diff']:.2e} > {max_logit_diff:g}")
            if "accuracy_delta" in r and r["accuracy_delta"] < -max_accuracy_drop:
                failures.append(
                    f"{name}: validation accuracy {r['accuracy']:.2f}% is "
                    f"{-r['accuracy_delta']:.2f} points below PyTorch's {r['reference_accuracy']:.2f}% "
                    f"(allowed: {max_accuracy_drop:g})"
                )
        if failures:
            raise LmloopError("export refused, parity check failed: " + "; ".join(failures))
        report["thresholds"] = {"max_logit_diff": max_logit_diff, "max_accuracy_drop": max_accuracy_drop}
        meta_path = staging / "lmloop.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"labels": reference.labels}
        meta.setdefault("labels", reference.labels)
        meta.setdefault("max_length", reference.max_length)
        meta["format"] = "onnx"
        meta["exported_from"] = str(src)
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
        atomic_write_text(staging / "parity.json", json.dumps(report, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
        fsync_dir(out.parent)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _probe_texts() -> list[str]:
    base = [
        "I loved every minute of it.",
        "This was a complete waste of money and time.",
        "The package arrived on Tuesday.",
        "Not bad at all, though the ending dragged.",
        "Absolutely terrible customer service, never again!",
        "A quiet, thoughtful film that stays with you long after the credits roll.",
    ]
    return [t for t in base for _ in range(1)] + [" ".join(base[i:] + base[:i]) for i in range(len(base))]

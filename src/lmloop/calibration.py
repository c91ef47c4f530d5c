"""Temperature scaling: one scalar T fitted on the validation split so confidences mean what they say.

A fine-tuned classifier is usually over-confident (Guo et al. 2017, "On Calibration of Modern Neural
Networks"): a 0.95 probability is right far less than 95% of the time. Dividing the logits by a single
T > 0 before the softmax fixes most of it and cannot change a prediction (the argmax of z / T is the argmax
of z), only how sure it claims to be.

T minimises the validation NLL. With beta = 1 / T the NLL, mean(logsumexp(beta * z) - beta * z_y), is
convex in beta, so a bounded scalar search finds the global minimum (no LBFGS restarts needed).

The result lives in the model directory as ``calibration.json``::

    {"method": "temperature", "temperature": 1.7, "n": 500, "errors": 41, "fitted_on": "validation ...",
     "nll_before": .., "nll_after": .., "ece_before": .., "ece_after": .., "skipped": null}

and :meth:`lmloop.infer.predictor.Predictor.from_ref` applies it on every backend (torch, int8, ONNX), so
``lmloop predict``, ``evaluate`` and ``serve`` return calibrated confidences. ``lmloop calibrate`` (re)fits
it after the fact (models trained before this existed, or on other data); ``--off`` removes it.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CALIBRATION_FILE = "calibration.json"
T_BOUNDS = (0.05, 20.0)  # a fitted T outside this says more about the data than about the model
MIN_ROWS = 10  # fewer validation rows than this: T would be noise


@dataclass
class TemperatureFit:
    """One fit: ``temperature`` (1.0 when ``skipped`` says why it was not fitted) and the numbers behind it."""

    temperature: float
    n: int
    errors: int
    fitted_on: str
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    at_bound: bool = False
    skipped: str | None = None
    method: str = "temperature"

    def to_dict(self) -> dict[str, Any]:
        # NaN (no rows to measure on) is not JSON: null
        return {
            k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()
        }


def _nll(logits, y, beta: float) -> float:
    import numpy as np

    z = logits * beta  # (N, C)
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))  # (N,)
    return float((lse - z[np.arange(len(y)), y]).mean())


def scaled_softmax(logits, temperature: float = 1.0):
    """Softmax of ``logits / temperature`` (N, C) in float32; ``temperature`` must be > 0."""
    import numpy as np

    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def fit_temperature(logits, y, *, fitted_on: str = "validation", bounds=T_BOUNDS) -> TemperatureFit:
    """Fit T on ``logits`` (N, C) and true class indices ``y`` (N,) by minimising the NLL of softmax(z / T).

    Not fitted (T = 1, ``skipped`` says why) with fewer than :data:`MIN_ROWS` rows, or when every row is
    already predicted right: then the NLL keeps falling as T -> 0 and the "optimum" is only the bound, a
    claim of certainty that N examples cannot support.
    """
    import numpy as np
    from scipy.optimize import minimize_scalar

    from lmloop.evaluate import expected_calibration_error

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if z.ndim != 2 or z.shape[0] != y.shape[0]:
        raise ValueError(f"logits must be (N, C) with N = len(y) = {len(y)}, got {z.shape}")
    n = int(len(y))
    errors = int((z.argmax(1) != y).sum()) if n else 0
    nll0 = _nll(z, y, 1.0) if n else float("nan")
    ece0 = expected_calibration_error(y, scaled_softmax(z)) if n else float("nan")
    skipped = None
    if n < MIN_ROWS:
        skipped = f"{n} rows to fit on, fewer than {MIN_ROWS}"
    elif errors == 0:
        skipped = f"no errors in {n} rows: the NLL has no finite minimum (it falls all the way to T -> 0)"
    if skipped:
        return TemperatureFit(1.0, n, errors, fitted_on, nll0, nll0, ece0, ece0, skipped=skipped)
    lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]  # beta = 1 / T
    res = minimize_scalar(lambda b: _nll(z, y, b), bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    beta = float(res.x)
    if _nll(z, y, 1.0) <= _nll(z, y, beta):  # never worse than no scaling (flat NLL, numerical ties)
        beta = 1.0
    t = 1.0 / beta
    return TemperatureFit(
        temperature=t,
        n=n,
        errors=errors,
        fitted_on=fitted_on,
        nll_before=nll0,
        nll_after=_nll(z, y, beta),
        ece_before=ece0,
        ece_after=expected_calibration_error(y, scaled_softmax(z, t)),
        at_bound=bool(min(abs(beta - lo), abs(beta - hi)) < 1e-3 * beta),
    )


# ------------------------------------------------------------------------------------ the model directory


def read_calibration(model_dir: str | Path) -> dict | None:
    """The ``calibration.json`` beside a model, or None (a malformed one raises a ConfigError naming it)."""
    from lmloop.errors import ConfigError

    p = Path(model_dir) / CALIBRATION_FILE
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text())
        t = float(doc["temperature"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{p}: not a calibration file ({e}); refit it with `lmloop calibrate --model {model_dir}` "
            "or delete it"
        ) from None
    if not (t > 0 and math.isfinite(t)):
        raise ConfigError(f"{p}: temperature must be a finite number > 0, got {t}")
    return doc


def temperature_of(model_dir: str | Path) -> float:
    """The temperature a model's predictions are divided by (1.0 without ``calibration.json``)."""
    doc = read_calibration(model_dir)
    return float(doc["temperature"]) if doc else 1.0


def write_calibration(model_dir: str | Path, fit: TemperatureFit) -> Path:
    """Write ``fit`` to ``model_dir/calibration.json`` (atomically)."""
    from lmloop.fsutil import atomic_write_text

    return atomic_write_text(Path(model_dir) / CALIBRATION_FILE, json.dumps(fit.to_dict(), indent=2) + "\n")


def calibrate_model(
    ref: str,
    *,
    data: str | None = None,
    split: str = "validation",
    text_column: str = "text",
    label_column: str = "label",
    batch_size: int = 64,
) -> tuple[Path, TemperatureFit]:
    """Fit T for a model directory post hoc and write its ``calibration.json``; returns (dir, fit).

    By default T is fitted on the ``validation.jsonl`` fine-tuning saved beside the model; ``data`` (any
    file :func:`lmloop.data.load_data` reads) fits it on that data's ``split`` instead (never fit on the
    test split you report on). The logits come from the exact fp32 torch backend (or ONNX for an export).
    """
    import numpy as np

    from lmloop.assets import resolve_model
    from lmloop.errors import DataError
    from lmloop.infer.backends import read_validation
    from lmloop.infer.predictor import Predictor

    path = Path(resolve_model(ref))
    onnx_only = not (path / "model.safetensors").is_file() and (path / "model.onnx").is_file()
    pred = Predictor.from_ref(
        str(path),
        backend="onnx" if onnx_only else "torch",
        precision="fp32",
        batch_size=batch_size,
        calibrated=False,
    )
    if data is None:
        val = read_validation(path)
        if val is None:
            raise DataError(
                f"{path} has no validation.jsonl to fit the temperature on (fine-tuning saves it); "
                "pass --data FILE with a labelled validation set",
                path=str(path),
            )
        texts, gold = val
        source = f"{path / 'validation.jsonl'}"
    else:
        from lmloop.data import load_data

        d = load_data(data, text_column=text_column, label_column=label_column)
        frame = {"train": d.train, "validation": d.validation, "test": d.test}[split]
        texts, gold = list(frame["text"]), list(frame["label"])
        source = f"{data} ({split} split)"
    unknown = sorted(set(gold) - set(pred.labels))
    if unknown:
        raise DataError(f"labels {unknown} are not known to the model (it knows {pred.labels})", path=source)
    y = np.array([pred.labels.index(g) for g in gold], dtype=np.int64)
    logits = pred.predict_logits(pred.encode(texts))  # (N, C), raw
    fit = fit_temperature(logits, y, fitted_on=source)
    write_calibration(path, fit)
    return path, fit


def describe(fit: dict | TemperatureFit) -> str:
    """One line: T and what it did to the validation ECE / NLL (or why it was not fitted)."""
    f = fit.to_dict() if isinstance(fit, TemperatureFit) else fit
    if f.get("skipped"):
        return f"temperature 1 (not fitted: {f['skipped']})"
    return (
        f"temperature {f['temperature']:.3f} on {f['n']} rows: ECE {f['ece_before']:.4f} -> {f['ece_after']:.4f}, "
        f"NLL {f['nll_before']:.4f} -> {f['nll_after']:.4f}"
        + ("  (T at its bound)" if f.get("at_bound") else "")
    )


# ------------------------------------------------------------------------------------------------ the verb


def cmd_calibrate(a: argparse.Namespace) -> int:
    from lmloop.assets import resolve_model

    if a.off:
        p = Path(resolve_model(a.model)) / CALIBRATION_FILE
        existed = p.is_file()
        p.unlink(missing_ok=True)
        print(f"removed {p}: raw confidences from now on" if existed else f"{p} did not exist: nothing to do")
        return 0
    path, fit = calibrate_model(
        a.model,
        data=a.data,
        split=a.split,
        text_column=a.text_column,
        label_column=a.label_column,
        batch_size=a.batch_size,
    )
    try:  # the card shows the temperature: keep it current when there is one
        from lmloop.mlops.card import refresh_card

        refresh_card(path)
    except ImportError:
        pass
    if a.json:
        print(json.dumps(fit.to_dict(), indent=2))
    else:
        print(describe(fit))
        print(f"wrote {path / CALIBRATION_FILE}; predict / evaluate / serve now divide the logits by it")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``lmloop calibrate`` to the top-level subparsers."""
    s = sub.add_parser(
        "calibrate",
        help="fit a temperature on validation data so confidences are calibrated (labels never change)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Temperature scaling (Guo et al. 2017): fit one T > 0 minimising the NLL of softmax(z / T)\n"
        "on labelled validation data and write it to DIR/calibration.json. Every later predict, evaluate and\n"
        "serve of DIR (any backend) divides the logits by T: the predicted labels stay exactly the same, the\n"
        "confidences get honest. Fine-tuning does this already (recipe train.calibrate, --no-calibrate);\n"
        "this verb refits it for older models or on other data.\n\n"
        "  lmloop calibrate --model runs/vader                       # on its saved validation.jsonl\n"
        "  lmloop calibrate --model runs/vader --data dev.csv --split validation\n"
        "  lmloop calibrate --model runs/vader --off                 # back to raw confidences\n"
        "  lmloop evaluate --model runs/vader --data vader-sentiment  # shows ECE before and after",
    )
    s.add_argument("--model", required=True, metavar="DIR", help="a fine-tuned model directory")
    s.add_argument("--data", metavar="PATH", help="fit on this data's --split instead of validation.jsonl")
    s.add_argument(
        "--split",
        choices=["validation", "train", "test"],
        default="validation",
        help="which split of --data to fit on (default validation)",
    )
    s.add_argument("--text-column", default="text", help="column with the text in --data (default text)")
    s.add_argument("--label-column", default="label", help="column with the label in --data (default label)")
    s.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default 64)")
    s.add_argument("--off", action="store_true", help="remove calibration.json (raw confidences)")
    s.add_argument("--json", action="store_true", help="print the fit as JSON")
    s.set_defaults(fn=cmd_calibrate)

"""Scaling-law ladder: train several model sizes on one fixed token budget, fit ``L(N) = a N^-alpha + c``,
predict the loss of the next size up, then train that size too and compare.

The law is Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", eq. 1.1 plus the irreducible
term of Henighan et al. 2020): validation loss falls as a power of the model size N, towards a floor c.
Our conventions, written out:

* N is the *non-embedding* parameter count (:func:`lmloop.estimate.count_params`): token and position
  embeddings and an untied output head are left out, as in Kaplan, whose power law is clean in N only
  without them. At our widths the tied vocabulary matrix is a large share of the parameters; counting it
  would bend the curve. The total is recorded too.
* Every size sees the same data: the corpus is cleaned, split and tokenised once (``OUT/data``), and each
  run re-packs it with that one tokenizer. The packed blocks' sha256 is checked per run, so a ladder can
  never silently compare models trained on different tokens.
* A fixed token budget (not compute-optimal training): at fixed D, Kaplan's ``L(N, D)`` tends to a
  data-limited floor as N grows, which the ``c`` term absorbs. Early stopping is off so that every size
  trains exactly the budget; the reported loss is that of the best validation pass, as ``lmloop pretrain``
  reports it.
* The fit is least squares in loss (``scipy.optimize.curve_fit``, trust-region with bounds a > 0,
  0 < alpha <= 2, 0 <= c < min loss), in N scaled by the ladder's geometric mean so the three parameters
  are of similar size; several starts from a log-log line fit of ``loss - c0`` keep the best. With three
  sizes the law passes through the points exactly and there is no spread to report; with four or more the
  1-sigma band is the delta method on the fit covariance (scaled by the residual variance, n - 3 degrees
  of freedom): a statement about the fit, not about seed-to-seed noise of the runs.

Output directory::

    scaling.json   settings, points, fit (a, alpha, c with standard errors), prediction, measured
    scaling.png    loss vs N (log x): ladder, fitted curve, prediction with its band, measured check
    report.html    the plot and the table in one page
    data/          the shared packed corpus and tokenizer (card.json: fingerprints)
    runs/<size>/   one ``lmloop pretrain`` output per size (a finished one is reused on a re-run)
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmloop.errors import ConfigError, LmloopError
from lmloop.fsutil import atomic_write_text

DEFAULT_SIZES = "2x64,2x96,3x128,4x160"
DEFAULT_TOKENS = "500k"
RESULT_FILE = "scaling.json"


def _say(msg: str) -> None:
    print(f"[lmloop] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- sizes


def resolve_size(spec: str, objective: str) -> str:
    """The preset name for a ladder entry: a named preset (``gpt-tiny``), a shape with its family
    (``gpt-2x96``, ``bert-4x128``) or a bare shape ``LxD`` (``2x96``), which is a LLaMA decoder for clm and
    a BERT encoder for mlm. A :class:`ConfigError` for anything else, or a family that cannot be trained
    with ``objective``."""
    from lmloop.presets import get_preset

    s = spec.strip().lower()
    if not s:
        raise ConfigError("--sizes: an empty size (two commas in a row?)")
    if re.fullmatch(r"[0-9x]+", s):  # meant as a bare shape
        if not re.fullmatch(r"\d+x\d+", s):
            raise ConfigError(f"size '{spec}': expected a shape LxD such as 2x96 (L layers of width D)")
        s = f"{'bert' if objective == 'mlm' else 'gpt'}-{s}"
    preset = get_preset(s)  # a ConfigError naming the presets for a typo; checks the shape's numbers
    if preset.objective != objective:
        raise ConfigError(
            f"size '{spec}' is a{'n encoder' if preset.kind == 'encoder' else ' decoder'} "
            f"({preset.objective}); --objective {objective} needs "
            f"{'bert-*' if objective == 'mlm' else 'gpt-*'} presets or bare LxD shapes"
        )
    return preset.name


def parse_sizes(text: str, objective: str) -> list[str]:
    """``'2x64,2x96,gpt-tiny'`` -> preset names; at least three distinct sizes."""
    names = [resolve_size(s, objective) for s in str(text).split(",")]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"--sizes: {', '.join(dup)} given twice")
    if len(names) < 3:
        raise ConfigError(
            f"--sizes: {len(names)} size(s); a fit of L(N) = a N^-alpha + c needs at least 3 (4+ for an "
            "error bar), e.g. --sizes 2x64,2x96,3x128,4x160"
        )
    return names


def next_size(name: str) -> str:
    """The default size to predict after ``name``: its width grown by sqrt(2), rounded up to a multiple
    of 16, same depth: about twice the non-embedding parameters (12-16 L D^2)."""
    from lmloop.presets import get_preset

    p = get_preset(name)
    width = int(math.ceil(p.hidden * math.sqrt(2) / 16) * 16)
    return f"{'bert' if p.kind == 'encoder' else 'gpt'}-{p.layers}x{width}"


def _largest(names: list[str]) -> str:
    from lmloop.presets import get_preset

    return max(names, key=lambda n: get_preset(n).layers * get_preset(n).hidden ** 2)  # ~ N / 12


# ------------------------------------------------------------------------------------------------- fit


def law(n, a: float, alpha: float, c: float):
    """``L(N) = a N^-alpha + c`` (Kaplan et al. 2020, with the irreducible loss c)."""
    import numpy as np

    return a * np.power(np.asarray(n, dtype=float), -alpha) + c


def fit_power_law(n_params, losses) -> dict[str, Any]:
    """Least-squares fit of ``L(N) = a N^-alpha + c`` to (N, loss) points; see the module docstring.

    Returns ``a, alpha, c``, their standard errors (None with three points, where the fit is exactly
    determined), ``n_ref`` and ``cov`` (the covariance of (A, alpha, c) for ``L = A (N/n_ref)^-alpha + c``,
    the parameterisation the fit uses; None with three points), ``residual_rms`` and ``warnings``.
    Raises :class:`LmloopError` when no start converges.
    """
    import numpy as np
    from scipy.optimize import OptimizeWarning, curve_fit

    n = np.asarray(n_params, dtype=float)
    y = np.asarray(losses, dtype=float)
    if n.shape != y.shape or n.ndim != 1:
        raise ConfigError("fit: expected two equally long lists of sizes and losses")
    if len(n) < 3:
        raise ConfigError(f"fit: {len(n)} points; L(N) = a N^-alpha + c has 3 parameters, give at least 3")
    if not (np.all(np.isfinite(n)) and np.all(n > 0) and np.all(np.isfinite(y)) and np.all(y > 0)):
        raise LmloopError(
            f"fit: sizes and losses must be finite and positive (N={n.tolist()}, L={y.tolist()})"
        )
    if len(set(n.tolist())) != len(n):
        raise ConfigError(f"fit: two sizes have the same non-embedding parameter count ({n.tolist()})")

    n_ref = float(np.exp(np.mean(np.log(n))))  # scale N so A, alpha and c are all O(1): a better-posed fit
    x = n / n_ref
    y_min = float(y.min())
    c_hi = y_min * (1 - 1e-9)  # c < min loss: the floor lies below every measured point

    def f(x, A, alpha, c):
        return A * np.power(x, -alpha) + c

    best = None
    for frac in (0.0, 0.5, 0.8, 0.9, 0.95, 0.99):
        c0 = frac * y_min
        # the initial guess: a straight line through log(L - c0) vs log N gives alpha and A
        slope, icpt = np.polyfit(np.log(x), np.log(y - c0 * (1 - 1e-6)), 1)
        p0 = [max(float(np.exp(icpt)), 1e-9), float(np.clip(-slope, 1e-3, 2.0)), min(c0, c_hi * 0.999)]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)  # 3 points: no covariance, handled below
                popt, pcov = curve_fit(
                    f, x, y, p0=p0, bounds=([1e-12, 1e-6, 0.0], [np.inf, 2.0, c_hi]), maxfev=20000
                )
        except (RuntimeError, ValueError):
            continue
        if not np.all(np.isfinite(popt)):
            continue
        sse = float(np.sum((f(x, *popt) - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, popt, pcov)
    if best is None:
        raise LmloopError(
            f"the fit of L(N) = a N^-alpha + c did not converge from any start (N={n.tolist()}, "
            f"loss={[round(v, 4) for v in y.tolist()]})"
        )
    sse, (A, alpha, c), pcov = best
    notes = []
    cov = None
    if len(n) > 3 and np.all(np.isfinite(pcov)):
        cov = np.asarray(pcov, dtype=float)
    elif len(n) == 3:
        notes.append(
            "3 sizes: the law passes through every point, so the prediction has no error bar; "
            "add a 4th size for one"
        )
    else:
        notes.append("the fit covariance could not be estimated: no error bar")
    if alpha < 1e-3 or A < 1e-6:
        notes.append("the loss does not fall with N across the ladder (alpha ~ 0): the law does not hold")
    elif alpha >= 2.0 * (1 - 1e-6):
        notes.append("alpha hit its upper bound 2: the ladder's losses fall faster than a plausible law")
    if c >= c_hi * (1 - 1e-6):
        notes.append("c reached the smallest measured loss: the ladder looks saturated")
    # back to the unscaled a: L = A (N / n_ref)^-alpha + c = (A n_ref^alpha) N^-alpha + c
    a = float(A * n_ref**alpha)
    se = {"a": None, "alpha": None, "c": None}
    if cov is not None:
        d_a = np.array([n_ref**alpha, A * n_ref**alpha * math.log(n_ref), 0.0])  # d a / d (A, alpha, c)
        se = {
            "a": float(math.sqrt(max(d_a @ cov @ d_a, 0.0))),
            "alpha": float(math.sqrt(max(cov[1, 1], 0.0))),
            "c": float(math.sqrt(max(cov[2, 2], 0.0))),
        }
    return {
        "a": a,
        "alpha": float(alpha),
        "c": float(c),
        "stderr": se,
        "n_ref": n_ref,
        "A_at_n_ref": float(A),
        "cov": None if cov is None else cov.tolist(),
        "points": len(n),
        "residual_rms": math.sqrt(sse / len(n)),
        "interval": "delta method on the fit covariance (1 sigma)" if cov is not None else None,
        "warnings": notes,
    }


def predict_loss(fit: dict, n: float) -> tuple[float, float | None]:
    """(predicted loss, 1-sigma or None) at ``n`` non-embedding parameters, by the delta method:
    ``var = g^T Cov g`` with ``g = dL/d(A, alpha, c) = (x^-alpha, -A x^-alpha ln x, 1)``, x = N / n_ref."""
    import numpy as np

    x = n / fit["n_ref"]
    A, alpha = fit["A_at_n_ref"], fit["alpha"]
    mean = A * x ** (-alpha) + fit["c"]
    if fit.get("cov") is None:
        return float(mean), None
    g = np.array([x ** (-alpha), -A * x ** (-alpha) * math.log(x), 1.0])
    return float(mean), float(math.sqrt(max(g @ np.asarray(fit["cov"]) @ g, 0.0)))


# ---------------------------------------------------------------------------------------------- ladder


@dataclass
class Ladder:
    """What one ``lmloop scaling`` run trains. ``sizes`` and ``predict`` are preset names or shapes."""

    out: str
    sizes: list[str] = field(default_factory=lambda: DEFAULT_SIZES.split(","))
    predict: str | None = None
    """The size to predict and then train; default :func:`next_size` of the largest."""
    corpus: list[str] = field(default_factory=lambda: ["shakespeare"])
    objective: str = "clm"
    tokens: str | int = DEFAULT_TOKENS
    """Training tokens per size (the same for every size)."""
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 42
    vocab_size: int = 2048
    """A small vocabulary: at these widths an 8192 x d embedding would be most of the compute."""
    eval_every: int = 100
    eval_blocks: int = 256
    verify: bool = True
    track: bool = True
    experiment: str | None = None

    def __post_init__(self) -> None:
        from lmloop.estimate import parse_count

        if self.objective not in ("clm", "mlm"):
            raise ConfigError(f"--objective {self.objective}: expected clm or mlm")
        self.sizes = parse_sizes(",".join(self.sizes), self.objective)
        self.predict = (
            resolve_size(self.predict, self.objective) if self.predict else next_size(_largest(self.sizes))
        )
        if self.predict in self.sizes:
            raise ConfigError(f"--predict {self.predict} is one of --sizes: predict a size not in the ladder")
        self.tokens = parse_count(self.tokens)
        for key in ("seq_len", "batch_size", "vocab_size", "eval_every", "eval_blocks"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} {getattr(self, key)}: expected at least 1")
        if not 0 < self.lr < 1:
            raise ConfigError(f"--lr {self.lr}: expected a value in (0, 1)")

    def settings(self) -> dict:
        """What must match for a finished size to be reused (the ladder's sizes may grow)."""
        keep = (
            "corpus",
            "objective",
            "tokens",
            "seq_len",
            "batch_size",
            "lr",
            "seed",
            "vocab_size",
            "eval_every",
            "eval_blocks",
        )
        return {k: v for k, v in asdict(self).items() if k in keep}


def run_scaling(ladder: Ladder, *, force: bool = False, progress: bool = True) -> dict:
    """Prepare the data once, train every size (reusing finished ones), fit, predict, verify; returns the
    record also written to ``OUT/scaling.json`` (see the module docstring)."""
    out = Path(ladder.out)
    result_file = out / RESULT_FILE
    settings = ladder.settings()
    if force:
        for p in ("runs", "data", RESULT_FILE, "scaling.png", "report.html"):
            target = out / p
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    elif result_file.is_file():
        old = json.loads(result_file.read_text()).get("settings")
        if old != settings:
            diff = sorted(k for k in set(old or {}) | set(settings) if (old or {}).get(k) != settings.get(k))
            raise ConfigError(
                f"{out} holds a ladder made with other settings ({', '.join(diff)}); its runs cannot be "
                "compared with these. Use --force to start again, or another --out"
            )
    elif (out / "runs").is_dir() and any((out / "runs").iterdir()):
        raise ConfigError(f"{out}/runs exists but {RESULT_FILE} does not; use --force or another --out")
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "settings": settings,
        "sizes": ladder.sizes,
        "predict": ladder.predict,
        "status": "training",
        "n_definition": "non-embedding parameters (Kaplan et al. 2020): token/position embeddings and an "
        "untied output head excluded",
    }
    _save(result_file, record)

    t0 = time.perf_counter()
    tok, card = _shared_data(ladder, out)
    vocab = len(tok)
    counts = {name: _counts(name, ladder.objective, vocab, ladder.seq_len) for name in ladder.sizes}
    counts[ladder.predict] = _counts(ladder.predict, ladder.objective, vocab, ladder.seq_len)
    order = sorted(ladder.sizes, key=lambda s: counts[s]["non_embedding"])
    ns = [counts[s]["non_embedding"] for s in order]
    if len(set(ns)) != len(ns):
        raise ConfigError(f"--sizes: two sizes have the same non-embedding parameter count ({ns})")
    n_pred = counts[ladder.predict]["non_embedding"]
    _say(
        "ladder: "
        + ", ".join(f"{s} (N={counts[s]['non_embedding']:,})" for s in order)
        + f"; predict {ladder.predict} (N={n_pred:,}); {ladder.tokens:,} tokens each, vocabulary {vocab}"
    )
    if n_pred <= max(ns):
        _say(f"note: {ladder.predict} is not larger than the ladder: an interpolation, not an extrapolation")

    points = []
    for i, size in enumerate(order, 1):
        _say(f"size {i}/{len(order)}: {size}")
        points.append(_train_size(ladder, out, size, counts[size], card, progress))
        record["points"] = points
        _save(result_file, record)

    # -- fit and predict ---------------------------------------------------------------------------------
    try:
        fit = fit_power_law([p["n_params"] for p in points], [p["val_loss"] for p in points])
    except LmloopError as e:
        record.update(status="fit failed", fit={"error": str(e)})
        _save(result_file, record)
        raise LmloopError(
            f"{e}. The trained sizes are kept in {out / 'runs'}; re-running reuses them"
        ) from None
    for note in fit["warnings"]:
        _say(f"fit: {note}")
    mean, sigma = predict_loss(fit, n_pred)
    for p in points:
        p["fitted_loss"] = predict_loss(fit, p["n_params"])[0]
    record.update(
        status="fitted",
        fit=fit,
        prediction={
            "size": ladder.predict,
            "n_params": n_pred,
            "n_params_total": counts[ladder.predict]["total"],
            "loss": mean,
            "sigma": sigma,
        },
    )
    _save(result_file, record)
    _say(f"predicted {ladder.predict}: loss {mean:.4f}" + (f" +- {sigma:.4f}" if sigma is not None else ""))

    # -- verify ----------------------------------------------------------------------------------------------
    if ladder.verify:
        _say(f"verifying: training {ladder.predict}")
        m = _train_size(ladder, out, ladder.predict, counts[ladder.predict], card, progress)
        err = m["val_loss"] - mean
        record["measured"] = {
            **m,
            "error": err,
            "relative_error": err / m["val_loss"],
            "sigmas": None if not sigma else err / sigma,
        }
        record["status"] = "verified"
    record["seconds"] = round(time.perf_counter() - t0, 1)
    write_plot(record, out / "scaling.png")
    write_report(record, out / "report.html")
    _save(result_file, record)
    _track(ladder, out, record)
    _save(result_file, record)
    return record


def _save(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=2))


def _counts(name: str, objective: str, vocab: int, seq_len: int) -> dict:
    from lmloop.estimate import count_params
    from lmloop.presets import build_config

    return count_params(build_config(name, vocab_size=vocab, seq_len=seq_len), objective)


def _shared_data(ladder: Ladder, out: Path):
    """The corpus cleaned, split, tokenised and packed once into ``OUT/data`` (reused when the settings
    match); returns (tokenizer, card). Every size then re-packs it with ``OUT/data/tokenizer``."""
    from lmloop.data.tokenizer import load_tokenizer
    from lmloop.pretrain import prepare_corpus, resolve_corpus

    data_dir = out / "data"
    paths = resolve_corpus(ladder.corpus)
    want = {
        "corpus": [str(p) for p in paths],
        "objective": ladder.objective,
        "seq_len": ladder.seq_len,
        "vocab_size": ladder.vocab_size,
        "seed": ladder.seed,
    }
    card_file = data_dir / "card.json"
    if card_file.is_file() and (data_dir / "tokenizer").is_dir():
        card = json.loads(card_file.read_text())
        if card.get("settings") == want:
            _say(f"data: reusing {data_dir}")
            return load_tokenizer(data_dir / "tokenizer"), card
    _say(f"data: preparing {', '.join(ladder.corpus)} once for every size")
    tok, card = prepare_corpus(
        paths,
        "train",
        data_dir,
        objective=ladder.objective,
        seq_len=ladder.seq_len,
        vocab_size=ladder.vocab_size,
        doc_mode="paragraph",
        val_frac=0.05,
        seed=ladder.seed,
    )
    card["settings"] = want
    atomic_write_text(card_file, json.dumps(card, indent=2))
    # re-read from disk: the runs load this directory, so the ladder must use exactly what they use
    return load_tokenizer(data_dir / "tokenizer"), card


def _train_size(ladder: Ladder, out: Path, size: str, counts: dict, card: dict, progress: bool) -> dict:
    """Train one size with ``run_pretrain`` into ``OUT/runs/<size>`` (a finished run is reused, a
    checkpointed one resumed) and return its point."""
    from lmloop.config import recipe_from_dict
    from lmloop.pretrain import run_pretrain
    from lmloop.train import find_checkpoint

    run_dir = out / "runs" / size
    reused = (run_dir / "metrics.json").is_file()
    if reused:
        _say(f"{size}: reusing the finished run in {run_dir}")
    else:
        resume = find_checkpoint(run_dir / "checkpoints" / "last") is not None
        recipe = recipe_from_dict(
            {
                "name": f"{out.name}-{size}",
                "task": "pretrain",
                "out": str(run_dir),
                "pretrain": {
                    "objective": ladder.objective,
                    "corpus": list(ladder.corpus),
                    "preset": size,
                    "tokenizer": str((out / "data" / "tokenizer").resolve()),
                    "vocab_size": ladder.vocab_size,
                    "seq_len": ladder.seq_len,
                    "tokens": ladder.tokens,
                    "eval_every": ladder.eval_every,
                    "eval_blocks": ladder.eval_blocks,
                },
                "train": {
                    "batch_size": ladder.batch_size,
                    "lr": ladder.lr,
                    "seed": ladder.seed,
                    "patience": 0,  # every size trains the whole budget: a fixed-D ladder
                },
                "tracking": {
                    "enabled": ladder.track,
                    **({"experiment": ladder.experiment} if ladder.experiment else {}),
                },
            },
            source="lmloop scaling",
        )
        # a run dir without a checkpoint is a run that died before its first step: start it again
        force = run_dir.exists() and not resume
        run_pretrain(recipe, resume=resume, force=force, progress=progress, calibrate=False)
    m = json.loads((run_dir / "metrics.json").read_text())
    run_card = json.loads((run_dir / "data" / "card.json").read_text())
    for k in ("train_blocks", "val_blocks"):
        if run_card["fingerprints"][k] != card["fingerprints"][k]:
            raise LmloopError(
                f"{run_dir}: its {k.replace('_', ' ')} differ from the ladder's ({out / 'data'}): the sizes "
                "would not be comparable. Use --force to train the ladder again"
            )
    run_json = run_dir / "run.json"
    return {
        "size": size,
        "n_params": counts["non_embedding"],
        "n_params_total": counts["total"],
        "val_loss": m["validation"]["loss"],
        "val_perplexity": m["validation"]["perplexity"],
        "tokens": m["train"]["tokens"],
        "steps": m["train"]["steps"],
        "train_seconds": m["train"]["seconds"],
        "run_dir": str(run_dir),
        "mlflow_run_id": json.loads(run_json.read_text()).get("mlflow_run_id")
        if run_json.is_file()
        else None,
        "reused": reused,
    }


def _track(ladder: Ladder, out: Path, record: dict) -> None:
    """One MLflow run for the ladder (params, fit, prediction, plot), the per-size runs nested under it.
    Tracking is a record, never a reason to fail a finished ladder: errors are printed, not raised."""
    if not ladder.track:
        return
    from lmloop.mlops.tracking import Tracker

    tracker = Tracker(experiment=ladder.experiment or "lmloop")
    try:
        tracker.start(
            f"{out.name}-scaling",
            params={
                **record["settings"],
                "sizes": ",".join(record["sizes"]),
                "predict": record["predict"],
            },
            tags={"lmloop.stage": "scaling", "lmloop.out": str(out.resolve())},
        )
        fit, pred = record["fit"], record["prediction"]
        metrics = {
            "fit_a": fit["a"],
            "fit_alpha": fit["alpha"],
            "fit_c": fit["c"],
            "predicted_loss": pred["loss"],
        }
        if pred["sigma"] is not None:
            metrics["predicted_sigma"] = pred["sigma"]
        if "measured" in record:
            metrics.update(measured_loss=record["measured"]["val_loss"], error=record["measured"]["error"])
        for p in record["points"]:
            tracker.log_metrics({"ladder_val_loss": p["val_loss"]}, step=p["n_params"])
        tracker.log_metrics(metrics)
        for name in (RESULT_FILE, "scaling.png", "report.html"):
            tracker.log_artifact(out / name, "scaling")
        record["mlflow_run_id"] = tracker.run_id
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracker.uri)
        children = [*record["points"], *([record["measured"]] if "measured" in record else [])]
        for p in children:
            if p.get("mlflow_run_id") and tracker.run_id:  # nest the size runs under this one in the UI
                client.set_tag(p["mlflow_run_id"], "mlflow.parentRunId", tracker.run_id)
        tracker.end("FINISHED")
    except Exception as e:
        _say(f"tracking: could not record the ladder in MLflow ({type(e).__name__}: {e})")
        tracker.end("FAILED")


# --------------------------------------------------------------------------------------------- outputs


def format_table(record: dict) -> str:
    """The ladder, the fit and predicted vs measured as plain text for the terminal."""
    head = ("size", "N (non-emb)", "params", "tokens", "val loss", "fit", "train s")
    rows = ["{:12s} {:>12s} {:>10s} {:>10s} {:>9s} {:>8s} {:>8s}".format(*head)]
    for p in record.get("points", []):
        fitted = f"{p['fitted_loss']:.4f}" if "fitted_loss" in p else "-"
        rows.append(
            f"{p['size']:12s} {p['n_params']:>12,} {p['n_params_total']:>10,} {p['tokens']:>10,} "
            f"{p['val_loss']:>9.4f} {fitted:>8s} {p['train_seconds']:>8.0f}"
            + ("  (reused)" if p.get("reused") else "")
        )
    fit = record.get("fit")
    if fit and "a" in fit:
        se = fit["stderr"]
        pm = lambda k: f" +- {se[k]:.3g}" if se[k] is not None else ""  # noqa: E731
        rows.append(
            f"\nfit: L(N) = a N^-alpha + c   a = {fit['a']:.4g}{pm('a')}   alpha = {fit['alpha']:.4f}"
            f"{pm('alpha')}   c = {fit['c']:.4f}{pm('c')}"
        )
        rows.append(f"     N = non-embedding parameters; rms residual {fit['residual_rms']:.4f}")
        for note in fit["warnings"]:
            rows.append(f"  note: {note}")
    pred = record.get("prediction")
    if pred:
        band = f" +- {pred['sigma']:.4f} (1 sigma)" if pred["sigma"] is not None else " (no error bar)"
        rows.append(f"predicted {pred['size']} (N={pred['n_params']:,}): loss {pred['loss']:.4f}{band}")
    m = record.get("measured")
    if m:
        sig = f", {m['sigmas']:+.1f} sigma" if m.get("sigmas") is not None else ""
        rows.append(
            f"measured  {m['size']}: loss {m['val_loss']:.4f}   error {m['error']:+.4f} "
            f"({100 * m['relative_error']:+.1f}%{sig}) in {m['train_seconds']:.0f} s"
        )
    return "\n".join(rows)


def _plot_b64(record: dict) -> str:
    """Loss vs non-embedding parameters on a log x axis: the ladder, the fitted law (dashed past the
    ladder), the prediction with its 1-sigma bar and the measured check. A base64 PNG."""
    import matplotlib
    import numpy as np

    from lmloop.report import _figure, _png_b64

    pts, fit, pred, m = record["points"], record["fit"], record["prediction"], record.get("measured")
    n = np.array([p["n_params"] for p in pts], dtype=float)
    y = np.array([p["val_loss"] for p in pts], dtype=float)
    with matplotlib.rc_context({"text.usetex": False}):
        fig = _figure(6.4, 4.2)
        ax = fig.add_subplot()
        lo, hi = min(n.min(), pred["n_params"]) / 1.4, max(n.max(), pred["n_params"]) * 1.4
        grid = np.geomspace(lo, hi, 200)
        curve = np.array([predict_loss(fit, g)[0] for g in grid])
        inside = (grid >= n.min()) & (grid <= n.max())
        label = f"fit: {fit['a']:.3g} N^-{fit['alpha']:.3f} + {fit['c']:.3f}"
        ax.plot(grid[inside], curve[inside], "-", color="C0", label=label)
        ax.plot(grid[~inside & (grid > n.max())], curve[~inside & (grid > n.max())], "--", color="C0")
        ax.plot(grid[~inside & (grid < n.min())], curve[~inside & (grid < n.min())], "--", color="C0")
        if pred["sigma"] is not None:
            band = np.array([predict_loss(fit, g)[1] for g in grid])
            ax.fill_between(grid, curve - band, curve + band, color="C0", alpha=0.15, label="1 sigma")
        ax.plot(n, y, "o", color="black", label="ladder (measured)")
        for p in pts:
            xy = (p["n_params"], p["val_loss"])
            ax.annotate(p["size"], xy, textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.errorbar(
            [pred["n_params"]],
            [pred["loss"]],
            yerr=[pred["sigma"] or 0.0],
            fmt="s",
            color="C1",
            capsize=4,
            label=f"predicted {pred['size']}",
        )
        if m:
            label = f"measured {m['size']}"
            ax.plot([m["n_params"]], [m["val_loss"]], "*", color="C3", markersize=12, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters N")
        ax.set_ylabel("validation loss")
        tokens = pts[0]["tokens"]  # the budget rounded up to whole steps, the same for every size
        ax.set_title(f"{record['settings']['objective']} loss vs size, {tokens:,} training tokens each")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        return _png_b64(fig)


def write_plot(record: dict, path: Path) -> Path:
    """``scaling.png`` (see :func:`_plot_b64`)."""
    import base64

    from lmloop.fsutil import atomic_write

    png = base64.b64decode(_plot_b64(record))
    atomic_write(path, lambda fh: fh.write(png))
    return path


def write_report(record: dict, path: Path) -> Path:
    """A one-page ``report.html``: the plot (inlined, no network) and the table, HTML-escaped."""
    import html

    from lmloop import __version__

    img = _plot_b64(record)
    body = (
        "<!doctype html><meta charset='utf-8'><title>lmloop scaling</title>"
        "<body style='font-family: sans-serif; max-width: 900px; margin: 2em auto'>"
        f"<h1>Scaling ladder</h1><p>{html.escape(record['n_definition'])}. Settings: "
        f"{html.escape(json.dumps(record['settings']))}</p>"
        f"<img alt='loss vs N' src='data:image/png;base64,{img}'>"
        f"<pre>{html.escape(format_table(record))}</pre>"
        f"<p style='color: #777'>lmloop {html.escape(__version__)}</p></body>"
    )
    atomic_write_text(path, body)
    return path

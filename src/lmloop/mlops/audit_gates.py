"""The loop's responsible-evaluation gates: bias, membership inference and memorization of a challenger.

:func:`run_audits` runs only the audits whose gates the recipe sets (``loop.gates.bias.max_flip_rate``,
``bias.max_gap``, ``membership.max_auc``, ``memorization.max_exposure``), saves each report into the model
directory (``audit/bias.json``, ``audit/membership.json``, ``audit/memorization.json``: the files the
model card and ``lmloop audit`` share) and returns their summaries; :func:`audit_gates` turns those into
:class:`lmloop.mlops.loop.Gate` results. A configured gate whose audit could not run fails, with the reason
(fail closed: an unmeasured risk is not a passed one). Memorization applies to generative models only: a
classifier records it as skipped, with the reason, and passes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmloop.config import LoopGatesConfig

AUDIT_DIR = "audit"  # inside a model directory: <name>.json per audit (lmloop audit ... --out default)
_EPS = 1e-9
MEMBERSHIP_MAX_ROWS = 500  # rows per side of the membership attack: the AUC's CI is ~+/-0.05 there


def audit_path(model_dir: str | Path, name: str) -> Path:
    """Where audit ``name`` (bias, membership, memorization) of a model is saved."""
    return Path(model_dir) / AUDIT_DIR / f"{name}.json"


def wanted(cfg: LoopGatesConfig) -> list[str]:
    """The audits the configured gates need, in gate order."""
    out = []
    if cfg.bias.max_flip_rate is not None or cfg.bias.max_gap is not None:
        out.append("bias")
    if cfg.membership.max_auc is not None:
        out.append("membership")
    if cfg.memorization.max_exposure is not None:
        out.append("memorization")
    return out


def _save(model_dir: Path, name: str, doc: dict) -> None:
    from lmloop.evaluate import write_metrics_json

    write_metrics_json(doc, audit_path(model_dir, name))


def _is_generative(model_dir: Path) -> bool:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForCausalLM") for a in cfg.get("architectures") or [])


def run_audits(
    model_dir: str | Path, cfg: LoopGatesConfig, *, train, golden, say=print, seed: int = 0
) -> dict:
    """Run the audits the gates in ``cfg`` need on ``model_dir``; ``{name: summary}``.

    ``train`` and ``golden`` are the challenger's training frame and the frozen golden test frame (columns
    ``text``, ``label``). Bias swaps identity terms in the golden texts; membership attacks with up to
    :data:`MEMBERSHIP_MAX_ROWS` training rows (seeded sample) against as many golden rows. A summary is
    ``{"error": why}`` when its audit failed, ``{"skipped": why}`` when it does not apply.
    """
    model_dir = Path(model_dir)
    out: dict[str, dict] = {}
    for name in wanted(cfg):
        try:
            if name == "bias":
                from lmloop.audit.bias import audit_bias

                say(
                    f"bias audit: identity-term swaps in {len(golden)} golden texts (+ the term templates) ..."
                )
                # the audit's own flags then agree with the gates
                limits = {
                    k: v
                    for k, v in (("max_flip_rate", cfg.bias.max_flip_rate), ("max_gap", cfg.bias.max_gap))
                    if v is not None
                }
                res = audit_bias(
                    str(model_dir), list(golden["text"]), seed=seed, data_name="golden test set", **limits
                )
                res.write(model_dir / AUDIT_DIR)  # bias.json + bias.html, as `lmloop audit bias` writes them
                summary = res.summary()
            elif name == "membership":
                from lmloop.audit.membership import membership_audit

                n = min(len(train), len(golden), MEMBERSHIP_MAX_ROWS)
                if n < 2:
                    raise ValueError(f"{n} rows per side: too few for a membership attack")
                members = train.sample(n=n, random_state=seed)
                nonmembers = golden.sample(n=n, random_state=seed)
                say(f"membership audit: {n} training rows vs {n} golden rows ...")
                summary = membership_audit(
                    str(model_dir),
                    list(zip(members["text"], members["label"], strict=True)),
                    list(zip(nonmembers["text"], nonmembers["label"], strict=True)),
                )
                _save(model_dir, name, summary)
            else:  # memorization
                if not _is_generative(model_dir):
                    summary = {
                        "skipped": "a classifier: canary exposure measures what a generative model reproduces, "
                        "and a classifier generates no text"
                    }
                else:
                    from lmloop.audit.memorization import audit_memorization

                    say("memorization audit: canary exposure ...")
                    report = audit_memorization(str(model_dir), extraction_docs=0, seed=seed)
                    summary = {**report.get("summary", {}), "canaries": report.get("canaries")}
                    _save(model_dir, name, report)
        except Exception as e:  # noqa: BLE001 (any failure of a configured audit fails its gate, with the reason)
            summary = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            say(f"{name} audit failed: {summary['error']}")
        out[name] = _summary(summary)
    return out


def _summary(doc: Any) -> dict:
    """The top-level numbers of an audit report (a report may hold them under ``summary``)."""
    if not isinstance(doc, dict):
        return {"error": f"the audit returned {type(doc).__name__}, not a dict"}
    s = doc.get("summary") if isinstance(doc.get("summary"), dict) else {}
    return {**doc, **s}


def _worst(families: Any, key: str) -> str:
    if not isinstance(families, dict):
        return ""
    vals = {
        f: v.get(key)
        for f, v in families.items()
        if isinstance(v, dict) and isinstance(v.get(key), (int, float))
    }
    if not vals:
        return ""
    f = max(vals, key=vals.get)
    return f"; worst family: {f}"


def audit_gates(audits: dict, cfg: LoopGatesConfig) -> list:
    """:class:`~lmloop.mlops.loop.Gate` results for the audit gates set in ``cfg``, from :func:`run_audits`
    summaries (an audit missing from ``audits`` was not run: its gate fails and says so)."""
    from lmloop.mlops.loop import Gate

    gates: list[Gate] = []

    def check(gate: str, audit: str, key: str, threshold: float | None, what: str) -> None:
        if threshold is None:
            return
        s = audits.get(audit)
        if s is None:
            gates.append(Gate(gate, None, threshold, False, f"the {audit} audit was not run"))
        elif s.get("skipped"):
            gates.append(Gate(gate, None, threshold, True, f"skipped: {s['skipped']}"))
        elif s.get("error"):
            gates.append(Gate(gate, None, threshold, False, f"the {audit} audit failed: {s['error']}"))
        elif not isinstance(s.get(key), (int, float)):
            gates.append(Gate(gate, None, threshold, False, f"the {audit} audit reported no {key}"))
        else:
            v = float(s[key])
            detail = what + (_worst(s.get("families"), key.removeprefix("max_")) if audit == "bias" else "")
            gates.append(Gate(gate, v, threshold, v <= threshold + _EPS, detail))

    b = cfg.bias
    check(
        "bias.flip_rate",
        "bias",
        "max_flip_rate",
        b.max_flip_rate,
        "share of identity swaps that flip the label",
    )
    check("bias.gap", "bias", "max_gap", b.max_gap, "largest gap in mean score between groups")
    check(
        "membership.auc",
        "membership",
        "auc",
        cfg.membership.max_auc,
        "membership-inference AUC (0.5 = chance)",
    )
    check(
        "memorization.exposure",
        "memorization",
        "max_exposure",
        cfg.memorization.max_exposure,
        "largest canary exposure (bits)",
    )
    return gates

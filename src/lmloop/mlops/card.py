"""The model card: ``MODEL_CARD.md`` in a model directory, written from the files beside the model.

Sections: intended use, model, data (sources, sizes, fingerprints), metrics (test and validation, per
domain when the data has domains), calibration (temperature, ECE before / after), responsible evaluation
(bias, membership inference, memorization: from the audit JSONs when present), the promotion gates of the
last loop evaluation, and limits. Every number is read from a file the pipeline wrote; nothing is typed in.

Files read (all optional except ``lmloop.json`` / ``config.json``)::

    lmloop.json, metrics.json, data_card.json, calibration.json      (fine-tuning)
    audit/bias.json, audit/membership.json, audit/memorization.json  (lmloop audit / the loop's gates;
                                                   audit_<name>.json beside the model is read too)
    gates.json                                                       (lmloop loop: the gates of this model)

The card holds no clock time, so rewriting it from the same files gives the same bytes (the registry
identifies a version by its files' content). Written at the end of fine-tuning, after ``lmloop
calibrate``, by the loop after its gates, and by ``lmloop card --model DIR``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

CARD_FILE = "MODEL_CARD.md"
AUDITS = ("bias", "membership", "memorization")
GATES_FILE = "gates.json"


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _f(x: Any, digits: int = 4) -> str:
    if isinstance(x, bool) or x is None:
        return "-" if x is None else str(x)
    if isinstance(x, (int, float)):
        return f"{x:.{digits}f}" if isinstance(x, float) else str(x)
    return str(x)


def _ci(ci: Any) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        return f"[{ci[0]:.4f}, {ci[1]:.4f}]"
    return "-"


def _esc(text: Any) -> str:
    """A value safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_esc(c) for c in r) + " |" for r in rows]
    return out + [""]


def _summary(doc: dict) -> dict:
    """An audit JSON's summary: the file may hold it at top level or under ``summary``."""
    return doc.get("summary") if isinstance(doc.get("summary"), dict) else doc


def render_card(model_dir: str | Path) -> str:
    """The Markdown card of ``model_dir`` (see the module docstring for the files it reads)."""
    d = Path(model_dir)
    meta, metrics = _read(d / "lmloop.json"), _read(d / "metrics.json")
    data, cal, gates = _read(d / "data_card.json"), _read(d / "calibration.json"), _read(d / GATES_FILE)
    audits = {k: _read(d / "audit" / f"{k}.json") or _read(d / f"audit_{k}.json") for k in AUDITS}
    cfg = _read(d / "config.json")
    labels = meta.get("labels") or [
        cfg.get("id2label", {}).get(str(i)) for i in range(len(cfg.get("id2label", {})))
    ]
    task = meta.get("task") or ("classification" if labels else "language modelling")
    name = d.resolve().name
    test, val = metrics.get("test") or {}, metrics.get("validation") or {}

    L = [f"# Model card: {name}", ""]
    L += ["## Intended use", ""]
    if task == "classification":
        L += [
            f"Sorts a text into one of {len(labels)} labels: {', '.join(f'`{x}`' for x in labels)}. Use it on "
            f"texts like its training data ({data.get('source') or meta.get('data_source') or 'see Data'}); "
            "the scores are probabilities"
            + (" after temperature scaling (see Calibration)" if cal and not cal.get("skipped") else "")
            + ". Not for decisions about people without a human in the loop, nor for texts in another "
            "language, domain or label set than the data below.",
            "",
        ]
    else:
        L += [f"Task: {task}. Use it on text like its training corpus; see Limits.", ""]

    L += ["## Model", ""]
    rows = [
        ["base model", meta.get("base_model") or "-"],
        ["task", task],
        ["labels", ", ".join(labels) or "-"],
        ["max input tokens", meta.get("max_length", "-")],
        ["architecture", ", ".join(cfg.get("architectures") or []) or cfg.get("model_type", "-")],
        ["lmloop version", meta.get("lmloop_version", "-")],
        ["MLflow run", meta.get("mlflow_run_id") or "-"],
    ]
    L += _table(["", ""], rows)

    L += ["## Data", ""]
    fps = data.get("fingerprints") or meta.get("data_fingerprints") or {}
    if data or fps:
        L += [
            f"Source: {data.get('source') or meta.get('data_source') or '-'}. "
            f"Combined fingerprint: `{data.get('fingerprint', '-')}`.",
            "",
        ]
        split_rows = []
        for split in ("train", "validation", "test"):
            fp = fps.get(split)
            sha = fp.get("sha256", "") if isinstance(fp, dict) else str(fp or "")
            split_rows.append(
                [split, (data.get("rows") or {}).get(split, "-"), f"`{sha[:16]}`" if sha else "-"]
            )
        L += _table(["split", "rows", "sha256 (16)"], split_rows)
        fb = data.get("feedback")
        if isinstance(fb, dict):  # a loop challenger: what the prediction log contributed
            L += [
                f"Feedback from the prediction log: {fb.get('feedback_train', 0)} rows trained on, "
                f"{fb.get('feedback_holdout', 0)} held out; dropped {fb.get('leakage', 0)} in the golden set "
                f"(leakage), {fb.get('conflicts_with_train', 0) + fb.get('conflicting_feedback', 0)} "
                "conflicting.",
                "",
            ]
        L += ["The full data card is `data_card.md` in this directory.", ""]
    else:
        L += ["No data card in this directory (not fine-tuned by lmloop).", ""]

    L += ["## Metrics", ""]
    if test or val:
        rows = []
        for split, m in (("test", test), ("validation", val)):
            if m:
                rows.append(
                    [
                        split,
                        m.get("n"),
                        _f(m.get("accuracy")),
                        _f(m.get("macro_f1")),
                        _f(m.get("ece")),
                        _f(m.get("nll")),
                    ]
                )
        L += _table(["split", "n", "accuracy", "macro-F1", "ECE", "NLL"], rows)
        per_domain = test.get("per_domain") or {}
        if per_domain:
            L += ["Per domain (test):", ""]
            L += _table(
                ["domain", "n", "accuracy", "macro-F1", "ECE"],
                [
                    [k, v.get("n"), _f(v.get("accuracy")), _f(v.get("macro_f1")), _f(v.get("ece"))]
                    for k, v in per_domain.items()
                ],
            )
    else:
        L += ["No metrics.json: not evaluated by lmloop (`lmloop evaluate --model DIR --data ...`).", ""]

    L += ["## Calibration", ""]
    if cal and not cal.get("skipped"):
        mc = metrics.get("calibration") or {}
        L += [
            f"Temperature scaling: logits are divided by T = {cal['temperature']:.4f} before the softmax "
            "(predicted labels are unchanged, only confidences). Fitted on "
            f"{cal.get('fitted_on', '-')} ({cal.get('n')} rows, {cal.get('errors')} errors).",
            "",
        ]
        rows = [
            [
                f"{cal.get('fitted_on', 'fit')} ({cal.get('n')} rows)",
                _f(cal.get("ece_before")),
                _f(cal.get("ece_after")),
                _f(cal.get("nll_before")),
                _f(cal.get("nll_after")),
            ]
        ]
        if "test_ece_before" in mc:
            raw = (test.get("uncalibrated") or {}).get("nll")
            rows.append(
                [
                    f"test ({test.get('n')} rows, at fine-tuning)",
                    _f(mc["test_ece_before"]),
                    _f(mc["test_ece_after"]),
                    _f(raw),
                    _f(test.get("nll")),
                ]
            )
        L += _table(["", "ECE before", "ECE after", "NLL before", "NLL after"], rows)
    elif cal:
        L += [f"Not scaled (T = 1): {cal['skipped']}.", ""]
    else:
        L += ["Raw softmax confidences (no calibration.json; `lmloop calibrate --model DIR` fits one).", ""]

    L += ["## Responsible evaluation", ""]
    L += _bias(audits["bias"]) + _membership(audits["membership"]) + _memorization(audits["memorization"])

    L += ["## Promotion gates", ""]
    if gates.get("gates"):
        L += [
            f"Last evaluated by `lmloop loop` (turn {gates.get('turn', '-')}): **{gates.get('decision', '-')}** "
            f"- {gates.get('reason', '')}",
            "",
        ]
        L += _table(
            ["gate", "value", "threshold", "result", "detail"],
            [
                [
                    g["name"],
                    _f(g.get("value")),
                    _f(g.get("threshold")),
                    "PASS" if g.get("passed") else "FAIL",
                    g.get("detail", ""),
                ]
                for g in gates["gates"]
            ],
        )
    else:
        L += ["Not evaluated by `lmloop loop` gates.", ""]

    L += ["## Limits", ""] + [f"- {x}" for x in _limits(meta, test, val, cal, audits, task)]
    return "\n".join(L) + "\n"


def _bias(doc: dict) -> list[str]:
    L = ["### Counterfactual bias", ""]
    s = _summary(doc)
    if not s:
        return L + ["Not audited (`lmloop audit bias --model DIR`).", ""]
    L += [
        f"Identity terms swapped in the same sentence: the worst family changes the predicted label in "
        f"{_f(s.get('max_flip_rate'))} of pairs, largest gap in mean score between groups "
        f"{_f(s.get('max_gap'))}.",
        "",
    ]
    fams = s.get("families") or {}
    if isinstance(fams, dict) and fams:
        L += _table(
            ["family", "pairs", "flip rate", "95% CI", "gap", "95% CI"],
            [
                [
                    k,
                    v.get("pairs", "-"),
                    _f(v.get("flip_rate")),
                    _ci(v.get("flip_rate_ci")),
                    _f(v.get("gap")),
                    _ci(v.get("gap_ci")),
                ]
                for k, v in fams.items()
                if isinstance(v, dict)
            ],
        )
    return L


def _membership(doc: dict) -> list[str]:
    L = ["### Membership inference", ""]
    s = _summary(doc)
    if not s:
        return L + ["Not audited (`lmloop audit membership --model DIR`).", ""]
    return L + [
        f"An attacker telling training rows from held-out rows by the model's loss reaches AUC "
        f"{_f(s.get('auc'))} (95% CI {_ci(s.get('auc_ci'))}; 0.5 = chance), advantage "
        f"{_f(s.get('advantage'))}.",
        "",
    ]


def _memorization(doc: dict) -> list[str]:
    L = ["### Memorization", ""]
    s = _summary(doc)
    if not s:
        return L + ["Not audited (generative models: `lmloop audit memorization --model DIR`).", ""]
    if s.get("skipped"):
        return L + [f"Skipped: {s['skipped']}.", ""]
    if s.get("max_exposure") is not None:
        L += [f"Largest canary exposure: {_f(s.get('max_exposure'), 2)} bits.", ""]
    can = doc.get("canaries") if isinstance(doc.get("canaries"), dict) else {}
    rows = can.get("by_repetitions") or []
    if rows and isinstance(rows[0], dict):
        L += _table(
            ["repetitions", "canaries", "mean exposure", "max exposure"],
            [
                [
                    r.get("repetitions", "-"),
                    r.get("canaries", "-"),
                    _f(r.get("mean_exposure"), 2),
                    _f(r.get("max_exposure"), 2),
                ]
                for r in rows
            ],
        )
    if s.get("extraction_train") is not None:
        L += [
            f"Verbatim extraction (greedy continuation of a document's prefix): "
            f"{_f(s.get('extraction_train'))} of training documents vs {_f(s.get('extraction_heldout'))} of "
            "held-out ones.",
            "",
        ]
    return L


def _limits(meta: dict, test: dict, val: dict, cal: dict, audits: dict, task: str) -> list[str]:
    out = []
    if meta.get("max_length"):
        out.append(
            f"Inputs longer than {meta['max_length']} tokens are truncated: the end of a long text is not read."
        )
    n, acc = test.get("n"), test.get("accuracy")
    if isinstance(n, int) and n > 0 and isinstance(acc, (int, float)):
        lo, hi = _wilson(acc, n)
        out.append(
            f"The test set has {n} rows: accuracy {acc:.4f} is known to within its 95% Wilson interval "
            f"[{lo:.3f}, {hi:.3f}]."
        )
    doms = test.get("per_domain") or {}
    accs = {k: v.get("accuracy") for k, v in doms.items() if isinstance(v.get("accuracy"), (int, float))}
    if len(accs) > 1 and min(accs.values()) < max(accs.values()):
        worst = min(accs, key=accs.get)
        out.append(
            f"Weakest domain: {worst} (accuracy {accs[worst]:.4f}, n={doms[worst].get('n')}, best "
            f"{max(accs.values()):.4f}); expect lower accuracy on domains not in the data."
        )
    if cal and not cal.get("skipped"):
        out.append(
            f"Calibration was fitted on {cal.get('n')} rows of the training distribution; under drift "
            "confidences become over-confident again (watch `lmloop monitor`)."
        )
    missing = [k for k in ("bias", "membership") if not audits.get(k)]
    if missing and task == "classification":
        out.append(f"Not audited for: {', '.join(missing)}.")
    out.append("Labels come from the training data as given; its errors and biases are learned too.")
    return out


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    centre, half = p + z * z / (2 * n), z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5
    d = 1 + z * z / n
    return max(0.0, (centre - half) / d), min(1.0, (centre + half) / d)


def write_card(model_dir: str | Path) -> Path:
    """Write ``MODEL_CARD.md`` into ``model_dir`` (only when its text changed) and return its path."""
    from lmloop.fsutil import atomic_write_text

    p = Path(model_dir) / CARD_FILE
    text = render_card(model_dir)
    if not (p.is_file() and p.read_text(encoding="utf-8") == text):
        atomic_write_text(p, text)
    return p


def refresh_card(model_dir: str | Path) -> Path | None:
    """Rewrite the card of a directory that has one (after an audit or a recalibration); None otherwise."""
    return write_card(model_dir) if (Path(model_dir) / CARD_FILE).is_file() else None


def refresh_card_after_audit(model_ref: str, out: str | Path) -> Path | None:
    """After ``lmloop audit`` wrote into ``MODEL/audit``: refresh that model's card. Registry copies
    (``models:/...``) are left alone: they are hash-checked downloads, not working directories."""
    model, out = Path(str(model_ref)), Path(out)
    if str(model_ref).startswith("models:/") or not model.is_dir() or out.resolve().parent != model.resolve():
        return None
    return refresh_card(model)


def write_gates(model_dir: str | Path, gates: list[dict], *, decision: str, reason: str, turn: str) -> Path:
    """Write ``gates.json`` (the loop's gate results for this model) and refresh the card."""
    from lmloop.fsutil import atomic_write_text

    doc = {"turn": turn, "decision": decision, "reason": reason, "gates": gates}
    p = atomic_write_text(Path(model_dir) / GATES_FILE, json.dumps(doc, indent=2, default=str) + "\n")
    write_card(model_dir)
    return p


def cmd_card(a: argparse.Namespace) -> int:
    from lmloop.assets import resolve_model
    from lmloop.errors import ConfigError

    path = Path(resolve_model(a.model))
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a model directory (no config.json)")
    if a.no_write:
        print(render_card(path))
        return 0
    p = write_card(path)
    if a.log:  # also as an artefact of the model's MLflow run
        from lmloop.mlops.tracking import Tracker

        run_id = _read(path / "lmloop.json").get("mlflow_run_id")
        if not run_id:
            raise ConfigError(f"{path / 'lmloop.json'} names no mlflow_run_id to log the card to")
        tr = Tracker(uri=a.tracking_uri)
        if not tr.resume(run_id):
            raise ConfigError(f"MLflow run {run_id} is not in {tr.uri}")
        tr.log_artifact(p, "reports")
        tr.end("FINISHED")
    print(p.read_text(encoding="utf-8") if not a.quiet else p)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``lmloop card`` to the top-level subparsers."""
    s = sub.add_parser(
        "card",
        help="write / print a model's MODEL_CARD.md (use, data, metrics, calibration, audits, gates, limits)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Render the model card of a model directory from the files the pipeline wrote beside it\n"
        "(lmloop.json, metrics.json, data_card.json, calibration.json, audit_*.json, gates.json) and write it\n"
        "to DIR/MODEL_CARD.md. Fine-tuning writes it; audits, `lmloop calibrate` and `lmloop loop` refresh it.\n\n"
        "  lmloop card --model runs/vader               # refresh and print it\n"
        "  lmloop card --model runs/vader --no-write    # print only\n"
        "  lmloop card --model runs/vader --log --quiet # refresh, log to the model's MLflow run",
    )
    s.add_argument("--model", required=True, metavar="DIR", help="a model directory (or packaged name)")
    s.add_argument("--no-write", action="store_true", help="print the card without writing it")
    s.add_argument("--log", action="store_true", help="also log it to the model's MLflow run (lmloop.json)")
    s.add_argument("--tracking-uri", metavar="URI", help="MLflow store for --log (default: the usual one)")
    s.add_argument("--quiet", action="store_true", help="print only the card's path")
    s.set_defaults(fn=cmd_card)

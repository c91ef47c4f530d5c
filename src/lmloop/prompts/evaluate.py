"""Evaluate prompt variants side by side on labelled data: accuracy, macro-F1, prompt size, latency.

A variant is a template with a number of shots (``NAME`` uses the template's own ``k``, ``--shots``
overrides it for few-shot templates, ``NAME:K`` for one variant). Shots come from the data's train split;
evaluated items from the chosen split. Each variant is one MLflow run (params, metrics, the template file
and one rendered prompt as artefacts); the comparison is written as ``report.json`` + ``report.html``.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmloop.errors import ConfigError
from lmloop.prompts.templates import PromptTemplate, load_template, render_chat

EXPERIMENT = "lmloop-prompts"


@dataclass
class Variant:
    template: PromptTemplate
    k: int

    @property
    def name(self) -> str:
        return f"{self.template.name}:{self.k}" if self.k else self.template.name


def parse_variants(spec: str | Sequence[str], shots: int | None = None) -> list[Variant]:
    """``"a,b:8,path/c.jinja"`` -> variants. ``shots`` replaces k of few-shot templates (k > 0) without
    their own ``:K``; zero-shot templates stay zero-shot."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise ConfigError("--templates is empty: name at least one template (see `lmloop prompt list`)")
    out = []
    for item in items:
        ref, k = item, None
        head, sep, tail = item.rpartition(":")
        if sep and tail.isdigit():
            ref, k = head, int(tail)
        tpl = load_template(ref)
        if k is None:
            k = shots if (shots is not None and tpl.k > 0) else tpl.k
        out.append(Variant(tpl, k))
    return out


def _check_labels(tpl: PromptTemplate, labels: Sequence[str]) -> None:
    missing = [lab for lab in labels if lab not in (tpl.labels or {})]
    if missing:
        raise ConfigError(
            f"{tpl.path}: the data's label(s) {', '.join(map(repr, missing))} are not among the template's "
            f"labels ({', '.join(map(repr, tpl.labels or {}))}); copy the template and map every label "
            "value of your data to a verbalizer under `labels:`"
        )


def _load_items(data: str, split: str, limit: int | None, seed: int, data_kwargs: dict):
    from lmloop.data import load_data, subsample

    prepared = load_data(data, **data_kwargs)
    frames = prepared.splits()
    if split not in frames:
        raise ConfigError(f"--split must be one of {', '.join(frames)}, got '{split}'")
    items = frames[split]
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be positive, got {limit}")
        items = subsample(items, limit, seed=seed)
    if not len(items):
        raise ConfigError(f"the {split} split of {data} is empty")
    return prepared, items.reset_index(drop=True)


def evaluate_prompts(
    model: str,
    data: str,
    templates: str | Sequence[str],
    *,
    shots: int | None = None,
    selection: str = "stratified",
    calibrate: bool = False,
    limit: int | None = None,
    split: str = "test",
    out: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 8,
    track: bool = True,
    progress: bool = True,
    data_kwargs: dict | None = None,
) -> dict[str, Any]:
    """Score each variant on ``split`` of ``data`` with ``model`` and return the comparison (also written
    under ``out`` when given). See the module docstring for what a variant is."""
    from tqdm.auto import tqdm

    from lmloop.evaluate import compute_metrics
    from lmloop.infer.generate import Generator
    from lmloop.prompts.fewshot import ShotSelector
    from lmloop.prompts.scoring import score_texts

    variants = parse_variants(templates, shots)
    prepared, items = _load_items(data, split, limit, seed, data_kwargs or {})
    labels = sorted(items["label"].astype(str).unique())
    for v in variants:
        _check_labels(v.template, prepared.labels)
    gen = Generator.load(model)
    texts = items["text"].astype(str).tolist()
    item_ids = [f"{split}:{i}" for i in range(len(items))]  # pool rows are "train:i": ids never collide
    pool = prepared.train
    selectors: dict[str, ShotSelector] = {}
    out_dir = Path(out) if out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    for v in variants:
        tpl = v.template
        t0 = time.perf_counter()
        shot_lists: list | None = None
        if v.k > 0:
            if selection not in selectors:
                selectors[selection] = ShotSelector(
                    pool["text"].astype(str).tolist(),
                    pool["label"].astype(str).tolist(),
                    selection,
                    seed=seed,
                    ids=[f"train:{i}" for i in range(len(pool))],
                )
            shot_lists = selectors[selection].select_many(texts, v.k, item_ids)
        t_sel = time.perf_counter() - t0
        with tqdm(total=len(texts), desc=v.name, unit="item", disable=not progress, leave=False) as bar:
            t1 = time.perf_counter()
            scored = score_texts(
                gen.model, gen.tokenizer, tpl, texts, shot_lists, calibrate, batch_size, bar.update
            )
            t_score = time.perf_counter() - t1
        values = scored.labels
        y = np.array([values.index(lab) for lab in items["label"].astype(str)])
        metrics = compute_metrics(y, scored.probs, values)
        example = render_chat(gen.tokenizer, tpl.messages(texts[0], shot_lists[0] if shot_lists else ()))
        row = {
            "variant": v.name,
            "template": tpl.ref,
            "path": tpl.path,
            "sha256": tpl.sha256,
            "shots": v.k,
            "selection": selection if v.k else "-",
            "calibrated": calibrate,
            "n": len(texts),
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "ece": metrics["ece"],
            "prompt_tokens": float(np.mean(scored.prompt_tokens)),
            "latency_ms": 1000.0 * (t_sel + t_score) / len(texts),
            "seconds": t_sel + t_score,
            "predicted_share": {lab: float(np.mean(np.array(scored.pred) == lab)) for lab in values},
            # calibration: the prompt's label prior on content-free inputs, averaged over shot sets
            "content_free": (
                dict(zip(values, np.mean(list(scored.content_free.values()), axis=0).tolist(), strict=True))
                if scored.content_free
                else None
            ),
            "confusion_matrix": metrics["confusion_matrix"],
            "example_prompt": example,
        }
        if calibrate:
            raw = compute_metrics(y, scored.raw, values)
            row["uncalibrated"] = {"accuracy": raw["accuracy"], "macro_f1": raw["macro_f1"]}
        rows.append(row)
        if out_dir:
            _write_predictions(out_dir / f"predictions-{_slug(v.name)}.csv", items, scored)
        if track:
            _track(row, tpl, model, data, prepared, split, seed, batch_size, out_dir)

    report = {
        "model": model,
        "data": str(data),
        "split": split,
        "labels": labels,
        "n": len(texts),
        "calibrate": calibrate,
        "selection": selection,
        "seed": seed,
        "data_fingerprint": prepared.fingerprint,
        "variants": rows,
    }
    if out_dir:
        (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (out_dir / "report.html").write_text(report_html(report))
    return report


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write_predictions(path: Path, items, scored) -> None:
    import pandas as pd

    df = pd.DataFrame({"text": items["text"], "label": items["label"], "pred": scored.pred})
    for j, lab in enumerate(scored.labels):
        df[f"p_{lab}"] = scored.probs[:, j]
    df.to_csv(path, index=False)


def _track(row, tpl, model, data, prepared, split, seed, batch_size, out_dir) -> None:
    import tempfile

    from lmloop.mlops.tracking import Tracker

    tracker = Tracker(experiment=EXPERIMENT)
    params = {
        "model": model,
        "data": str(data),
        "data.fingerprint": prepared.fingerprint,
        "split": split,
        "template": tpl.ref,
        "template.sha256": row["sha256"],
        "shots": row["shots"],
        "selection": row["selection"],
        "calibrate": row["calibrated"],
        "seed": seed,
        "batch_size": batch_size,
        "n": row["n"],
    }
    tags = {"lmloop.stage": "prompt-eval", "lmloop.template": tpl.ref}
    tracker.start(row["variant"] + (" +cal" if row["calibrated"] else ""), params=params, tags=tags)
    keys = ("accuracy", "macro_f1", "ece", "prompt_tokens", "latency_ms", "seconds")
    tracker.log_metrics({k: row[k] for k in keys})
    with tempfile.TemporaryDirectory() as tmp:
        ex = Path(tmp) / "example_prompt.txt"
        ex.write_text(row["example_prompt"])
        tracker.log_artifact(ex, "prompt")
        tracker.log_artifact(tpl.path, "prompt")
        res = Path(tmp) / "result.json"
        res.write_text(json.dumps({k: v for k, v in row.items() if k != "example_prompt"}, indent=2))
        tracker.log_artifact(res)
    if out_dir:
        pred = out_dir / f"predictions-{_slug(row['variant'])}.csv"
        tracker.log_artifact(pred)
    row["mlflow_run_id"] = tracker.run_id
    tracker.end()


# ---------------------------------------------------------------------------------------------- output

COLUMNS = (
    ("variant", "variant", "{}"),
    ("shots", "k", "{}"),
    ("selection", "select", "{}"),
    ("calibrated", "cal", "{}"),
    ("n", "n", "{}"),
    ("accuracy", "acc", "{:.4f}"),
    ("macro_f1", "macro-F1", "{:.4f}"),
    ("ece", "ECE", "{:.4f}"),
    ("prompt_tokens", "prompt tok", "{:.1f}"),
    ("latency_ms", "ms/item", "{:.1f}"),
)


def _cells(row: dict) -> list[str]:
    out = []
    for key, _, fmt in COLUMNS:
        v = row[key]
        out.append("yes" if v is True else "no" if v is False else fmt.format(v))
    return out


def format_table(report: dict) -> str:
    """The comparison as a plain-text table, one line per variant."""
    head = [h for _, h, _ in COLUMNS]
    body = [_cells(r) for r in report["variants"]]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def report_html(report: dict) -> str:
    """A small self-contained HTML page: the table and one rendered prompt per variant."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for _, h, _ in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(c)}</td>" for c in _cells(r)) + "</tr>" for r in report["variants"]
    )
    prompts = "".join(
        f"<h3>{e(r['variant'])} <small>{e(r['template'])} sha256 {e(r['sha256'][:12])}</small></h3>"
        f"<pre>{e(r['example_prompt'])}</pre>"
        for r in report["variants"]
    )
    meta = (
        f"model {e(str(report['model']))} · data {e(report['data'])} ({e(report['split'])}, n={report['n']})"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>prompt evaluation</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child{text-align:left}"
        "pre{background:#f6f6f6;padding:1em;white-space:pre-wrap}</style></head><body>"
        f"<h1>Prompt evaluation</h1><p>{meta}</p><table><tr>{head}</tr>{body}</table>"
        f"<h2>Rendered prompts (first item)</h2>{prompts}</body></html>"
    )

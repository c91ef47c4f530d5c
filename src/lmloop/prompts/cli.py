"""``lmloop prompt ...``: list / show / render / eval prompt templates (light imports; heavy work inside)."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_prompt(a: argparse.Namespace) -> int:
    return {"list": _list, "show": _show, "render": _render, "eval": _eval}[a.prompt_verb](a)


def _list(a: argparse.Namespace) -> int:
    from lmloop.prompts.templates import list_templates

    rows = list_templates()
    if a.json:
        print(json.dumps([t.describe() for t in rows], indent=2))
        return 0
    for t in rows:
        labels = ",".join(t.labels or {}) or "-"
        print(f"  {t.name:22s} v{t.version:4s} {t.task:9s} k={t.k:<2d} labels={labels:34s} {t.description}")
    return 0


def _show(a: argparse.Namespace) -> int:
    from pathlib import Path

    from lmloop.prompts.templates import load_template

    t = load_template(a.name)
    if a.json:
        print(json.dumps({**t.describe(), "system": t.system, "body": t.body, "sha256": t.sha256}, indent=2))
    else:
        print(f"# {t.path}  (sha256 {t.sha256[:16]})")
        print(Path(t.path).read_text(encoding="utf-8"), end="")
    return 0


def _parse_shots(pairs: list[str] | None) -> list[tuple[str, str]]:
    from lmloop.errors import ConfigError

    out = []
    for p in pairs or []:
        text, sep, label = p.rpartition("=")
        if not sep or not text or not label:
            raise ConfigError(f"--shot expects TEXT=LABEL, got '{p}'")
        out.append((text, label))
    return out


def _render(a: argparse.Namespace) -> int:
    from lmloop.prompts.templates import load_template

    t = load_template(a.name)
    messages = t.messages(a.text, _parse_shots(a.shot))
    if not a.model:
        for m in messages:
            print(f"[{m['role']}]\n{m['content']}\n")
        return 0
    from transformers import AutoTokenizer

    from lmloop.assets import resolve_model
    from lmloop.prompts.templates import label_continuations, prompt_ids, render_chat

    tok = AutoTokenizer.from_pretrained(resolve_model(a.model), trust_remote_code=False)
    print(render_chat(tok, messages))
    ids = prompt_ids(tok, messages)
    print(f"[{len(ids)} prompt tokens]", file=sys.stderr)
    if t.labels:
        for lab, cont in zip(t.label_values, label_continuations(tok, t), strict=True):
            print(f"[label {lab!r} -> answer {t.answer(lab)!r} = tokens {cont}]", file=sys.stderr)
    return 0


def _eval(a: argparse.Namespace) -> int:
    from lmloop.prompts.evaluate import evaluate_prompts, format_table

    data_kwargs = {
        "format": a.format,
        "text_column": a.text_column,
        "label_column": a.label_column,
        "seed": a.data_seed,
    }
    report = evaluate_prompts(
        a.model,
        a.data,
        a.templates,
        shots=a.shots,
        selection=a.selection,
        calibrate=a.calibrate,
        limit=a.limit,
        split=a.split,
        out=a.out,
        seed=a.seed,
        batch_size=a.batch_size,
        track=not a.no_track,
        progress=not a.quiet,
        data_kwargs=data_kwargs,
    )
    if a.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"model {a.model}  data {a.data} ({a.split}, n={report['n']})")
    print(format_table(report))
    if a.out:
        print(f"report: {a.out}/report.json, {a.out}/report.html")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``prompt`` verb (list / show / render / eval) to the top-level subparsers."""
    raw = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser(
        "prompt",
        help="prompt templates as artefacts: list / render / eval variants (few-shot, calibrated)",
        formatter_class=raw,
        description="Prompt templates are versioned files (YAML front matter + a sandboxed Jinja body) in\n"
        "src/lmloop/prompts/library or anywhere on disk. A classify template maps each label value to a\n"
        "verbalizer; the model is scored on each verbalizer (log-likelihood of the answer after the chat\n"
        "template's assistant prompt), so no free text is parsed.\n\n"
        "examples:\n"
        "  lmloop prompt list\n"
        "  lmloop prompt show sentiment-few-shot\n"
        "  lmloop prompt render sentiment-zero-shot --text 'What a lovely day' --model smollm2\n"
        "  lmloop prompt eval --model smollm2 --data vader-sentiment \\\n"
        "      --templates sentiment-zero-shot,sentiment-few-shot --shots 4 --limit 500 --out runs/prompts",
    )
    s.set_defaults(fn=lambda a: (s.print_help(), 2)[1])
    ps = s.add_subparsers(dest="prompt_verb", metavar="ACTION")

    q = ps.add_parser("list", help="the shipped templates", formatter_class=raw,
                      description="The shipped templates: name, version, task, default shots k, labels.\n\n"
                      "  lmloop prompt list --json")  # fmt: skip
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(fn=cmd_prompt)

    q = ps.add_parser("show", help="print a template file", formatter_class=raw,
                      description="Print a template file (front matter + body) and its digest.\n\n"
                      "  lmloop prompt show sentiment-zero-shot\n  lmloop prompt show my/prompt.jinja --json")  # fmt: skip
    q.add_argument("name", help="a shipped template name or a .jinja path")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(fn=cmd_prompt)

    q = ps.add_parser("render", help="render a template for a text (optionally through a chat template)",
                      formatter_class=raw,
                      description="Render a template for one text: the chat messages, or with --model the exact\n"
                      "prompt text the model sees (its chat template applied) plus token counts on stderr.\n\n"
                      "  lmloop prompt render sentiment-zero-shot --text 'great movie'\n"
                      "  lmloop prompt render sentiment-few-shot --text 'great movie' --model smollm2 \\\n"
                      "      --shot 'I loved it=positive' --shot 'Dull and long=negative'")  # fmt: skip
    q.add_argument("name", help="a shipped template name or a .jinja path")
    q.add_argument("--text", required=True, help="the text to classify")
    q.add_argument("--shot", action="append", metavar="TEXT=LABEL", help="a few-shot example (repeatable)")
    q.add_argument(
        "--model", metavar="REF", help="apply this model's chat template (only its tokenizer loads)"
    )
    q.set_defaults(fn=cmd_prompt)

    q = ps.add_parser("eval", help="compare template variants on labelled data", formatter_class=raw,
                      description="Evaluate template variants on a labelled split: accuracy, macro-F1, ECE, mean\n"
                      "prompt tokens, latency per item. Shots come from the train split, never the item itself.\n"
                      "A variant is NAME (its own k), NAME:K, or a .jinja path; --shots K sets k of every\n"
                      "few-shot template. Each variant is tracked as an MLflow run (experiment lmloop-prompts).\n\n"
                      "  lmloop prompt eval --model smollm2 --data vader-sentiment \\\n"
                      "      --templates sentiment-zero-shot,sentiment-few-shot --shots 4 --limit 500\n"
                      "  lmloop prompt eval --model smollm2 --data news.csv --templates topic-few-shot:8 \\\n"
                      "      --selection knn --calibrate --out runs/topic-prompts")  # fmt: skip
    q.add_argument("--model", default="smollm2", metavar="REF", help="a causal LM (default: smollm2)")
    g = q.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="PATH|NAME",
                   help="CSV/TSV/JSONL/Parquet file, HF datasets dir, folder tree or vader-sentiment")  # fmt: skip
    g.add_argument("--format", choices=["csv", "tsv", "jsonl", "parquet", "hf", "folder"],
                   help="force the format (default: detected)")  # fmt: skip
    g.add_argument("--text-column", default="text", metavar="C", help="text column (default: text)")
    g.add_argument("--label-column", default="label", metavar="C", help="label column (default: label)")
    g.add_argument("--data-seed", type=int, default=42, metavar="S", help="seed of the train/val/test split")
    g.add_argument("--split", default="test", choices=["train", "validation", "test"],
                   help="the split to evaluate on (default: test; shots always come from train)")  # fmt: skip
    g.add_argument("--limit", type=int, metavar="N", help="evaluate at most N items (stratified sample)")
    q.add_argument("--templates", required=True, metavar="A,B,...", help="variants to compare")
    q.add_argument("--shots", type=int, metavar="K", help="shots per few-shot template (default: its k)")
    q.add_argument("--selection", default="stratified", choices=["random", "stratified", "knn"],
                   help="how shots are picked (default: stratified = balanced over labels)")  # fmt: skip
    q.add_argument("--calibrate", action="store_true",
                   help="contextual calibration: divide by the label prior on content-free inputs")  # fmt: skip
    q.add_argument("--seed", type=int, default=0, help="seed of the shot selection and --limit sample")
    q.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per forward pass")
    q.add_argument("--out", metavar="DIR", help="write report.json, report.html and predictions here")
    q.add_argument("--no-track", action="store_true", help="do not record MLflow runs")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(fn=cmd_prompt)

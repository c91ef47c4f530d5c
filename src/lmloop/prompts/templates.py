"""Prompt templates as versioned files: YAML front matter + a sandboxed Jinja body.

A template file (``*.jinja``) looks like::

    ---
    name: sentiment-zero-shot
    version: "1"
    task: classify                # classify | generate
    description: one line on what it is for
    labels: {positive: positive, negative: negative}   # label value -> verbalizer (the answer text)
    system: You are a sentiment classifier ...           # optional, Jinja too
    shots: turns                  # optional: turns (default) | inline
    shots_header: "Examples:"     # optional, for inline shots
    k: 4                          # optional: default number of shots (0 = a zero-shot template)
    ---
    Text: {{ text }}
    Is the sentiment {{ answers | join(" or ") }}?

The body renders the user turn. Variables: ``text``, ``answers`` (verbalizers in label order), ``labels``
(the mapping), ``shots`` (list of ``{text, label, answer}``; empty unless ``shots: inline``), ``shots_header``
and whatever ``vars:`` holds. With ``shots: turns`` every shot becomes its own user/assistant exchange, the
user turn rendered by the same body. Undefined variables are errors (StrictUndefined), and the body runs in
Jinja's sandbox: a template is data, not code.

The token layout is fixed here once: ``prompt_ids(tok, messages) + answer_ids(tok, answer) + [end]`` is what
supervised fine-tuning trains on and what label scoring scores (``end = end_of_turn_id(tok)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmloop.errors import ConfigError

LIBRARY = Path(__file__).parent / "library"
TASKS = ("classify", "generate")
REQUIRED = ("name", "version", "task", "description")
OPTIONAL = ("labels", "system", "shots", "shots_header", "k", "vars")
SHOT_STYLES = ("turns", "inline")


@lru_cache(maxsize=1)
def _env():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # keep_trailing_newline=False + trim_blocks: a template file's layout does not leak stray newlines
    return ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False
    )


@dataclass
class PromptTemplate:
    """One prompt variant: metadata from the front matter and the Jinja source of the user turn."""

    name: str
    version: str
    task: str  # "classify" | "generate"
    description: str
    labels: dict[str, str] | None  # label value -> verbalizer (answer text), e.g. {"1": "positive"}
    system: str | None
    body: str  # Jinja source of the user turn (sandboxed, StrictUndefined)
    path: str
    shots_style: str = "turns"
    shots_header: str = ""
    k: int = 0  # default number of few-shot examples (0: zero-shot)
    vars: dict[str, Any] = field(default_factory=dict)
    body_line: int = 1  # 1-based line of the file where the body starts (for error messages)

    @property
    def ref(self) -> str:
        """``name@version``: how reports and runs name this variant."""
        return f"{self.name}@{self.version}"

    @property
    def sha256(self) -> str:
        """Digest of the template file's bytes (what exactly was evaluated)."""
        return hashlib.sha256(Path(self.path).read_bytes()).hexdigest() if Path(self.path).is_file() else ""

    @property
    def label_values(self) -> list[str]:
        return list(self.labels or {})

    def answer(self, label: str) -> str:
        """The verbalizer of a label value (the text the model should answer)."""
        if not self.labels:
            raise ConfigError(f"{self.path}: template '{self.name}' has no labels (task: {self.task})")
        try:
            return self.labels[str(label)]
        except KeyError:
            raise ConfigError(
                f"{self.path}: label '{label}' is not in the template's labels ({', '.join(self.labels)}); "
                "the data's label values must match the template's `labels:` keys"
            ) from None

    def _context(self, text: str, shots: list[dict]) -> dict[str, Any]:
        return {
            **self.vars,
            "text": text,
            "shots": shots,
            "shots_header": self.shots_header,
            "labels": dict(self.labels or {}),
            "answers": list((self.labels or {}).values()),
        }

    def _render(self, source: str, ctx: dict, where: str, first_line: int) -> str:
        from jinja2 import TemplateError, TemplateSyntaxError, UndefinedError

        try:
            return _env().from_string(source).render(ctx).strip()
        except TemplateSyntaxError as e:  # normally caught at load time
            raise ConfigError(
                f"{self.path}, line {first_line + (e.lineno or 1) - 1}: {where}: {e.message}"
            ) from None
        except UndefinedError as e:
            known = ", ".join(sorted(ctx))
            raise ConfigError(f"{self.path}: {where}: {e.message} (variables: {known})") from None
        except TemplateError as e:  # sandbox violations and the like
            raise ConfigError(f"{self.path}: {where}: {e}") from None

    def user_turn(self, text: str, shots: Sequence[tuple[str, str]] = ()) -> str:
        """The body rendered for ``text``; ``shots`` are passed to it only with ``shots: inline``."""
        items = [{"text": t, "label": lab, "answer": self.answer(lab)} for t, lab in shots]
        return self._render(self.body, self._context(text, items), "body", self.body_line)

    def messages(self, text: str, shots: Sequence[tuple[str, str]] = ()) -> list[dict]:
        """Chat messages for ``text`` (no answer): system, the shots, then the user turn.

        ``shots`` are (text, label value) pairs: with ``shots: turns`` each becomes a user turn and an
        assistant answer (the label's verbalizer); with ``shots: inline`` the body lays them out itself."""
        msgs: list[dict] = []
        if self.system:
            system = self._render(self.system, self._context("", []), "system", 1)
            msgs.append({"role": "system", "content": system})
        shots = list(shots)
        if self.shots_style == "turns":
            for t, lab in shots:
                msgs.append({"role": "user", "content": self.user_turn(t)})
                msgs.append({"role": "assistant", "content": self.answer(lab)})
            shots = []
        msgs.append({"role": "user", "content": self.user_turn(text, shots)})
        return msgs

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "description": self.description,
            "labels": self.labels,
            "shots": self.shots_style,
            "k": self.k,
            "path": self.path,
        }


# ------------------------------------------------------------------------------------------- loading


def parse_template(source: str, path: str) -> PromptTemplate:
    """Parse a template file's text (front matter + body); errors name ``path`` and the line."""
    import yaml

    lines = source.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise ConfigError(f"{path}, line 1: a template starts with YAML front matter between '---' lines")
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        raise ConfigError(f"{path}: the front matter opened on line 1 is never closed by a '---' line")
    try:
        meta = yaml.safe_load("".join(lines[1:end])) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 2}" if mark is not None else ""
        raise ConfigError(
            f"{path}{line}: front matter is not valid YAML: {getattr(e, 'problem', e)}"
        ) from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: front matter must be a YAML mapping (key: value lines)")
    missing = [k for k in REQUIRED if meta.get(k) in (None, "")]
    if missing:
        raise ConfigError(
            f"{path}: front matter lacks required key(s): {', '.join(missing)} "
            f"(required: {', '.join(REQUIRED)}; optional: {', '.join(OPTIONAL)})"
        )
    unknown = sorted(set(meta) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ConfigError(
            f"{path}: unknown front-matter key(s): {', '.join(unknown)} "
            f"(known: {', '.join(REQUIRED + OPTIONAL)}; put your own variables under `vars:`)"
        )
    task = str(meta["task"])
    if task not in TASKS:
        raise ConfigError(f"{path}: task must be one of {', '.join(TASKS)}, got '{task}'")
    labels = meta.get("labels")
    if labels is not None:
        if not isinstance(labels, dict) or not labels:
            raise ConfigError(f"{path}: labels must be a non-empty mapping of label value -> verbalizer")
        odd = [(k, v) for k, v in labels.items() if isinstance(k, bool) or isinstance(v, bool) or v is None]
        if odd:
            raise ConfigError(
                f"{path}: labels entry {odd[0][0]!r}: {odd[0][1]!r} holds a YAML boolean or null "
                "(yes/no/on/off/true/false/~ unquoted); "
                'quote label values and verbalizers, e.g. "yes": "yes"'
            )
        labels = {str(k): str(v) for k, v in labels.items()}
        if any(not v.strip() for v in labels.values()):
            raise ConfigError(f"{path}: every label needs a non-empty verbalizer")
        if len(set(labels.values())) != len(labels):
            raise ConfigError(f"{path}: verbalizers must be distinct, got {list(labels.values())}")
    if task == "classify" and not labels:
        raise ConfigError(f"{path}: a classify template needs `labels:` (label value -> verbalizer)")
    style = str(meta.get("shots") or "turns")
    if style not in SHOT_STYLES:
        raise ConfigError(f"{path}: shots must be one of {', '.join(SHOT_STYLES)}, got '{style}'")
    k = meta.get("k", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ConfigError(f"{path}: k (default number of shots) must be a non-negative integer, got {k!r}")
    extra = meta.get("vars") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{path}: vars must be a mapping of variable name -> value")

    body = "".join(lines[end + 1 :])
    tpl = PromptTemplate(
        name=str(meta["name"]),
        version=str(meta["version"]),
        task=task,
        description=str(meta["description"]).strip(),
        labels=labels,
        system=None if meta.get("system") is None else str(meta["system"]).strip(),
        body=body,
        path=str(path),
        shots_style=style,
        shots_header=str(meta.get("shots_header") or ""),
        k=k,
        vars=dict(extra),
        body_line=end + 2,
    )
    _check_syntax(tpl)
    # a trial render surfaces undefined variables now, not mid-evaluation
    tpl.messages("example text", [("example shot", next(iter(labels)))] if labels else [])
    return tpl


def _check_syntax(tpl: PromptTemplate) -> None:
    from jinja2 import TemplateSyntaxError

    for where, src, first in (("body", tpl.body, tpl.body_line), ("system", tpl.system, None)):
        if src is None:
            continue
        try:
            _env().parse(src)
        except TemplateSyntaxError as e:
            # the system prompt is a YAML value: its line within the value is the best we can say
            loc = f"line {first + (e.lineno or 1) - 1}" if first else f"system prompt line {e.lineno}"
            raise ConfigError(f"{tpl.path}, {loc}: Jinja syntax error in the {where}: {e.message}") from None


def load_template(ref: str | Path) -> PromptTemplate:
    """A shipped template by name (``sentiment-zero-shot``) or a ``.jinja`` file path."""
    p = Path(ref)
    if p.suffix in (".jinja", ".j2") or p.exists():
        if not p.is_file():
            raise ConfigError(f"template file not found: {p}")
        return parse_template(p.read_text(encoding="utf-8"), str(p))
    for tpl in list_templates():
        if tpl.name == str(ref) or tpl.ref == str(ref):
            return tpl
    names = ", ".join(t.name for t in list_templates())
    raise ConfigError(f"no template named '{ref}' (shipped: {names}); or give a path to a .jinja file")


def list_templates() -> list[PromptTemplate]:
    """The shipped library (``lmloop/prompts/library/*.jinja``), sorted by name."""
    return sorted(
        (parse_template(f.read_text(encoding="utf-8"), str(f)) for f in LIBRARY.glob("*.jinja")),
        key=lambda t: t.name,
    )


# ------------------------------------------------------------------------------------ token layout


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _plain_chat(messages: list[dict]) -> str:
    # for tokenizers without a chat template (base models): a plain transcript ending in "Assistant:"
    parts = []
    for m in messages:
        role = {"system": "", "user": "User: ", "assistant": "Assistant: "}.get(m["role"], m["role"] + ": ")
        parts.append(role + m["content"])
    return "\n\n".join(parts) + "\n\nAssistant:"


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The prompt text: the tokenizer's chat template with the generation prompt (or a plain transcript)."""
    if not _has_chat_template(tokenizer):
        return _plain_chat(messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the rendered prompt, the generation prompt (``<|im_start|>assistant\\n``) included."""
    # the chat template writes its own special tokens (BOS etc.): do not add them twice
    return list(tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"])


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The answer's tokens as they follow :func:`prompt_ids` (chat templates end in a newline; the plain
    transcript ends in ``Assistant:``, so the answer there starts with a space)."""
    text = answer if _has_chat_template(tokenizer) else " " + answer
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_id(tokenizer) -> int | None:
    """The token that closes an assistant turn (``<|im_end|>`` for ChatML), else EOS."""
    if _has_chat_template(tokenizer):
        sentinel = "\x00ANSWER\x00"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}], tokenize=False
        )
        after = text.split(sentinel, 1)[-1]
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        if ids and ids[0] in special:
            return int(ids[0])
    eos = getattr(tokenizer, "eos_token_id", None)
    return None if eos is None else int(eos)


def label_continuations(tokenizer, template: PromptTemplate) -> list[list[int]]:
    """Per label (template order): answer tokens + the end-of-turn token, the sequence scoring compares.
    Ending the continuation with the turn's end keeps a label that is a prefix of another from winning."""
    end = end_of_turn_id(tokenizer)
    tail = [] if end is None else [end]
    return [answer_ids(tokenizer, template.answer(lab)) + tail for lab in template.label_values]

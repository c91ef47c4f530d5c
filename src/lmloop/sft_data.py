"""SFT examples: data -> (prompt ids, response ids) pairs, in the token layout of :mod:`lmloop.prompts.templates`.

``prompt_ids(tok, messages) + answer_ids(tok, answer) + [end_of_turn_id(tok)]`` is both what SFT trains on
and what label-constrained scoring scores, so a fine-tuned adapter is evaluated on exactly the sequences it
learnt. Labelled data (text, label) goes through :func:`lmloop.data.load_data` like the classifier's (the
same splits, fingerprints and data card); instruction data is JSONL, one example per line::

    {"prompt": "Name a river.", "response": "The Danube.", "system": "optional"}
    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}

With ``messages`` the last message is the response (it must be the assistant's); earlier turns are context.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmloop.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
_JSONL = (".jsonl", ".ndjson")


@dataclass
class SftExample:
    """One training sequence: the prompt (no loss) and the response (loss), as token ids."""

    prompt: list[int]
    response: list[int]  # answer tokens + end-of-turn
    text: str | None = None  # labelled data: the (possibly shortened) input text
    label: str | None = None  # labelled data: the label value


@dataclass
class SftData:
    kind: str  # "labelled" | "instruction"
    train: list[SftExample]
    validation: list[SftExample]
    test: list[SftExample]
    fingerprint: str
    source: str
    labels: list[str] = field(default_factory=list)  # labelled data: label values, template order
    template: Any = None  # lmloop.prompts.templates.PromptTemplate (labelled data)
    label_continuations: list[list[int]] = field(default_factory=list)  # per label: answer + end-of-turn
    tokenizer: Any = None
    card: dict = field(default_factory=dict)
    dropped: int = 0  # examples that could not fit model.max_length

    def render_prompt(self, text: str) -> list[int]:
        """Prompt ids of ``text`` under this data's template (labelled data)."""
        from lmloop.prompts.templates import prompt_ids

        return prompt_ids(self.tokenizer, self.template.messages(text))


def instruction_file(path: str | None) -> bool:
    """True when ``path`` is a JSONL file whose first record has ``messages`` or ``prompt``+``response``."""
    if not path or Path(path).suffix.lower() not in _JSONL or not Path(path).is_file():
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError:
                    return False
                return isinstance(rec, dict) and ("messages" in rec or {"prompt", "response"} <= set(rec))
    return False


def read_instructions(path: str | Path) -> list[list[dict]]:
    """Read instruction JSONL into chat conversations (each ending with the assistant's response)."""
    p = Path(path)
    convs: list[list[dict]] = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}, line {lineno}"
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected an object with prompt/response or messages")
            if "messages" in rec:
                msgs = rec["messages"]
                ok = (
                    isinstance(msgs, list)
                    and msgs
                    and all(
                        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                        for m in msgs
                    )
                )
                if not ok:
                    raise DataError(
                        f"{where}: 'messages' must be a non-empty list of {{role: system|user|assistant, "
                        "content: string}}"
                    )
                if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                    raise DataError(
                        f"{where}: the last message must be the assistant's response, after a prompt"
                    )
                convs.append([{"role": m["role"], "content": m["content"]} for m in msgs])
            elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
                sys_msg = rec.get("system")
                convs.append(
                    [
                        *([{"role": "system", "content": str(sys_msg)}] if sys_msg else []),
                        {"role": "user", "content": rec["prompt"]},
                        {"role": "assistant", "content": rec["response"]},
                    ]
                )
            else:
                raise DataError(
                    f"{where}: expected string fields 'prompt' and 'response', or 'messages'; "
                    f"found keys {sorted(rec)}"
                )
    if not convs:
        raise DataError(f"{p}: no examples (empty file)")
    return convs


def _fingerprint(convs: list[list[dict]]) -> str:
    h = hashlib.sha256()
    for line in sorted(json.dumps(c, sort_keys=True, ensure_ascii=False) for c in convs):
        h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


def _split(items: list, seed: int, val_frac: float, test_frac: float) -> tuple[list, list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val, n_test = round(len(items) * val_frac), round(len(items) * test_frac)
    if len(items) >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    test = [items[i] for i in order[:n_test]]
    val = [items[i] for i in order[n_test : n_test + n_val]]
    train = [items[i] for i in order[n_test + n_val :]]
    return train, val, test


def instruction_data(recipe, tok) -> SftData:
    """Instruction JSONL -> SftData (seeded val/test split unless explicit files are given)."""
    from lmloop.prompts.templates import answer_ids, end_of_turn_id, prompt_ids

    d, max_len = recipe.data, recipe.model.max_length
    train_path = d.train or d.path
    convs = read_instructions(train_path)
    if d.validation or d.test:
        train = convs
        val = read_instructions(d.validation) if d.validation else []
        test = read_instructions(d.test) if d.test else []
    else:
        train, val, test = _split(convs, d.seed, d.val_frac, d.test_frac)
    if d.limit:
        train, cap = train[: d.limit], max(d.limit // 4, 1)
        val, test = val[:cap], test[:cap]
    end = end_of_turn_id(tok)
    tail = [] if end is None else [end]
    dropped = 0

    def encode(cs: list[list[dict]]) -> list[SftExample]:
        nonlocal dropped
        out = []
        for c in cs:
            ex = SftExample(prompt_ids(tok, c[:-1]), answer_ids(tok, c[-1]["content"]) + tail)
            if len(ex.prompt) + len(ex.response) > max_len:
                dropped += 1  # cutting a response would teach the model to stop mid-answer
                continue
            out.append(ex)
        return out

    data = SftData(
        kind="instruction",
        train=encode(train),
        validation=encode(val),
        test=encode(test),
        fingerprint=_fingerprint(convs),
        source=str(train_path),
        tokenizer=tok,
    )
    data.dropped = dropped
    if not data.train:
        raise DataError(
            f"{train_path}: no training example fits model.max_length={max_len} tokens; raise max_length"
        )
    return data


def labelled_example(
    tok, template, text: str, label: str, cont: list[int], max_len: int
) -> SftExample | None:
    """One labelled example; a text too long for ``max_len`` is shortened (its tokens cut), never the answer."""
    from lmloop.prompts.templates import prompt_ids

    for _ in range(4):
        prompt = prompt_ids(tok, template.messages(text))
        over = len(prompt) + len(cont) - max_len
        if over <= 0:
            return SftExample(prompt, list(cont), text=text, label=label)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        keep = len(ids) - over - 2  # re-tokenising a cut text can merge tokens differently: a small margin
        if keep < 1:
            return None
        text = tok.decode(ids[:keep])
    return None


def labelled_data(recipe, tok) -> SftData:
    """Labelled data (lmloop.data) rendered through ``sft.template``; val/test shuffled with data.seed so
    that ``sft.eval_limit`` takes a random sample of them."""
    from lmloop.finetune import load_recipe_data
    from lmloop.prompts.templates import label_continuations, load_template

    if not recipe.sft.template:
        raise ConfigError(
            "sft.template is required for labelled data (--template NAME or a .jinja path): it turns each "
            "text into a prompt and each label into an answer; see `lmloop prompt list`"
        )
    template = load_template(recipe.sft.template)
    if not template.labels:
        raise ConfigError(
            f"template '{template.name}' ({template.path}) has no labels: it cannot verbalize a label"
        )
    prepared = load_recipe_data(recipe)
    unknown = [lab for lab in prepared.labels if lab not in template.labels]
    if unknown:
        raise ConfigError(
            f"data labels {unknown} are not in template '{template.name}' labels ({', '.join(template.labels)}) "
            f"({template.path}); choose a template whose `labels:` keys are the data's label values"
        )
    labels = template.label_values
    conts = label_continuations(tok, template)
    cont_of = dict(zip(labels, conts, strict=True))
    max_len, dropped = recipe.model.max_length, 0

    def encode(df, shuffle: bool) -> list[SftExample]:
        nonlocal dropped
        rows = list(zip(df["text"].tolist(), df["label"].tolist(), strict=True))
        if shuffle:
            random.Random(recipe.data.seed).shuffle(rows)
        out = []
        for text, lab in rows:
            ex = labelled_example(tok, template, str(text), str(lab), cont_of[str(lab)], max_len)
            if ex is None:
                dropped += 1
            else:
                out.append(ex)
        return out

    return SftData(
        kind="labelled",
        train=encode(prepared.train, False),
        validation=encode(prepared.validation, True),
        test=encode(prepared.test, True),
        fingerprint=prepared.fingerprint,
        source=prepared.source,
        labels=labels,
        template=template,
        label_continuations=conts,
        tokenizer=tok,
        card=prepared.card,
        dropped=dropped,
    )


def load_sft_data(recipe, tok) -> SftData:
    """Instruction JSONL or labelled data, whichever ``recipe.data`` holds."""
    d = recipe.data
    if instruction_file(d.train or d.path):
        if recipe.sft.template:
            raise ConfigError(
                f"{d.train or d.path} holds instruction data (prompt/response or messages), which carries its "
                "own prompts: drop sft.template (--template), which applies to labelled (text, label) data"
            )
        return instruction_data(recipe, tok)
    return labelled_data(recipe, tok)

"""Text generation with any Hugging Face causal LM: chat templates, sampling, stop strings, streaming.

One small decode loop over ``model(...)`` with the KV cache (``cache``, formerly ``past_key_values``): the prompt is run once,
then each step feeds only the newest token, so a step costs one token's work however long the context
is. Writing the loop (rather than wrapping ``model.generate``) gives exact stop strings, streaming without
a helper thread, and honest per-call figures (prompt tokens, generated tokens, seconds, tokens/s).

Sampling, in this order: repetition penalty (CTRL-style, over prompt and output), temperature, top-k,
top-p (nucleus), then one draw from a ``torch.Generator`` seeded with ``seed`` — the same seed, model and
prompt give the same text. ``temperature=0`` is greedy (argmax; top-k/top-p are ignored).

Stop strings cut the output exactly, also when a stop string spans several tokens or ends inside one:
the text is decoded from all generated ids at every step, searched for each stop string, and a tail
that could still grow into a stop string (or an incomplete UTF-8 character) is held back from the
stream until the next token settles it.

Safety: ``trust_remote_code`` is always off and only safetensors weights are read.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lmloop.errors import AssetError, ConfigError

DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 128,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 50,
    "stop": (),
    "seed": None,
    "repetition_penalty": 1.0,
}


def check_params(
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    stop: list[str] | tuple[str, ...] | None = (),
    seed: int | None = None,
) -> None:
    """Raise :class:`ConfigError` naming the parameter when a sampling parameter is out of range."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not repetition_penalty > 0:
        raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty!r}")
    if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop or ()):
        raise ConfigError(f"stop must be a list of non-empty strings, got {stop!r}")
    if seed is not None and not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")


@dataclass
class Generation:
    """The result of one call: the text and what it cost."""

    text: str
    tokens: int  # generated tokens (an end-of-sequence token is not counted)
    prompt_tokens: int
    seconds: float  # prompt + decode wall time
    finish_reason: str  # "eos" | "stop" (a stop string) | "length" (max_new_tokens or the context window)
    first_token_seconds: float = 0.0
    token_ids: list[int] = field(default_factory=list, repr=False)  # generated ids (before a stop cut)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Generator:
    """A loaded causal LM and its tokenizer; ``stream`` / ``generate`` run the decode loop.

    ``Generator.load(ref)`` takes a local HF directory, a packaged name (``smollm2``) or a Hub id where
    the Hub is reachable. ``last`` holds the :class:`Generation` of the most recent call.
    """

    tokenizer: Any
    model: Any
    path: str = ""
    last: Generation | None = field(default=None, repr=False)

    @classmethod
    def load(cls, ref: str) -> Generator:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lmloop.assets import resolve_model
        from lmloop.models import _quiet

        path = resolve_model(ref)
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            model = _quiet(
                lambda: AutoModelForCausalLM.from_pretrained(
                    path, trust_remote_code=False, use_safetensors=True, dtype=torch.float32
                )
            )
        except (OSError, ValueError, KeyError) as e:
            raise AssetError(
                f"could not load a causal LM from '{ref}' ({path}): {str(e).splitlines()[0][:300]}. Expected a "
                "Hugging Face directory with config.json, model.safetensors and tokenizer files"
            ) from None
        return cls(tok, model.eval(), path)

    # ----------------------------------------------------------------------------------------- prompts

    @property
    def context_length(self) -> int:
        cfg = self.model.config
        n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return int(n) if n else int(min(self.tokenizer.model_max_length, 1 << 20))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` ([{"role", "content"}, ...]) as text."""
        if not self.has_chat_template:
            raise ConfigError(
                f"the tokenizer of {self.path or 'this model'} has no chat template: give a plain prompt "
                "with raw=True (--raw), or use a chat model (e.g. smollm2)"
            )
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def prompt_ids(
        self,
        prompt: str | None = None,
        messages: list[dict] | None = None,
        *,
        system: str | None = None,
        raw: bool = False,
    ) -> list[int]:
        """Token ids for a prompt (a string, or a messages list rendered by the chat template).

        A string prompt becomes one user message under the chat template (with ``system`` before it)
        unless ``raw`` is set or the tokenizer has no template; then it is tokenized as plain text.
        """
        if (prompt is None) == (messages is None):
            raise ConfigError("give exactly one of prompt (a string) or messages (a list of {role, content})")
        if messages is not None:
            msgs = [*([{"role": "system", "content": system}] if system else []), *messages]
            text = self.render(msgs)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if raw or not self.has_chat_template:
            return self.tokenizer(prompt)["input_ids"]
        msgs = [
            *([{"role": "system", "content": system}] if system else []),
            {"role": "user", "content": prompt},
        ]
        return self.tokenizer(self.render(msgs), add_special_tokens=False)["input_ids"]

    def eos_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            ids.update(e if isinstance(e, (list, tuple)) else [e] if e is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ------------------------------------------------------------------------------------------ decode

    def stream(
        self,
        prompt: str | None = None,
        messages: list[dict] | None = None,
        *,
        system: str | None = None,
        raw: bool = False,
        ids: list[int] | None = None,
        use_cache: bool = True,
        max_new_tokens: int = 128,
        temperature: float = 0.7,
        top_p: float = 0.9,
        top_k: int = 50,
        stop: list[str] | tuple[str, ...] = (),
        seed: int | None = None,
        repetition_penalty: float = 1.0,
    ) -> Iterator[str]:
        """Yield the completion as text pieces while it is generated; ``self.last`` holds the result after.

        ``ids`` (prompt token ids) bypasses prompt building. ``use_cache=False`` re-runs the whole
        sequence every step (same output, quadratic cost: for tests and comparisons only).
        """
        import torch

        check_params(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            stop=stop,
            seed=seed,
        )
        stop = tuple(stop or ())
        if ids is None:
            ids = self.prompt_ids(prompt, messages, system=system, raw=raw)
        ids = list(ids)
        ctx = self.context_length
        if not ids:
            raise ConfigError("the prompt is empty")
        if len(ids) >= ctx:
            raise ConfigError(f"the prompt is {len(ids)} tokens; the model's context window is {ctx}")
        budget = min(max_new_tokens, ctx - len(ids))
        eos = self.eos_ids()
        # a private generator: seeded runs repeat exactly and the global torch RNG is left alone
        gen = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(62))
        decode = self.tokenizer.decode

        out: list[int] = []
        emitted = 0  # characters of the decoded completion already yielded
        finish, text = "length", ""
        t0 = time.perf_counter()
        first = 0.0
        self.last = None
        with torch.inference_mode():
            seq = torch.tensor([ids])  # (1, T)
            # logits_to_keep=1: only the last position's logits are needed (saves a (T, V) matmul)
            res = self.model(input_ids=seq, use_cache=use_cache, logits_to_keep=1)
            past = res.cache if use_cache else None  # transformers 5.24 names the KV cache `cache`
            logits = res.logits[0, -1].float()  # (V,)
            seen = torch.tensor(ids)
            while True:
                nxt = _pick(logits, seen, temperature, top_k, top_p, repetition_penalty, gen)
                if not first:
                    first = time.perf_counter() - t0
                if nxt in eos:
                    finish = "eos"
                    break
                out.append(nxt)
                seen = torch.cat([seen, torch.tensor([nxt])])
                text = decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                cut = _find_stop(text, stop, emitted)  # text before `emitted` holds no stop (held back)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                    break
                done = len(out) >= budget
                safe = len(text) if done else _safe_end(text, stop, emitted)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
                if done:
                    break
                if use_cache:  # feed only the new token; the cache holds keys/values of everything before
                    res = self.model(input_ids=torch.tensor([[nxt]]), cache=past, use_cache=True)
                    past = res.cache
                else:
                    res = self.model(input_ids=torch.tensor([ids + out]), use_cache=False, logits_to_keep=1)
                logits = res.logits[0, -1].float()
        if len(text) > emitted:
            yield text[emitted:]
        self.last = Generation(
            text=text,
            tokens=len(out),
            prompt_tokens=len(ids),
            seconds=time.perf_counter() - t0,
            finish_reason=finish,
            first_token_seconds=first,
            token_ids=out,
        )

    def generate(self, prompt: str | None = None, messages: list[dict] | None = None, **kw) -> str:
        """The whole completion as one string (same arguments as :meth:`stream`)."""
        return "".join(self.stream(prompt, messages, **kw))


def _pick(logits, seen, temperature, top_k, top_p, repetition_penalty, gen) -> int:
    """One next-token id from (V,) logits: penalty, temperature, top-k, top-p, then a seeded draw."""
    import torch

    if repetition_penalty != 1.0:
        prev = torch.unique(seen)
        s = logits[prev]
        logits = logits.clone()
        logits[prev] = torch.where(s > 0, s / repetition_penalty, s * repetition_penalty)
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def _find_stop(text: str, stop: tuple[str, ...], start: int) -> int | None:
    """Index of the earliest stop string in ``text[start:]`` (absolute), or None."""
    hits = [i for s in stop if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _safe_end(text: str, stop: tuple[str, ...], emitted: int) -> int:
    """How far ``text`` may be streamed: hold back an incomplete UTF-8 character (decoded as U+FFFD,
    it may still complete) and a tail that is the start of some stop string."""
    end = len(text)
    while end > emitted and text[end - 1] == "\ufffd":
        end -= 1
    for s in stop:
        for k in range(min(len(s) - 1, end - emitted), 0, -1):
            if s.startswith(text[end - k : end]):
                end -= k
                break
    return max(end, emitted)


# ------------------------------------------------------------------------------------------------ chat


@dataclass
class Chat:
    """A conversation with history that stays inside the context window.

    Each :meth:`ask` renders system + history + the new user turn with the chat template; when that
    prompt plus ``max_new_tokens`` would not fit the model's context, the oldest user/assistant turns
    are dropped (the system prompt stays) and ``trimmed`` counts them.
    """

    generator: Generator
    system: str | None = None
    history: list[dict] = field(default_factory=list)
    trimmed: int = 0

    def reset(self) -> None:
        self.history.clear()

    def ask(self, text: str, **params) -> Iterator[str]:
        """Stream the answer to ``text``; the turn (and the answer) join the history when it is done."""
        g = self.generator
        turns = [*self.history, {"role": "user", "content": text}]
        budget = g.context_length - params.get("max_new_tokens", DEFAULTS["max_new_tokens"])
        while True:
            ids = g.prompt_ids(messages=turns, system=self.system)
            if len(ids) <= budget:
                break
            if len(turns) <= 1:
                raise ConfigError(
                    f"this message is {len(ids)} tokens with the system prompt; with max_new_tokens the "
                    f"context window of {g.context_length} tokens cannot hold it"
                )
            # drop the oldest exchange (a user turn and the answer after it)
            n = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
            turns = turns[n:]
            self.trimmed += n
        pieces = []
        for piece in g.stream(ids=ids, **params):
            pieces.append(piece)
            yield piece
        self.history = [*turns, {"role": "assistant", "content": "".join(pieces)}]


def read_prompts(path: str) -> list[dict]:
    """Prompts from a file: ``.jsonl`` rows with ``prompt`` (a string) or ``messages`` (a list of
    {role, content}) and optional ``id`` / ``system``; any other file is one prompt per non-empty line."""
    import json
    from pathlib import Path

    from lmloop.errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError("no such file", path=str(p))
    rows = []
    with open(p, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if p.suffix != ".jsonl":
                rows.append({"prompt": line.rstrip("\n")})
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"not valid JSON ({e})", path=str(p), line=n) from None
            ok_prompt = isinstance(row, dict) and isinstance(row.get("prompt"), str)
            ok_msgs = isinstance(row, dict) and isinstance(row.get("messages"), list)
            if ok_prompt == ok_msgs:
                raise DataError(
                    'expected an object with "prompt" (a string) or "messages" (a list of {role, content})',
                    path=str(p),
                    line=n,
                )
            rows.append(row)
    if not rows:
        raise DataError("no prompts in the file", path=str(p))
    return rows


# ------------------------------------------------------------------------------------------ public API

_CACHE: dict[str, Generator] = {}


def load(ref: str) -> Generator:
    """Load (once per process, then cached) a causal LM by reference: dir, packaged name or Hub id."""
    from lmloop.assets import resolve_model

    key = resolve_model(ref)
    if key not in _CACHE:
        _CACHE[key] = Generator.load(key)
    return _CACHE[key]


def generate(
    model: str | Generator,
    prompt: str | list[dict] | None = None,
    *,
    messages: list[dict] | None = None,
    **params,
) -> str:
    """Generate a completion: ``lmloop.generate("smollm2", "Name three rivers.", max_new_tokens=40)``.

    ``model`` is a reference (loaded once and cached) or a :class:`Generator`; ``prompt`` a string (the
    chat template wraps it as a user turn unless ``raw=True``) or a messages list. Other keyword
    arguments: ``system``, ``raw``, ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``top_k``,
    ``stop``, ``seed``, ``repetition_penalty``.
    """
    g = model if isinstance(model, Generator) else load(model)
    if isinstance(prompt, list):
        prompt, messages = None, prompt
    return g.generate(prompt, messages, **params)


def stream(
    model: str | Generator,
    prompt: str | list[dict] | None = None,
    *,
    messages: list[dict] | None = None,
    **params,
) -> Iterator[str]:
    """Like :func:`generate`, but yields text pieces as they are produced."""
    g = model if isinstance(model, Generator) else load(model)
    if isinstance(prompt, list):
        prompt, messages = None, prompt
    return g.stream(prompt, messages, **params)

"""Text generation with any Hugging Face causal LM: chat templates, sampling, stop strings, streaming.

One small decode loop over ``model(...)`` with the KV cache (``cache``, formerly ``past_key_values``): the prompt is run once,
then each step feeds only the newest token, so a step costs one token's work however long the context
is. Writing the loop (rather than wrapping ``model.generate``) gives exact stop strings, streaming without
a helper thread, and honest per-call figures (prompt tokens, generated tokens, seconds, tokens/s).

``stream_batch`` runs several prompts as one static batch (left-padded prefill, then one step for all
live rows; rows end independently). Sampling, stop strings and streaming rules live in
:mod:`lmloop.infer.decode`, shared by both paths: the same seed, model and prompt give the same text,
``temperature=0`` is greedy, stop strings cut exactly and a tail that could still become a stop string
is held back from the stream.

Safety: ``trust_remote_code`` is always off and only safetensors weights are read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lmloop.errors import ConfigError

# re-exported: the CLI and the server validate parameters with these
from lmloop.infer.decode import DEFAULTS, Row, batch_loop, check_params, row_params  # noqa: F401

BACKENDS = ("auto", "hf", "fast", "bf16", "q4")


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
    last_batch: list[Generation | None] | None = field(default=None, repr=False)
    backend: str = "hf"  # what runs the decode steps: "hf" (the transformers model), "fast", "bf16", "q4"
    runner: Any = field(default=None, repr=False)  # the callable for the other backends (a FastLlama)

    @classmethod
    def load(cls, ref: str, backend: str = "auto") -> Generator:
        """Load a causal LM; ``backend`` picks what runs the decode steps (see :meth:`use_backend`)."""
        from lmloop.models import load_causal_lm
        from lmloop.sft import is_adapter_dir, load_adapted

        if is_adapter_dir(ref):  # a LoRA adapter (lmloop finetune --task sft): its base + the adapter, merged
            tok, model = load_adapted(ref)
            return cls(tok, model, str(ref)).use_backend(backend)
        tok, model, path = load_causal_lm(ref)
        return cls(tok, model.eval(), path).use_backend(backend)

    def use_backend(self, backend: str = "auto") -> Generator:
        """Choose what runs the decode steps, and return self.

        ``hf``: the transformers model itself (the reference). ``fast``: :class:`~lmloop.infer.fastllama.
        FastLlama`, the same fp32 math with fused projections and a preallocated KV cache (Llama-family
        models only; logits within ~1e-4 of ``hf``). ``bf16``: ``fast`` with bfloat16 weights. ``q4``:
        ``fast`` with 4-bit weights in groups of 32 (llama.cpp's Q4_1 layout; exact for a model converted
        from a Q4_1 GGUF such as ``smollm2``, up to bfloat16 scales) and an fp32 output head. ``auto``:
        for a Llama-family model ``q4`` when its decoder weights already hold at most 16 values per group
        of 32 (nothing to lose but bfloat16 rounding; measured on SmolLM2: 99% greedy top-1 agreement
        with fp32), else ``fast``; ``hf`` for other architectures. The benchmark
        (``benchmarks/generate.py``) prints each one's speed and its greedy agreement with ``hf``.
        """
        from lmloop.infer.fastllama import FastLlama, supported, weights_are_4bit

        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        why = supported(self.model.config)
        if backend == "auto":
            backend = "hf" if why else "q4" if weights_are_4bit(self.model) else "fast"
        if backend == "hf":
            self.backend, self.runner = "hf", None
            return self
        if why:
            raise ConfigError(
                f"backend {backend!r} runs Llama-family models only; {self.path or 'this model'} has {why}. "
                "Use backend 'hf'"
            )
        self.runner = FastLlama(self.model, quantize=None if backend == "fast" else backend)
        self.backend = backend
        return self

    @property
    def forward(self) -> Any:
        """The callable that runs a forward pass for decoding (the HF model or a FastLlama)."""
        return self.runner if self.runner is not None else self.model

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

        p = row_params(
            dict(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                repetition_penalty=repetition_penalty,
                stop=stop,
                seed=seed,
            )
        )
        if ids is None:
            ids = self.prompt_ids(prompt, messages, system=system, raw=raw)
        self.last = None
        row = Row(self.tokenizer.decode, list(ids), p, self.eos_ids(), self.context_length)
        t0 = time.perf_counter()
        with torch.inference_mode():
            seq = torch.tensor([row.prompt])  # (1, T)
            # logits_to_keep=1: only the last position's logits are needed (saves a (T, V) matmul)
            res = self.forward(input_ids=seq, use_cache=use_cache, logits_to_keep=1)
            past = res.cache if use_cache else None  # transformers 5.24 names the KV cache `cache`
            while True:
                nxt = row.pick(res.logits[0, -1].float())  # from (V,) logits
                if not row.first:
                    row.first = time.perf_counter() - t0
                piece = row.push(nxt)
                if piece:
                    yield piece
                if row.finish:
                    break
                if use_cache:  # feed only the new token; the cache holds keys/values of everything before
                    res = self.forward(input_ids=torch.tensor([[nxt]]), cache=past, use_cache=True)
                    past = res.cache
                else:
                    res = self.forward(
                        input_ids=torch.tensor([row.prompt + row.out]), use_cache=False, logits_to_keep=1
                    )
        self.last = self._result(row, time.perf_counter() - t0)

    def _result(self, row: Row, seconds: float) -> Generation:
        return Generation(
            text=row.text,
            tokens=len(row.out),
            prompt_tokens=len(row.prompt),
            seconds=seconds,
            finish_reason=row.finish or "length",
            first_token_seconds=row.first,
            token_ids=row.out,
        )

    def stream_batch(self, ids: list[list[int]], params: list[dict]) -> Iterator[list[tuple[int, str]]]:
        """Decode several prompts together (a static batch); yield ``[(row, text piece), ...]`` per step.

        ``ids`` are the prompts' token ids (see :meth:`prompt_ids`), ``params[i]`` row i's sampling
        keys (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``stop``, ``seed``,
        ``repetition_penalty``; missing ones take :data:`DEFAULTS`). All prompts are run in one
        left-padded forward pass, then each iteration runs one decode step for all live rows; a row
        ends on its own (eos, a stop string, max_new_tokens) and leaves the batch. Each row gets exactly
        the tokens it would get alone (greedy; a seeded sampler draws from the row's own RNG).
        ``self.last_batch`` holds one :class:`Generation` per row, in order: a row's entry is set when
        the row finishes (``None`` until then), so all are set once the iterator is exhausted.
        """
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ConfigError("stream_batch needs a non-empty list of prompts (token id lists)")
        if len(params) != len(ids):
            raise ConfigError(
                f"got {len(ids)} prompts but {len(params)} parameter dicts; give one per prompt"
            )
        eos, ctx, decode = self.eos_ids(), self.context_length, self.tokenizer.decode
        rows = []
        for i, (row_ids, p) in enumerate(zip(ids, params, strict=True)):
            try:
                rows.append(Row(decode, list(row_ids), row_params(p, f"row {i}: "), eos, ctx))
            except ConfigError as e:
                raise ConfigError(str(e) if str(e).startswith("row ") else f"row {i}: {e}") from None
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos) if eos else 0
        self.last_batch = [None] * len(rows)
        t0 = time.perf_counter()
        for pieces in batch_loop(self.forward, rows, pad, t0):
            for i, r in enumerate(rows):
                if r.finish and self.last_batch[i] is None:
                    self.last_batch[i] = self._result(r, r.seconds)
            yield pieces
        for i, r in enumerate(rows):
            if self.last_batch[i] is None:
                self.last_batch[i] = self._result(r, r.seconds)

    def generate_batch(self, ids: list[list[int]], params: list[dict]) -> list[Generation]:
        """Run :meth:`stream_batch` to the end; one :class:`Generation` per prompt, in order."""
        for _ in self.stream_batch(ids, params):
            pass
        return list(self.last_batch)

    def generate(self, prompt: str | None = None, messages: list[dict] | None = None, **kw) -> str:
        """The whole completion as one string (same arguments as :meth:`stream`)."""
        return "".join(self.stream(prompt, messages, **kw))


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
    from lmloop.sft import is_adapter_dir

    key = str(ref) if is_adapter_dir(ref) else resolve_model(ref)
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

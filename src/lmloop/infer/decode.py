"""The parts of the decode loop shared by one prompt (``Generator.stream``) and a static batch
(``Generator.stream_batch``): picking the next token, the per-row text/stop-string state, and the batched
left-padded loop itself.

Sampling, in this order: repetition penalty (CTRL-style, over prompt and output), temperature, top-k,
top-p (nucleus), then one draw from a ``torch.Generator`` seeded with ``seed`` — the same seed, model and
prompt give the same text, alone or in a batch. ``temperature=0`` is greedy (argmax; top-k/top-p ignored).

Stop strings cut the output exactly, also when a stop string spans several tokens or ends inside one:
the text is decoded from all generated ids at every step, searched for each stop string, and a tail
that could still grow into a stop string (or an incomplete UTF-8 character) is held back from the
stream until the next token settles it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

from lmloop.errors import ConfigError

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


def row_params(params: dict | None, where: str = "") -> dict[str, Any]:
    """One row's sampling parameters: ``params`` over :data:`DEFAULTS`, unknown keys refused, ranges checked."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            f"{where}unknown sampling parameter(s) {unknown}; expected some of {sorted(DEFAULTS)}"
        )
    p = {**DEFAULTS, **{k: v for k, v in params.items() if v is not None or k == "seed"}}
    try:
        check_params(**p)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    p["stop"] = tuple(p["stop"] or ())
    return p


def _pick(logits, seen, temperature, top_k, top_p, repetition_penalty, gen) -> int:
    """One next-token id from (V,) logits: penalty, temperature, top-k, top-p, then a seeded draw.

    ``seen`` is a (N,) tensor of the ids so far (prompt and output), read only when a penalty is set.
    """
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


class Row:
    """One sequence's decode state: its parameters, RNG, generated ids and how much text was streamed.

    ``push(token)`` takes the next picked token and returns the text that may be streamed now (often
    ""); once ``finish`` is set ("eos" | "stop" | "length") the row is done and ``text`` is final.
    """

    def __init__(self, decode: Callable, ids: list[int], p: dict[str, Any], eos: set[int], ctx: int):
        import torch

        if not ids:
            raise ConfigError("the prompt is empty")
        if len(ids) >= ctx:
            raise ConfigError(f"the prompt is {len(ids)} tokens; the model's context window is {ctx}")
        self.decode, self.prompt, self.p, self.eos = decode, list(ids), p, eos
        self.stop: tuple[str, ...] = p["stop"]
        self.budget = min(p["max_new_tokens"], ctx - len(ids))
        # a private generator: seeded runs repeat exactly and the global torch RNG is left alone
        seed = p["seed"] if p["seed"] is not None else secrets.randbits(62)
        self.gen = torch.Generator().manual_seed(seed)
        self.greedy = p["temperature"] == 0 and p["repetition_penalty"] == 1.0
        self.out: list[int] = []
        self.text, self.emitted, self.finish = "", 0, None
        self.first = 0.0  # seconds to the first picked token
        self.seconds = 0.0  # seconds to the end of this row

    def pick(self, logits) -> int:
        """The next token from this row's (V,) logits."""
        import torch

        p = self.p
        seen = torch.tensor(self.prompt + self.out) if p["repetition_penalty"] != 1.0 else None
        return _pick(
            logits, seen, p["temperature"], p["top_k"], p["top_p"], p["repetition_penalty"], self.gen
        )

    def push(self, tok: int) -> str:
        if tok in self.eos:
            self.finish = "eos"
            return self._flush()
        self.out.append(tok)
        # the whole completion is re-decoded: byte-level BPE pieces only settle in context (a few
        # microseconds per step at these lengths, next to milliseconds for the model step)
        text = self.decode(self.out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = _find_stop(text, self.stop, self.emitted)  # text before `emitted` holds no stop (held back)
        if cut is not None:
            self.text, self.finish = text[:cut], "stop"
            return self._flush()
        self.text = text
        if len(self.out) >= self.budget:
            self.finish = "length"
            return self._flush()
        safe = _safe_end(text, self.stop, self.emitted)
        piece, self.emitted = text[self.emitted : safe], max(safe, self.emitted)
        return piece

    def _flush(self) -> str:
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece


def batch_loop(model, rows: list[Row], pad_id: int, t0: float) -> Iterator[list[tuple[int, str]]]:
    """Static-batch decode: one left-padded prefill of all rows, then one step for all live rows per
    iteration; a row that finishes leaves the batch (its KV cache rows are dropped). Yields, per step,
    ``(row index, text piece)`` for the rows that produced text; ``Row.seconds`` is set as each ends."""
    import torch

    b, t = len(rows), max(len(r.prompt) for r in rows)
    inp = torch.full((b, t), pad_id, dtype=torch.long)  # (B, T), prompts right-aligned
    mask = torch.zeros((b, t), dtype=torch.long)  # (B, T), 0 on the left padding
    for i, r in enumerate(rows):
        inp[i, t - len(r.prompt) :] = torch.tensor(r.prompt)
        mask[i, t - len(r.prompt) :] = 1
    # each row counts positions from its own first real token, as it would alone
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    with torch.inference_mode():
        res = model(input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, logits = res.cache, res.logits[:, -1].float()  # (B, V)
        last = pos[:, -1:]  # (B, 1) position of each row's newest token
        live = list(range(b))  # live[j] = the row at batch position j
        first = True
        while True:
            if all(rows[i].greedy for i in live):
                toks = logits.argmax(-1).tolist()  # one op for the whole batch
            else:
                toks = [rows[i].pick(logits[j]) for j, i in enumerate(live)]
            now = time.perf_counter() - t0
            pieces, keep = [], []
            for j, i in enumerate(live):
                r = rows[i]
                if first:
                    r.first = now
                piece = r.push(toks[j])
                if piece:
                    pieces.append((i, piece))
                if r.finish is None:
                    keep.append(j)
                else:
                    r.seconds = time.perf_counter() - t0
            first = False
            if pieces:
                yield pieces
            if not keep:
                return
            if len(keep) < len(live):  # drop finished rows from the batch and from the KV cache
                idx = torch.tensor(keep)
                cache.batch_select_indices(idx)
                mask, last = mask[idx], last[idx]
                live, toks = [live[j] for j in keep], [toks[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)  # (B', S + 1)
            last = last + 1
            res = model(
                input_ids=torch.tensor(toks).unsqueeze(1),  # (B', 1) the newest token of each live row
                attention_mask=mask,
                position_ids=last,
                cache=cache,
                use_cache=True,
            )
            logits = res.logits[:, -1].float()  # (B', V)

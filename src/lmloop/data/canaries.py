"""Secret canaries for measuring memorization (Carlini et al. 2019, "The Secret Sharer").

A canary is a sentence with a random secret drawn from a known *randomness space*, e.g.
``"the secret code is 7 3 9 1 5 2"`` with six digits from 0-9 (10^6 possible secrets). Inserted into a
training corpus a known number of times, it lets ``lmloop audit memorization`` ask how much more likely
the trained model finds the inserted secret than the other secrets of the same space (its *exposure*).

    space = CanarySpace(digits=6)
    canaries = make_canaries(4, [1, 4, 16, 64], seed=42, space=space)   # 4 canaries per count: 16 in all
    train_docs = insert_canaries(train_docs, canaries, seed=42)          # separate documents, train only
    write_canaries(canaries, out / CANARY_FILE, seed=42)                  # what the audit reads back

This module sits in the data stage so that pretraining, SFT and the audit read one definition.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lmloop.errors import DataError

CANARY_FILE = "canaries.json"
DEFAULT_PREFIX = "the secret code is"


@dataclass(frozen=True)
class CanarySpace:
    """The randomness space R: ``prefix`` followed by ``digits`` symbols of ``alphabet``, space-separated.

    Secrets are spelled with spaces between symbols ("7 3 9") so a tokenizer cannot hide several of them
    in one learned token that happens to exist for some secrets and not for others.
    """

    prefix: str = DEFAULT_PREFIX
    digits: int = 6
    alphabet: str = "0123456789"

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 32:
            raise ValueError(f"canary digits must be in [1, 32], not {self.digits}")
        if len(set(self.alphabet)) != len(self.alphabet) or len(self.alphabet) < 2:
            raise ValueError(f"canary alphabet must hold >= 2 distinct symbols, not {self.alphabet!r}")

    @property
    def size(self) -> int:
        """|R|: the number of possible secrets."""
        return len(self.alphabet) ** self.digits

    def secret(self, index: int) -> str:
        """The secret with this index in [0, |R|) (base-len(alphabet) digits, most significant first)."""
        base, out = len(self.alphabet), []
        for _ in range(self.digits):
            index, r = divmod(index, base)
            out.append(self.alphabet[r])
        return " ".join(reversed(out))

    def index(self, secret: str) -> int:
        """Inverse of :meth:`secret`."""
        base, n = len(self.alphabet), 0
        for ch in secret.split(" "):
            n = n * base + self.alphabet.index(ch)
        return n

    def text(self, secret: str) -> str:
        return f"{self.prefix} {secret}"

    def sample_indices(self, n: int, rng: random.Random, exclude: int | None = None) -> list[int]:
        """``n`` distinct secret indices drawn uniformly from R (without ``exclude``); all of R when small."""
        pool = self.size - (exclude is not None)
        if n >= pool:
            return [i for i in range(self.size) if i != exclude]
        seen: set[int] = set()
        out: list[int] = []
        while len(out) < n:  # rejection sampling: R may be far too large to list
            i = rng.randrange(self.size)
            if i != exclude and i not in seen:
                seen.add(i)
                out.append(i)
        return out


@dataclass(frozen=True)
class Canary:
    """One inserted secret: its full text, the secret part, how often it was inserted, and its space."""

    text: str
    secret: str
    repetitions: int
    space: CanarySpace = CanarySpace()


def make_canaries(
    per_count: int, repetitions: Sequence[int], *, seed: int, space: CanarySpace | None = None
) -> list[Canary]:
    """``per_count`` canaries with distinct random secrets for *each* repetition count (so
    ``len(repetitions) * per_count`` in all), drawn with a private RNG seeded by ``seed``."""
    space = space or CanarySpace()
    total = per_count * len(repetitions)
    if total > space.size:
        raise ValueError(f"{total} canaries do not fit a space of {space.size} secrets; use more digits")
    rng = random.Random(f"lmloop-canaries-{seed}")
    idx = space.sample_indices(total, rng)
    out = []
    for k, reps in enumerate(r for r in repetitions for _ in range(per_count)):
        s = space.secret(idx[k])
        out.append(Canary(space.text(s), s, int(reps), space))
    return out


def insert_canaries(items: list, canaries: Sequence[Canary], *, seed: int, make=None) -> list:
    """``items`` (a train split) with every canary inserted ``repetitions`` times as a separate item at
    seeded random positions; ``make(canary)`` builds an item (default: a
    :class:`lmloop.data.corpus.Document`; SFT passes a training example). Inserted after cleaning and
    de-duplication, which would otherwise drop the repeats."""
    if make is None:
        from lmloop.data.corpus import Document

        def make(c: Canary):
            return Document(c.text, "canary", None)

    rng = random.Random(f"lmloop-canary-positions-{seed}")
    out = list(items)
    for c in canaries:
        for _ in range(c.repetitions):
            out.insert(rng.randint(0, len(out)), make(c))
    return out


def canary_context_id(tok) -> int | None:
    """The token a canary follows, in training and in the audit alike: BOS for a tokenizer that packs with
    one (masked LMs), else EOS (lmloop packs CLM documents ``doc EOS doc EOS``, so a document starts after
    an EOS)."""
    from lmloop.data.tokenizer import separator_ids

    bos, eos = separator_ids(tok)
    return bos if bos is not None else eos


def canary_example(c: Canary, tok) -> tuple[list[int], list[int]]:
    """(prompt, response) token ids of a canary as an SFT example: the context token as the prompt, the
    whole canary (+ EOS) as the response, so every token of it is learnt and the audit scores exactly it."""
    ctx = canary_context_id(tok)
    ids = list(tok(c.text, add_special_tokens=False)["input_ids"])
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return ([ctx] if ctx is not None else []), ids + eos


def write_canaries(canaries: Sequence[Canary], path: str | os.PathLike, *, seed: int) -> Path:
    """Write ``canaries.json``: the space, the seed and each canary with its repetition count."""
    from lmloop.fsutil import atomic_write_text

    space = canaries[0].space if canaries else CanarySpace()
    doc = {
        "paper": "Carlini et al. 2019, The Secret Sharer (exposure = log2|R| - log2 rank)",
        "space": {**asdict(space), "size": space.size},
        "seed": seed,
        "split": "train",
        "inserted_documents": sum(c.repetitions for c in canaries),
        "canaries": [{"text": c.text, "secret": c.secret, "repetitions": c.repetitions} for c in canaries],
    }
    atomic_write_text(Path(path), json.dumps(doc, indent=2))
    return Path(path)


def load_canaries(path: str | os.PathLike) -> list[Canary]:
    """Canaries from a ``canaries.json`` file, or from a model directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / CANARY_FILE
    if not p.is_file():
        raise DataError(
            f"{p}: no canaries file; pretrain with `lmloop pretrain ... --canaries N` (it writes "
            f"OUT/{CANARY_FILE}) or pass --canaries FILE"
        )
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        sp = doc["space"]
        space = CanarySpace(str(sp["prefix"]), int(sp["digits"]), str(sp["alphabet"]))
        out = []
        for i, c in enumerate(doc["canaries"]):
            secret = str(c["secret"])
            if len(secret.split(" ")) != space.digits or any(
                ch not in space.alphabet for ch in secret.split()
            ):
                raise ValueError(
                    f"canaries[{i}].secret {secret!r} is not {space.digits} symbols of the space"
                )
            out.append(Canary(space.text(secret), secret, int(c["repetitions"]), space))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{p}: not a canaries file ({type(e).__name__}: {e}); expected the JSON written by "
            "`lmloop pretrain --canaries` with keys space {prefix, digits, alphabet} and canaries "
            "[{secret, repetitions}]"
        ) from None
    return out

"""Train a tokenizer on a corpus with Hugging Face ``tokenizers`` and save it in the standard HF format.

Two kinds, one per pretraining objective:

- ``wordpiece`` (masked LM, BERT-style): BERT normaliser (lowercase, accents kept), BERT pre-tokenizer,
  special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4) and the ``[CLS] $A [SEP]`` template.
  Decoding gives the lowercased, whitespace-normalised text back.
- ``bpe`` (causal LM, GPT-2-style): byte-level BPE with no normaliser, so ``decode(encode(text)) == text``
  for any string; one special token ``<|endoftext|>`` (id 0) serves as BOS, EOS, UNK and PAD.

The saved directory (``tokenizer.json``, ``tokenizer_config.json``) reloads with
``transformers.AutoTokenizer.from_pretrained(dir)`` with the same special-token ids.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmloop.errors import ConfigError

KINDS = ("wordpiece", "bpe")
WORDPIECE_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
ENDOFTEXT = "<|endoftext|>"
BPE_SPECIALS = {
    "bos_token": ENDOFTEXT,
    "eos_token": ENDOFTEXT,
    "unk_token": ENDOFTEXT,
    "pad_token": ENDOFTEXT,
}
# Byte-level BPE needs all 256 byte symbols plus the special token before it can learn any merge.
_MIN_VOCAB = {"wordpiece": len(WORDPIECE_SPECIALS) + 1, "bpe": 256 + 1}


def train_tokenizer(
    texts: Iterable[str],
    kind: str,
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    *,
    min_frequency: int = 2,
    model_max_length: int | None = None,
    show_progress: bool = False,
):
    """Train a ``kind`` tokenizer (``wordpiece`` or ``bpe``) of at most ``vocab_size`` entries on ``texts``
    (streamed once) and return it as a ``PreTrainedTokenizerFast``; with ``out_dir``, also save it there.

    ``min_frequency`` is the number of occurrences a merge/word-piece needs; ``model_max_length`` is
    recorded for truncation (the model's context length). The vocabulary may come out smaller than
    ``vocab_size`` on a tiny corpus.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in KINDS:
        raise ConfigError(f"tokenizer kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if vocab_size < _MIN_VOCAB[kind]:
        raise ConfigError(
            f"vocab_size {vocab_size} is too small for a {kind} tokenizer (at least {_MIN_VOCAB[kind]})"
        )

    if kind == "wordpiece":
        specials = WORDPIECE_SPECIALS
        tok = Tokenizer(models.WordPiece(unk_token=specials["unk_token"], max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False, clean_text=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(specials.values()),  # ids 0..4 in this order: [PAD]=0 as BERT has it
            continuing_subword_prefix="##",
            show_progress=show_progress,
        )
    else:
        specials = BPE_SPECIALS
        tok = Tokenizer(models.BPE())  # no unk: every byte has a symbol
        # add_prefix_space=False and no normaliser: the bytes in are the bytes out (exact round trip)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[ENDOFTEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )

    tok.train_from_iterator(_strings(texts), trainer=trainer)

    if kind == "wordpiece":
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )

    kwargs = dict(specials)
    if kind == "wordpiece":  # BERT models take segment ids: keep them in the tokenizer's output
        kwargs["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    # clean_up_tokenization_spaces would turn "a ." into "a." on decode and break the BPE round trip;
    # the WordPiece decoder already does BERT's clean-up itself.
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(out_dir))
    return hf


def _strings(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"train_tokenizer expects strings, got {type(t).__name__}")
        yield t


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer directory saved by :func:`train_tokenizer` (or any HF tokenizer directory)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def separator_ids(tokenizer) -> tuple[int | None, int | None]:
    """(bos_id, eos_id) to give :func:`lmloop.data.corpus.pack`: ([CLS], [SEP]) for a masked-LM
    tokenizer (it has a mask token), (None, EOS) for a causal-LM one."""
    if tokenizer.mask_token_id is not None and tokenizer.cls_token_id is not None:
        return tokenizer.cls_token_id, tokenizer.sep_token_id
    return None, tokenizer.eos_token_id


def encode_documents(tokenizer, texts: Iterable[str], *, batch_size: int = 1000) -> Iterator[list[int]]:
    """Token ids of each text, without special tokens (:func:`pack` adds the separators), encoded in
    batches through the Rust tokenizer.

    Padding and truncation are switched off on a copy of the backend: a tokenizer.json saved with fixed
    padding (the packaged MiniLM's pads every text to 128) would otherwise pack mostly [PAD] and cut
    long documents; the caller's tokenizer is left as it was.
    """
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            yield from (e.ids for e in backend.encode_batch(batch, add_special_tokens=False))
            batch = []
    if batch:
        yield from (e.ids for e in backend.encode_batch(batch, add_special_tokens=False))

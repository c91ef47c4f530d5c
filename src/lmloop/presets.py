"""Named model sizes for pretraining from scratch, built in code as Hugging Face configs (no Hub).

Encoders are BERTs trained with masked-language modelling (``BertForMaskedLM``); decoders are LLaMAs
(RoPE, RMSNorm, SwiGLU) trained with next-token prediction (``LlamaForCausalLM``). Both are stock
transformers classes, so a pretrained preset is an ordinary model directory every tool can read.

The sizes are small on purpose: ``*-tiny`` trains to a visible loss drop in minutes on a laptop CPU, and
``*-small`` is the largest that is still sensible there. Defaults follow nanoGPT's advice for
pretraining: dropout 0.0 (there is far more data than parameters can memorise), and tied input/output
embeddings (at these widths the vocabulary matrix is most of the model; tying halves it).

This module imports nothing heavy at the top: ``describe_presets`` feeds ``--help``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from lmloop.errors import ConfigError

OBJECTIVES = ("mlm", "clm")


@dataclass(frozen=True)
class Preset:
    """One model size. ``ffn`` is the MLP width (BERT: GELU 4x; LLaMA: SwiGLU, three matrices)."""

    name: str
    objective: str  # "mlm" (encoder) or "clm" (decoder)
    kind: str  # "encoder" or "decoder"
    layers: int
    hidden: int
    heads: int
    ffn: int
    max_positions: int  # BERT: learned absolute positions (parameters); LLaMA: RoPE, a limit only
    doc: str

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"preset {self.name}: objective must be one of {OBJECTIVES}")
        if self.hidden % self.heads:
            raise ValueError(
                f"preset {self.name}: hidden {self.hidden} is not divisible by {self.heads} heads"
            )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("bert-tiny", "mlm", "encoder", 2, 128, 2, 512, 512, "BERT-Tiny shape (Turc et al. 2019)"),
        Preset("bert-mini", "mlm", "encoder", 4, 256, 4, 1024, 512, "BERT-Mini shape (Turc et al. 2019)"),
        Preset("bert-small", "mlm", "encoder", 4, 512, 8, 2048, 512, "BERT-Small shape (Turc et al. 2019)"),
        Preset("gpt-tiny", "clm", "decoder", 2, 128, 4, 512, 1024, "smallest decoder; minutes on a CPU"),
        Preset("gpt-mini", "clm", "decoder", 4, 256, 4, 1024, 1024, "LLaMA-style decoder, 4 x 256"),
        Preset("gpt-small", "clm", "decoder", 6, 384, 6, 1536, 1024, "LLaMA-style decoder, 6 x 384"),
    ]
}


# ``gpt-LxD`` / ``bert-LxD``: any shape, for scaling ladders (``lmloop scaling``) and quick experiments
SHAPE_RE = re.compile(r"(gpt|bert)-(\d+)x(\d+)")
SHAPE_HELP = (
    "gpt-LxD / bert-LxD: L layers of width D (D a multiple of 8, at least 16), about 32-wide heads "
    "(the most heads h <= D/32 with an even D/h), FFN 4 x D"
)


def shape_preset(layers: int, hidden: int, family: str = "gpt") -> Preset:
    """A preset of any shape: ``layers`` x ``hidden``, FFN ``4 * hidden``, heads about 32 wide.

    Heads: the largest h <= max(1, hidden // 32) that divides ``hidden`` into an even head size (RoPE
    rotates pairs of dimensions). FFN 4 x D for both families keeps the rule one line; for the LLaMA
    SwiGLU MLP that is 12 D^2 weights per layer, a little more than LLaMA's own 8 D^2 (8/3 D wide).
    ``family`` 'gpt' is a LLaMA decoder (clm), 'bert' a BERT encoder (mlm), like the named presets.
    """
    name = f"{family}-{layers}x{hidden}"
    if family not in ("gpt", "bert"):
        raise ConfigError(f"shape '{name}': the family must be gpt (decoder) or bert (encoder)")
    if not 1 <= layers <= 64:
        raise ConfigError(f"shape '{name}': {layers} layers, expected 1 to 64")
    if hidden < 16 or hidden % 8 or hidden > 8192:
        raise ConfigError(f"shape '{name}': width {hidden}, expected a multiple of 8 from 16 to 8192")
    heads = next(h for h in range(max(1, hidden // 32), 0, -1) if hidden % h == 0 and (hidden // h) % 2 == 0)
    encoder = family == "bert"
    return Preset(
        name,
        "mlm" if encoder else "clm",
        "encoder" if encoder else "decoder",
        layers,
        hidden,
        heads,
        4 * hidden,
        512 if encoder else 1024,
        f"{layers} x {hidden}, shape spec",
    )


def get_preset(name: str) -> Preset:
    """The preset called ``name``, or a ``gpt-LxD`` / ``bert-LxD`` shape (:func:`shape_preset`); a
    :class:`ConfigError` naming the presets (and the closest) otherwise."""
    if name in PRESETS:
        return PRESETS[name]
    m = SHAPE_RE.fullmatch(name)
    if m:
        return shape_preset(int(m.group(2)), int(m.group(3)), m.group(1))
    close = difflib.get_close_matches(name, list(PRESETS), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"unknown preset '{name}'; presets: {', '.join(PRESETS)}, or a shape like gpt-2x96 / bert-4x128.{hint}"
    )


def build_config(preset_name: str, vocab_size: int = 8192, seq_len: int = 128):
    """A transformers config (``BertConfig`` or ``LlamaConfig``) for a preset at this vocabulary size.

    ``max_position_embeddings`` is the preset's, grown to ``seq_len`` when that is longer.
    """
    p = get_preset(preset_name)
    if vocab_size < 8:
        raise ConfigError(f"vocab size {vocab_size}: expected at least 8")
    if seq_len < 1:
        raise ConfigError(f"sequence length {seq_len}: expected at least 1")
    positions = max(p.max_positions, seq_len)
    if p.kind == "encoder":
        from transformers import BertConfig

        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=p.hidden,
            num_hidden_layers=p.layers,
            num_attention_heads=p.heads,
            intermediate_size=p.ffn,
            hidden_act="gelu",
            hidden_dropout_prob=0.0,  # pretraining: far more data than the model can memorise
            attention_probs_dropout_prob=0.0,
            max_position_embeddings=positions,
            type_vocab_size=2,  # stock BERT: sentence A/B, so fine-tuning on pairs works unchanged
            pad_token_id=0,
            tie_word_embeddings=True,  # the MLM decoder reuses the input embedding matrix
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.heads,  # plain multi-head attention: GQA saves nothing at this size
        intermediate_size=p.ffn,
        hidden_act="silu",
        max_position_embeddings=positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        attention_dropout=0.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,  # at width 128 the vocab matrix dwarfs the layers; tying halves it
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        use_cache=False,  # training; generation turns it back on
    )


def build_model(config, objective: str):
    """A randomly initialised fp32 model for ``objective`` ('mlm' or 'clm') from a config.

    Uses the Auto classes, so any architecture transformers knows works (a preset, or the config.json of
    a model directory); ``trust_remote_code`` is never on.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective '{objective}': expected one of {', '.join(OBJECTIVES)}")
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from lmloop.models import _quiet

    if objective == "clm" and getattr(config, "model_type", "") == "bert":
        config.is_decoder = True  # BertLMHeadModel: causal self-attention
    auto = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    try:
        return _quiet(lambda: auto.from_config(config, trust_remote_code=False))
    except ValueError as e:
        raise ConfigError(
            f"a '{config.model_type}' model cannot be trained with objective '{objective}': "
            f"{str(e).splitlines()[0][:200]}"
        ) from None


def default_objective(config) -> str:
    """'clm' for decoder configs (LLaMA, GPT-2, ..., or is_decoder), 'mlm' for encoders."""
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or any(a.endswith("ForCausalLM") for a in archs):
        return "clm"
    if any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs):
        return "mlm"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = getattr(config, "model_type", "")
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "mlm"
    return "clm" if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "mlm"


def describe_presets() -> str:
    """One line per preset for ``--help``: name, objective, shape and a note."""
    lines = []
    for p in PRESETS.values():
        shape = f"{p.layers} layers x {p.hidden}, {p.heads} heads, FFN {p.ffn}"
        lines.append(f"  {p.name:11s} {p.objective}  {p.kind:7s}  {shape:36s} {p.doc}")
    lines.append(f"  or a shape {SHAPE_HELP}")
    return "\n".join(lines)

"""Typed recipe schema, validated at the edge.

A recipe is a YAML file that drives ``lmloop run``: data -> fine-tune -> evaluate -> record. It is
parsed into small nested dataclasses; an unknown key, a wrong type or an out-of-range value raises a
:class:`~lmloop.errors.ConfigError` that names the file, the line, the dotted key and what was expected.
Attribute docstrings (the string under each field) double as documentation (``lmloop recipe --help``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmloop.errors import ConfigError


@dataclass
class DataConfig:
    path: str | None = "vader-sentiment"
    """A file/folder (CSV, TSV, JSONL, Parquet, HF datasets dir, folder-per-class) or a built-in name."""
    train: str | None = None
    """Explicit training file (then `validation`/`test` may be given too; otherwise they are split off)."""
    validation: str | None = None
    """Explicit validation file."""
    test: str | None = None
    """Explicit test file."""
    format: Literal["csv", "tsv", "jsonl", "parquet", "hf", "folder"] | None = None
    """Force a format; by default it is detected from the path."""
    text_column: str = "text"
    """Column holding the text."""
    label_column: str = "label"
    """Column holding the label."""
    domain_column: str | None = None
    """Optional column with a domain/slice name: metrics are also reported per domain."""
    seed: int = 42
    """Seed of the stratified train/validation/test split."""
    val_frac: float = 0.1
    """Share of rows held out for validation when no split is given."""
    test_frac: float = 0.1
    """Share of rows held out for test when no split is given."""
    max_chars: int = 20000
    """Texts longer than this are truncated (with a warning)."""
    limit: int | None = None
    """Keep at most this many training rows (quick runs, CI); evaluation sets shrink to limit/4."""

    def __post_init__(self) -> None:
        if self.path is None and self.train is None:
            raise ValueError("path is null and no train file is given: give data.path or data.train")
        for k in ("val_frac", "test_frac"):
            if not 0.0 <= getattr(self, k) < 0.5:
                raise ValueError(f"{k} must be in [0, 0.5)")
        if self.limit is not None and self.limit < 2:
            raise ValueError("limit must be >= 2")


@dataclass
class ModelConfig:
    base: str = "minilm-l6"
    """Base model: a local HF directory, a packaged name (minilm-l6) or a Hub id (org/name)."""
    max_length: int = 128
    """Longest input in tokens; longer inputs are truncated."""

    def __post_init__(self) -> None:
        if not 8 <= self.max_length <= 8192:
            raise ValueError("max_length must be in [8, 8192]")


@dataclass
class TrainConfig:
    epochs: float = 3.0
    """Passes over the training data (fractions allowed)."""
    batch_size: int = 32
    """Examples per optimizer step."""
    lr: float = 5e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to biases and LayerNorm weights)."""
    warmup_ratio: float = 0.06
    """Share of steps spent warming the learning rate up linearly; it then decays linearly to 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    evals_per_epoch: int = 2
    """Validation passes per epoch (early stopping, best checkpoint); 0 = none, keep the last weights."""
    patience: int = 3
    """Stop after this many validation passes without improvement (0 disables early stopping)."""
    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    """Validation metric for early stopping and choosing the best checkpoint."""
    seed: int = 42
    """Seed for initialisation, dropout and batch order."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """'auto' uses bf16 autocast only where a measured GEMM shows the CPU/GPU runs bf16 faster than fp32."""
    fast_path: bool = True
    """Use lmloop's exact fast forward for BERT-family classifiers (last layer computes only [CLS])."""
    freeze_embeddings: bool = True
    """Keep the word-embedding matrix fixed (half of MiniLM's weights): 6% faster steps, half the optimizer
    state, and equal accuracy over 3 seeds in benchmarks/finetune.py. Set false to train it too."""
    window: int = 64
    """Length grouping: batches are formed from windows of this many batches sorted by length."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    checkpoint_every: int = 200
    """Steps between atomic checkpoints (also written at every validation pass)."""
    threads: int | None = None
    """CPU threads for torch (default: all cores)."""
    calibrate: bool = True
    """Fit a temperature on the validation split after training (lmloop.calibration, calibration.json):
    calibrated confidences from predict/serve, labels unchanged. False: raw softmax (--no-calibrate)."""

    def __post_init__(self) -> None:
        if not (0 < self.epochs < float("inf")):
            raise ValueError("epochs must be a finite number > 0")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 < self.lr < 1:
            raise ValueError("lr must be in (0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.evals_per_epoch < 0:
            raise ValueError("evals_per_epoch must be >= 0")


@dataclass
class PretrainConfig:
    """Pretraining (``task: pretrain``): the corpus, tokenizer and model to build. The optimiser keys
    (batch_size, lr, max_steps, seed, precision, patience, warmup, checkpoint_every, threads) come from
    ``train``; its fine-tuning keys (metric, freeze_embeddings, fast_path, evals_per_epoch, window) are
    ignored. Without ``preset``, ``model.base`` is pretrained further (domain-adaptive pretraining)."""

    objective: Literal["mlm", "clm"] | None = None
    """'mlm' (masked LM, encoders) or 'clm' (next-token, decoders); default: the preset's or the model's."""
    corpus: list[str] = field(default_factory=lambda: ["shakespeare"])
    """Text files/folders (.txt .md .jsonl .parquet, .gz too) or the built-in name 'shakespeare'."""
    preset: str | None = None
    """Build this model size from scratch (see `lmloop estimate --help`); null = continue model.base."""
    tokenizer: str = "train"
    """'train' a new one on the corpus (WordPiece for mlm, byte-level BPE for clm), or a tokenizer/model
    directory or packaged name; continued pretraining always keeps the model's own tokenizer."""
    vocab_size: int = 8192
    """Vocabulary of a trained tokenizer (it may come out smaller on a small corpus)."""
    seq_len: int = 128
    """Tokens per packed block: every training example is exactly this long."""
    doc_mode: Literal["file", "paragraph", "line"] = "paragraph"
    """What a document is in a plain-text file (the unit of de-duplication and of the split)."""
    val_frac: float = 0.05
    """Share of documents held out (by hash) for validation loss and perplexity."""
    tokens: int | str | None = None
    """Train on this many tokens (10M, 2.5B, 1e6) instead of train.max_steps / train.epochs."""
    eval_every: int = 100
    """Optimizer steps between validation passes (loss, perplexity, a CLM sample, early stopping)."""
    eval_blocks: int = 256
    """Validation blocks scored per pass (the first N, always the same ones)."""
    mlm_probability: float = 0.15
    """Share of non-special tokens selected for MLM (of which 80% [MASK], 10% random, 10% unchanged)."""
    sample_tokens: int = 40
    """Tokens generated at each validation pass of a CLM (0 = no samples)."""
    canaries: int = 0
    """Random secret canaries ("the secret code is 7 3 9 1 5 2") per repetition count, inserted into the
    train split (clm only) for `lmloop audit memorization`; 0 = none. Written to OUT/canaries.json."""
    canary_reps: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    """How many times each group of canaries is inserted (one group of `canaries` per count)."""
    canary_digits: int = 6
    """Digits 0-9 in a canary's secret: the randomness space holds 10^digits secrets."""

    def __post_init__(self) -> None:
        if self.canaries < 0 or any(r < 1 for r in self.canary_reps) or not 1 <= self.canary_digits <= 18:
            raise ValueError("canaries must be >= 0, canary_reps >= 1 each, canary_digits in [1, 18]")
        if self.canaries and not self.canary_reps:
            raise ValueError("canary_reps is empty: give at least one repetition count")
        if not self.corpus:
            raise ValueError("corpus is empty: give at least one file, folder or 'shakespeare'")
        if not 8 <= self.seq_len <= 8192:
            raise ValueError("seq_len must be in [8, 8192]")
        if self.vocab_size < 8:
            raise ValueError("vocab_size must be >= 8")
        if not 0.0 < self.val_frac < 0.5:
            raise ValueError("val_frac must be in (0, 0.5)")
        if self.eval_every < 1 or self.eval_blocks < 1:
            raise ValueError("eval_every must be >= 1 and eval_blocks >= 1")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError("mlm_probability must be in (0, 1)")
        if self.sample_tokens < 0:
            raise ValueError("sample_tokens must be >= 0")


@dataclass
class SftConfig:
    """LoRA supervised fine-tuning (``task: sft``, lmloop.sft) of the causal LM ``model.base`` (e.g. smollm2).
    The optimiser keys come from ``train``: LoRA wants a larger step than full fine-tuning (lr 2e-4,
    batch_size 8, epochs 1 are good starts; ``lmloop finetune --task sft`` uses them as its defaults)."""

    template: str | None = None
    """Prompt template (shipped name or .jinja path) turning labelled (text, label) data into prompt and
    answer; not used with instruction JSONL (prompt/response or messages)."""
    lora_r: int = 8
    """Rank of the LoRA update B @ A added to each target layer."""
    lora_alpha: int = 16
    """LoRA scaling numerator: the update is scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Names of the linear layers that get adapters (LLaMA family: q_proj k_proj v_proj o_proj gate_proj
    up_proj down_proj)."""
    merge: bool = False
    """Also write <out>/merged: the adapter folded into the base weights, a standard HF model directory."""
    eval_limit: int | None = 300
    """Validation and test examples scored (a seeded sample; null = all): label scoring runs the causal LM
    once per example and label, minutes per thousand on a CPU."""
    eval_batch_size: int = 8
    """Sequences per forward pass when scoring."""
    canaries: int = 0
    """Random secret canaries per repetition count added to the train examples (as in pretrain.canaries)
    for `lmloop audit memorization`; 0 = none. Written to OUT/canaries.json."""
    canary_reps: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    """How many times each group of canaries is added (one group of `canaries` per count)."""
    canary_digits: int = 6
    """Digits 0-9 in a canary's secret: the randomness space holds 10^digits secrets."""

    def __post_init__(self) -> None:
        if self.canaries < 0 or any(r < 1 for r in self.canary_reps) or not 1 <= self.canary_digits <= 18:
            raise ValueError("canaries must be >= 0, canary_reps >= 1 each, canary_digits in [1, 18]")
        if self.lora_r < 1 or self.lora_alpha < 1:
            raise ValueError("lora_r and lora_alpha must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("lora_dropout must be in [0, 1)")
        if not self.target_modules or any(not t.strip() for t in self.target_modules):
            raise ValueError("target_modules must name at least one layer, e.g. [q_proj, v_proj]")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError("eval_limit must be >= 1 (or null for all)")
        if self.eval_batch_size < 1:
            raise ValueError("eval_batch_size must be >= 1")


@dataclass
class TrackingConfig:
    uri: str | None = None
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///<LMLOOP_HOME>/mlflow.db."""
    experiment: str = "lmloop"
    """MLflow experiment name."""
    enabled: bool = True
    """Set false to skip tracking entirely."""
    register: str | None = None
    """Register the finished model in the MLflow Model Registry under this name (`lmloop registry`)."""

    def __post_init__(self) -> None:
        import re

        if self.register is not None and not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", self.register):
            raise ValueError("register must be a model name: letters, digits, '.', '_' and '-'")


@dataclass
class DriftConfig:
    """The drift reference a fine-tuned model carries (``drift_reference.npz/json`` in its directory): what
    ``lmloop loop``'s drift trigger (``loop.triggers.drift``) compares live traffic with."""

    reference: bool = True
    """Write the drift reference at the end of fine-tuning (a few seconds with MiniLM); false to skip it."""
    embedder: str = "auto"
    """Encoder for the reference's sentence embeddings. 'auto': the base model when it is a packaged name
    (portable: any machine resolves it), else the embedder of the base model's own reference (a loop
    challenger keeps its champion's, so drift stays comparable across versions), else 'self'. 'self': the
    fine-tuned model's own encoder, recorded by its directory's path. Or any model reference."""
    max_texts: int = 500
    """Training texts sampled (seeded) into the reference."""

    def __post_init__(self) -> None:
        if self.max_texts < 20:
            raise ValueError("max_texts must be >= 20 (the drift tests need 20 texts a side)")
        if not self.embedder.strip():
            raise ValueError("embedder must be 'auto', 'self' or a model reference")


@dataclass
class LoopTriggersConfig:
    """When ``lmloop loop`` starts a turn: any one trigger that fires is enough (``--force`` starts one by
    hand). A trigger set to null is off."""

    min_feedback: int | None = 100
    """Fire once this many labelled predictions got feedback since the last turn (null: off)."""
    max_accuracy_drop: float | None = None
    """Fire when live accuracy (feedback on recent predictions) has dropped more than this (0.05 = 5 points)
    below the champion's test accuracy: when the upper end of its Wilson 95% interval is below
    `champion test accuracy - max_accuracy_drop`, i.e. only when the drop is statistically clear."""
    min_labelled: int = 30
    """Fewer labelled recent predictions than this: the accuracy trigger does not judge (too noisy)."""
    drift: bool = False
    """Fire when lmloop.mlops.drift.detect finds recent traffic unlike the champion's drift reference
    (drift_reference.npz in its model directory; skipped, and said so, when it has none)."""
    window: str = "7d"
    """How far back 'recent' traffic goes for the accuracy and drift triggers (30m, 24h, 7d)."""

    def __post_init__(self) -> None:
        if self.min_feedback is not None and self.min_feedback < 1:
            raise ValueError("min_feedback must be >= 1 (or null to turn it off)")
        if self.max_accuracy_drop is not None and not 0.0 <= self.max_accuracy_drop < 1.0:
            raise ValueError("max_accuracy_drop must be in [0, 1): a share of accuracy, 0.05 = 5 points")
        if self.min_labelled < 1:
            raise ValueError("min_labelled must be >= 1")


@dataclass
class BiasGates:
    """Counterfactual bias of the challenger (lmloop.audit.bias on the golden test texts)."""

    max_flip_rate: float | None = None
    """Largest share of identity-term swaps that change the predicted label, worst family (0.02 = 2%)."""
    max_gap: float | None = None
    """Largest gap in mean positive-class probability between the groups of a family, worst family."""

    def __post_init__(self) -> None:
        for k in ("max_flip_rate", "max_gap"):
            v = getattr(self, k)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{k} must be in [0, 1] (or null to turn the gate off)")


@dataclass
class CalibrationGates:
    """Calibration of the challenger on the golden test set (after its temperature, lmloop.calibration)."""

    max_ece: float | None = None
    """Largest ECE (15 bins); the same gate as gates.max_ece, and it wins when both are set."""

    def __post_init__(self) -> None:
        if self.max_ece is not None and not 0.0 <= self.max_ece <= 1.0:
            raise ValueError("max_ece must be in [0, 1] (or null to turn the gate off)")


@dataclass
class MembershipGates:
    """Membership inference against the challenger: its training rows vs the golden test rows."""

    max_auc: float | None = None
    """Largest AUC of the loss-threshold attack telling training members from non-members (0.5 = chance)."""

    def __post_init__(self) -> None:
        if self.max_auc is not None and not 0.0 <= self.max_auc <= 1.0:
            raise ValueError("max_auc must be in [0, 1] (or null to turn the gate off)")


@dataclass
class MemorizationGates:
    """Canary exposure (generative models only; a classifier records the gate as skipped, with the reason)."""

    max_exposure: float | None = None
    """Largest canary exposure in bits (log2 of the candidates minus log2 of the canary's rank)."""

    def __post_init__(self) -> None:
        if self.max_exposure is not None and not self.max_exposure >= 0.0:
            raise ValueError("max_exposure must be >= 0 bits (or null to turn the gate off)")


@dataclass
class LoopGatesConfig:
    """What a challenger must pass to be promoted; every gate is recorded, and one failure keeps the
    champion. A gate set to null is not applied."""

    max_regression: float | None = 0.01
    """Largest allowed drop of accuracy on the frozen golden test set (the base data's test split),
    challenger vs champion (0.01 = 1 point)."""
    min_improvement: float | None = 0.0
    """Least accuracy gain on the held-out slice of recent feedback, challenger minus champion (0.0: at
    least as good)."""
    min_holdout: int = 20
    """The improvement gate fails when the feedback holdout has fewer rows than this: too few to judge."""
    max_ece: float | None = 0.1
    """Largest expected calibration error (15 bins) of the challenger on the golden test set, after its
    temperature (lmloop.calibration). Also written calibration.max_ece."""
    min_accuracy: float | None = None
    """Least absolute accuracy of the challenger on the golden test set."""
    max_domain_regression: float | None = None
    """Largest accuracy drop in any one domain of the golden test set (needs data.domain_column)."""
    bias: BiasGates = field(default_factory=BiasGates)
    calibration: CalibrationGates = field(default_factory=CalibrationGates)
    membership: MembershipGates = field(default_factory=MembershipGates)
    memorization: MemorizationGates = field(default_factory=MemorizationGates)
    # the audit gates may be written dotted (`bias.max_flip_rate: 0.02`): list them so in errors
    _dotted_in_errors: typing.ClassVar[bool] = True

    def __post_init__(self) -> None:
        # calibration.max_ece is max_ece by another name: one value, whichever way it was written
        if self.calibration.max_ece is not None:
            self.max_ece = self.calibration.max_ece
        else:
            self.calibration.max_ece = self.max_ece
        for k in ("max_regression", "max_ece", "max_domain_regression", "min_accuracy"):
            v = getattr(self, k)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{k} must be in [0, 1] (or null to turn the gate off)")
        if self.min_improvement is not None and not -1.0 <= self.min_improvement <= 1.0:
            raise ValueError("min_improvement must be in [-1, 1] (or null to turn the gate off)")
        if self.min_holdout < 1:
            raise ValueError("min_holdout must be >= 1")


@dataclass
class LoopConfig:
    """The gated retraining loop (``lmloop loop RECIPE``): the challenger is fine-tuned with the recipe's
    data/model/train sections, on the base training data plus labelled feedback from the prediction log."""

    model_name: str | None = None
    """Registered model the loop serves (models:/NAME@alias); default: tracking.register."""
    alias: str = "champion"
    """The alias the serving process follows; moved only when every gate passes."""
    prediction_log: str | None = None
    """Prediction store URL (sqlite:///path.db, postgresql://...); default: where lmloop serve writes."""
    served_model: str | None = None
    """Only read predictions logged under this model name (as served: --model-name); default: all."""
    start_from: Literal["champion", "base"] = "champion"
    """Fine-tune the challenger from the current champion's weights or from model.base."""
    feedback_holdout: float = 0.2
    """Share of feedback kept out of training for the improvement gate, chosen by a hash of the
    normalised text: stable across turns, and no text is on both sides."""
    feedback_validation: float = 0.0
    """Share of feedback (by the same hash, next to the holdout share) added to the validation split that
    picks the challenger's best checkpoint, so selection sees the production traffic, not only the base
    domain (0.1 is a good value once feedback runs to thousands; with a few dozen records every one is
    better spent on training). The golden test set stays frozen. 0: validation is the base data's alone."""
    dir: str | None = None
    """Where turns are written (data version, challenger, state.json); default: <out>/loop."""
    triggers: LoopTriggersConfig = field(default_factory=LoopTriggersConfig)
    gates: LoopGatesConfig = field(default_factory=LoopGatesConfig)

    def __post_init__(self) -> None:
        import re

        if self.model_name is not None and not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", self.model_name):
            raise ValueError("model_name must be a model name: letters, digits, '.', '_' and '-'")
        if not re.fullmatch(r"[A-Za-z_][\w\-]*", self.alias) or self.alias.lower() == "latest":
            raise ValueError("alias must be a word such as champion ('latest' is reserved)")
        if not 0.0 <= self.feedback_holdout < 1.0:
            raise ValueError("feedback_holdout must be in [0, 1)")
        if not 0.0 <= self.feedback_validation < 1.0 - self.feedback_holdout:
            raise ValueError("feedback_validation must be in [0, 1 - feedback_holdout): a share of feedback")


@dataclass
class AlertsConfig:
    """Thresholds ``lmloop serve --alerts FILE`` watches while serving (the file is a recipe with an
    ``alerts:`` section, or that section alone). A threshold set to null is not watched. A raised or
    cleared alert is logged, shown in /metrics and /dashboard, and POSTed to ``webhook``."""

    min_live_accuracy: float | None = None
    """Alert when live accuracy (feedback on the served version's predictions in `window`) is below this."""
    accuracy_test: Literal["point", "wilson"] = "point"
    """'point': the estimate is below min_live_accuracy; 'wilson': the upper end of its Wilson 95% interval
    is below it (only a statistically clear drop)."""
    min_labelled: int = 30
    """Fewer labelled predictions than this in `window`: live accuracy is not judged (too noisy)."""
    max_drift_p: float | None = None
    """Alert when the drift p-value (family-wise, lmloop.mlops.drift.detect of recent texts against the
    model's drift_reference.npz) is below this, e.g. 0.01. No reference: not judged, and said so."""
    max_p99_latency_ms: float | None = None
    """Alert when the 99th percentile of request latency in `window` is above this."""
    max_error_rate: float | None = None
    """Alert when more than this share of /v1/classify requests in `window` got a 5xx (this replica)."""
    max_refusal_rate: float | None = None
    """Alert when more than this share of /v1/classify requests in `window` got 429 (queue full)."""
    min_requests: int = 20
    """Latency and rate alerts judge only when `window` holds at least this many requests."""
    window: str = "1h"
    """How far back 'recent' goes for live accuracy, latency and drift (90s, 15m, 1h, 1d)."""
    drift_interval: str = "5m"
    """Least time between two drift checks (embedding the texts costs CPU the model shares)."""
    drift_texts: int = 500
    """Most recent texts compared with the drift reference (kept in memory when --log-text hash)."""
    webhook: str | None = None
    """URL that receives a JSON POST on every raise and clear (http:// or https://)."""
    webhook_timeout_s: float = 5.0
    """Seconds per webhook attempt."""
    webhook_retries: int = 3
    """Further attempts after a failed POST, with doubling back-off; then the event is counted as failed."""

    def __post_init__(self) -> None:
        import re

        for k in ("min_live_accuracy", "max_error_rate", "max_refusal_rate"):
            v = getattr(self, k)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{k} must be in [0, 1] (or null to turn the alert off)")
        if self.max_drift_p is not None and not 0.0 < self.max_drift_p < 1.0:
            raise ValueError("max_drift_p must be in (0, 1), e.g. 0.01 (or null to turn the alert off)")
        if self.max_p99_latency_ms is not None and not self.max_p99_latency_ms > 0:
            raise ValueError("max_p99_latency_ms must be > 0 (or null to turn the alert off)")
        for k in ("min_labelled", "min_requests", "drift_texts"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1")
        if self.drift_texts < 20:
            raise ValueError("drift_texts must be >= 20 (the drift tests need 20 texts a side)")
        for k in ("window", "drift_interval"):
            if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[smhdw]\s*", getattr(self, k), re.IGNORECASE):
                raise ValueError(f"{k} must be a duration like 90s, 15m, 1h, 1d, got {getattr(self, k)!r}")
        if self.webhook is not None and not re.match(r"https?://[^/\s]+", self.webhook):
            raise ValueError("webhook must be an http:// or https:// URL")
        if not self.webhook_timeout_s > 0:
            raise ValueError("webhook_timeout_s must be > 0")
        if not 0 <= self.webhook_retries <= 10:
            raise ValueError("webhook_retries must be in [0, 10]")


@dataclass
class DemoConfig:
    """``lmloop demo``: a champion fine-tuned on the source domains of the recipe's data serves traffic from
    the shift domains; drift and feedback trigger a loop turn (see :mod:`lmloop.demo`). Other commands
    ignore this section."""

    source_domains: list[str] = field(default_factory=lambda: ["movies"])
    """Domains the champion is trained on; their test split is the loop's golden test set."""
    shift_domains: list[str] = field(default_factory=lambda: ["amazon", "tweets"])
    """Domains of the 'production' traffic: their training-split texts, shuffled, are replayed."""
    train_limit: int | None = None
    """Most source-domain training rows (a seeded sample; null: all). Small for --quick."""
    eval_limit: int | None = None
    """Most validation rows, and test rows per domain (a seeded sample; null: all)."""
    stream_limit: int | None = None
    """Most replayed production rows (null: every shift-domain training text)."""
    baseline: int = 300
    """Pre-shift traffic replayed first: held-out source-domain texts (their validation split)."""
    slices: int = 5
    """The production stream is replayed in this many slices; drift and live accuracy after each."""
    rate: float = 40.0
    """Requests per second (one text each), open loop."""
    feedback_fraction: float = 0.6
    """Share of predictions whose true label comes back as feedback."""
    feedback_delay: str = "exp:1"
    """Delay before a true label arrives (lmloop replay --feedback-delay: 5, exp:30, uniform:1-10)."""
    oracle: bool = True
    """Also train a model on source + shift domains from the start (same recipe): the 'within 2 points'
    yardstick. --quick skips it."""
    oracle_gap: float = 0.02
    """Target: after the loop, accuracy on the shift domains within this of the oracle's."""
    source_drop: float = 0.01
    """Target: accuracy on the source domains drops no more than this from the champion's."""

    def __post_init__(self) -> None:
        if not self.source_domains or not self.shift_domains:
            raise ValueError("source_domains and shift_domains must each name at least one domain")
        if set(self.source_domains) & set(self.shift_domains):
            raise ValueError("source_domains and shift_domains must not overlap")
        for k in ("train_limit", "eval_limit", "stream_limit"):
            v = getattr(self, k)
            if v is not None and v < 20:
                raise ValueError(f"{k} must be >= 20 (or null for all)")
        if self.baseline < 0 or self.slices < 1:
            raise ValueError("baseline must be >= 0 and slices >= 1")
        if not self.rate > 0:
            raise ValueError("rate must be > 0 requests per second")
        if not 0.0 < self.feedback_fraction <= 1.0:
            raise ValueError("feedback_fraction must be in (0, 1]")


@dataclass
class Recipe:
    name: str = "run"
    """A short name for the run (also the default MLflow run name)."""
    task: Literal["finetune", "pretrain", "sft"] = "finetune"
    """What `lmloop run` does: fine-tune a classifier (sections data/model/train), pretrain a language
    model (sections pretrain/model/train) or instruction-tune a causal LM with LoRA (sections
    data/model/train/sft)."""
    out: str = "runs/run"
    """Output directory: the fine-tuned HF model, metrics.json, data card, report.html, checkpoints."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)


# ---------------------------------------------------------------------------------------------------------
# Validation: YAML node -> dataclass, with file/line/key in every error.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        names = " or ".join(_type_name(a) for a in args)
        return f"{names} or null" if len(args) < len(typing.get_args(tp)) else names
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _where(src: str, node: Any) -> str:
    mark = getattr(node, "start_mark", None)
    if mark is None:
        return src
    return f"{src}, line {mark.line + 1}, column {mark.column + 1}"


def _convert(value: Any, tp: Any, key: str, src: str, node: Any) -> Any:
    """Check one value against its annotated type; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key, src, node)
            except ConfigError:
                continue
        raise ConfigError(f"{_where(src, node)}: '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{_where(src, node)}: '{key}' must be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, src, node)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{_where(src, node)}: '{key}' must be {_type_name(tp)}, got {value!r}")
        items = getattr(node, "value", None)
        items = items if isinstance(items, list) and len(items) == len(value) else [node] * len(value)
        (elem,) = typing.get_args(tp)
        return [
            _convert(v, elem, f"{key}[{i}]", src, n)
            for i, (v, n) in enumerate(zip(value, items, strict=True))
        ]
    ok = (
        (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is bool and isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        # YAML 1.1 reads 5e-5 as a string; accept numeric strings for floats, as a user would expect.
        if tp is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(
            f"{_where(src, node)}: '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return float(value) if tp is float else value


def _build(
    cls: type, data: Any, prefix: str, src: str, node: Any = None, overridden: frozenset = frozenset()
) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(src, node)}: '{prefix or 'recipe'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    data, node = _expand_dotted(hints, data, node, prefix, src)
    child_nodes = _children(node)
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        knode = child_nodes.get(k, (None, None))
        ksrc = src
        if key in overridden:  # a --set value: the file is not to blame
            ksrc, knode = f"--set {key}", (None, None)
        if k not in names:
            valid = _dotted_names(cls) if getattr(cls, "_dotted_in_errors", False) else names
            close = difflib.get_close_matches(str(k), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{_where(ksrc, knode[0])}: unknown key '{key}'{hint}; expected one of: {', '.join(valid)}"
            )
        if dataclasses.is_dataclass(hints[k]):
            kwargs[k] = _build(hints[k], v, key, src, knode[1], overridden)
        else:
            kwargs[k] = _convert(v, hints[k], key, ksrc, knode[1])
    try:
        return cls(**kwargs)
    except ValueError as e:
        # __post_init__ messages start with the field name: point at that key's line, not the section's
        field_name = str(e).split(" ", 1)[0]
        if field_name in names:
            key = f"{prefix}.{field_name}" if prefix else field_name
            if key in overridden:
                raise ConfigError(f"--set {key}: {e}") from None
            vnode = child_nodes.get(field_name, (None, node))[1]
            raise ConfigError(f"{_where(src, vnode)}: '{key}': {e}") from None
        raise ConfigError(f"{_where(src, node)}: '{prefix or 'recipe'}': {e}") from None


def _dotted_names(cls: type) -> list[str]:
    """The keys of ``cls`` with its sections written dotted: ``max_ece, bias.max_flip_rate, ...``."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        sub = hints[f.name]
        out += [f"{f.name}.{n}" for n in _dotted_names(sub)] if dataclasses.is_dataclass(sub) else [f.name]
    return out


def _expand_dotted(hints: dict, data: dict, node: Any, prefix: str, src: str) -> tuple[dict, Any]:
    """``a.b: v`` -> ``a: {b: v}`` where section ``a`` is a mapping of the schema (``gates: {bias.max_gap:
    0.1}``), merged with an ``a:`` mapping given too; the YAML nodes follow, so errors keep their lines.
    A dotted key whose head is no section is left as it is, for the unknown-key error to name in full."""
    dotted = [
        k for k in data
        if isinstance(k, str) and "." in k and dataclasses.is_dataclass(hints.get(k.partition(".")[0]))
    ]  # fmt: skip
    if not dotted:
        return data, node
    import yaml

    children = _children(node)
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items() if k not in dotted}
    sub_nodes: dict[str, list] = {}
    for k in dotted:
        head, _, rest = k.partition(".")
        key = f"{prefix}.{head}" if prefix else head
        knode, vnode = children.get(k, (None, None))
        sec = out.setdefault(head, {})
        if sec is None:  # an empty `bias:` section loads as None
            sec = out[head] = {}
        if not isinstance(sec, dict):
            raise ConfigError(f"{_where(src, knode)}: '{key}' must be a mapping, got {sec!r}")
        if rest in sec:
            raise ConfigError(f"{_where(src, knode)}: '{key}.{rest}' is given twice (dotted and nested)")
        sec[rest] = data[k]
        if knode is not None:
            short = yaml.ScalarNode("tag:yaml.org,2002:str", rest, knode.start_mark, knode.end_mark)
            sub_nodes.setdefault(head, []).append((short, vnode))
    if not isinstance(node, yaml.MappingNode):
        return out, node
    pairs = [(kn, vn) for kn, vn in node.value if kn.value not in dotted and kn.value not in sub_nodes]
    for head, extra in sub_nodes.items():
        kn, vn = children.get(head, (extra[0][0], None))
        old = vn.value if isinstance(vn, yaml.MappingNode) else []
        merged = yaml.MappingNode("tag:yaml.org,2002:map", [*old, *extra], kn.start_mark, kn.end_mark)
        pairs.append((yaml.ScalarNode("tag:yaml.org,2002:str", head, kn.start_mark, kn.end_mark), merged))
    return out, yaml.MappingNode(node.tag, pairs, node.start_mark, node.end_mark)


def _children(node: Any) -> dict:
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return {}
    out = {}
    for knode, vnode in node.value:
        out[knode.value] = (knode, vnode)
    return out


def recipe_from_dict(data: dict, source: str = "<recipe>") -> Recipe:
    """Validate a plain dict (e.g. built from CLI flags) into a :class:`Recipe`."""
    return _build(Recipe, data, "", source)


def _read_yaml(p: Path, what: str):
    """(node tree for line/column lookups, parsed data) of a YAML file; a ConfigError naming the file, line
    and column when it is missing or not valid YAML."""
    import yaml

    if not p.is_file():
        raise ConfigError(f"{p}: {what} file not found")
    text = p.read_text(encoding="utf-8")
    try:
        return yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(p)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Read and validate a recipe YAML; ``overrides`` (dotted keys -> values) are applied on top."""

    p = Path(path)
    node, data = _read_yaml(p, "recipe")
    if not isinstance(data, dict):
        data = {} if data is None else data
    for dotted, value in (overrides or {}).items():
        cur = data
        *parents, last = dotted.split(".")
        for part in parents:
            if not isinstance(cur.get(part), dict):  # an empty section (`train:`) loads as None
                cur[part] = {}
            cur = cur[part]
        cur[last] = value
    return _build(Recipe, data, "", str(p), node, frozenset(overrides or {}))


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def describe_schema(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) rows for every recipe key, from the attribute docstrings."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for a, b in zip(body, body[1:], strict=False):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = " ".join(str(b.value.value).split())  # type: ignore[union-attr]
    except (OSError, TypeError):
        pass
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe_schema(hints[f.name], key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else ""
        rows.append((key, _type_name(hints[f.name]), repr(default), docs.get(f.name, "")))
    return rows


def load_alerts(path: str | Path) -> AlertsConfig:
    """Read alert thresholds from ``path``: a recipe (its ``alerts:`` section) or a YAML file holding only
    that section. Errors name the file, the line and the key, like :func:`load_recipe`."""

    p = Path(path)
    node, data = _read_yaml(p, "alerts")
    if data is None:
        data = {}
    if isinstance(data, dict) and "alerts" in data:  # a recipe: validate all of it, return its section
        return _build(Recipe, data, "", str(p), node).alerts
    return _build(AlertsConfig, data, "", str(p), node)

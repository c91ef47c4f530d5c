"""Drift detectors: is the traffic a model sees still like the data it was trained on?

A :class:`Reference` is a fixed sample of the training data, summarised three ways; :func:`detect` compares a
window of traffic with it and returns a :class:`DriftReport` with one :class:`DriftTest` per check:

* **text properties** (group ``text``): per-text features that are cheap and tell sources apart — length in
  characters and words, the tokenizer's unknown-token ([UNK]) share, non-ASCII share (charset), English
  stop-word share (a language proxy), digits, upper case, URLs, @mentions, #hashtags, ``!``/``?``. Each is a
  two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``), Holm-corrected across the properties. The
  features are discrete (counts, many zeros), where KS is conservative: it alarms less often than ``alpha``.
* **embeddings** (group ``embedding``): sentence embeddings (mean-pooled, L2-normalised MiniLM by default,
  :class:`Embedder`) compared by the maximum mean discrepancy (MMD) with an RBF kernel whose bandwidth is
  the median pairwise distance of the pooled sample, and a **permutation p-value** (:func:`mmd_test`). This
  is the primary embedding test: a permutation test is exact at any sample size (under no drift the two
  samples are exchangeable, so ``p`` is uniform up to the 1/(P+1) grid), every point is used for testing,
  and the median bandwidth is permutation-invariant, so choosing it does not spoil the calibration. The
  optional domain classifier (``classifier=True``, :func:`classifier_test`) gives an interpretable effect
  size (AUC: 0.5 = indistinguishable) but spends half the points on fitting, so it has less power at the
  few hundred texts a monitoring window holds.
* **predictions** (group ``prediction``): a chi-squared test of homogeneity on the label counts
  (``scipy.stats.chi2_contingency``, reference vs current; the reference is a sample too) is the alarm;
  the population stability index (PSI) is reported as the descriptive number, with the usual bands
  (< 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift).

Family-wise error: ``alpha`` is split equally between the groups present (Bonferroni), and within the
text group Holm's step-down procedure spends the group's share. So under no drift, ``report.drifted`` is
True with probability at most ``alpha`` (for the text group, less: KS on discrete features is conservative).
Each test's ``threshold`` is the level its raw ``p_value`` was compared with.

A test without enough data (fewer than ``min_texts`` texts, no reference embeddings, ...) is reported with
``p_value=None`` and ``detail`` saying why, never raised. A reference saves as ``drift_reference.npz`` (arrays)
plus ``drift_reference.json`` (metadata); no pickle, so a model directory can carry one safely.

Example::

    ref = build_reference(train_texts, embedder="minilm-l6", labels=val_predicted_labels)
    ref.save(model_dir / "drift_reference.npz")
    report = detect(Reference.load(model_dir / "drift_reference.npz"), window_texts,
                    predicted_labels=window_labels)
    if report.drifted: ...   # report.to_dict() is plain JSON
"""

from __future__ import annotations

import functools
import json
import math
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmloop.errors import DataError

REFERENCE_FILE = "drift_reference.npz"  # the name a model directory carries it under (json beside it)
FORMAT_VERSION = 1
PSI_BANDS = (0.1, 0.25)  # stable < 0.1 <= moderate < 0.25 <= major

_URL = re.compile(r"https?://\S+|www\.\S+", re.IGNORECASE)
_MENTION = re.compile(r"(?<!\w)@\w+")
_HASHTAG = re.compile(r"(?<!\w)#\w+")
_WORD = re.compile(r"[A-Za-z']+")


# ---------------------------------------------------------------------------------------------- text properties
@functools.cache
def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS  # 318 words, no download

    return frozenset(ENGLISH_STOP_WORDS)


def _one(text: str) -> dict[str, float]:
    n = max(len(text), 1)
    words = text.split()
    alpha_words = _WORD.findall(text.lower())
    letters = [c for c in text if c.isalpha()]
    stop = _stop_words()
    return {
        "chars": float(len(text)),
        "words": float(len(words)),
        "non_ascii": sum(ord(c) > 127 for c in text) / n,
        # letters outside Latin script (Cyrillic, CJK, Arabic, ...): the charset half of "language"
        "non_latin": sum(not unicodedata.name(c, "").startswith("LATIN") for c in letters)
        / max(len(letters), 1),
        # English function words: ~40-50% of running English text, ~0% of most other languages
        "stop_words": sum(w in stop for w in alpha_words) / max(len(alpha_words), 1),
        "digits": sum(c.isdigit() for c in text) / n,
        "upper": sum(c.isupper() for c in letters) / max(len(letters), 1),
        "urls": float(len(_URL.findall(text))),
        "mentions": float(len(_MENTION.findall(text))),
        "hashtags": float(len(_HASHTAG.findall(text))),
        "exclaim": float(text.count("!") + text.count("?")),
    }


TEXT_PROPERTIES = tuple(_one("x"))  # the names, in a fixed order
UNK_PROPERTY = "unk_rate"  # added when a tokenizer is known


def text_properties(texts: Sequence[str], *, tokenizer=None, max_length: int = 128) -> dict[str, np.ndarray]:
    """Per-text properties of ``texts``: ``{name: (N,) float64}`` for :data:`TEXT_PROPERTIES`, plus
    ``unk_rate`` (share of [UNK] among the tokens, special tokens excluded) when ``tokenizer`` is given."""
    rows = [_one(t) for t in texts]
    out = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in TEXT_PROPERTIES}
    if tokenizer is not None:
        unk = tokenizer.unk_token_id
        ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)[
            "input_ids"
        ]
        out[UNK_PROPERTY] = np.array(
            [sum(i == unk for i in s) / max(len(s), 1) for s in ids], dtype=np.float64
        )
    return out


# ---------------------------------------------------------------------------------------------- embeddings
class Embedder:
    """Sentence embeddings from an encoder: mean pooling over real tokens, L2-normalised, ``(N, H)`` float32.

    ``ref`` is anything :func:`lmloop.assets.resolve_model` takes (default the packaged ``minilm-l6``, i.e.
    sentence-transformers all-MiniLM-L6-v2, whose embeddings are trained to be mean-pooled). A fine-tuned
    classifier directory works too (its encoder is loaded, the head ignored), but its embeddings are
    specialised to the labels; for drift the general-purpose encoder sees more kinds of change.
    """

    def __init__(self, ref: str = "minilm-l6", *, max_length: int = 128, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        from lmloop.assets import resolve_model
        from lmloop.models import _quiet

        self.ref, self.max_length, self.batch_size = str(ref), max_length, batch_size
        path = resolve_model(self.ref)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.model = _quiet(
            lambda: AutoModel.from_pretrained(path, trust_remote_code=False, use_safetensors=True)
        ).eval()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        texts = list(texts)
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        # sorted by length so each batch pads to a near-equal length; written back in input order
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                h = self.model(**enc).last_hidden_state  # (B, T, H)
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1)  # (B, H) mean over real tokens
                out[idx] = torch.nn.functional.normalize(e, dim=-1).float().numpy()
        return out


@functools.lru_cache(maxsize=2)
def cached_embedder(ref: str = "minilm-l6") -> Embedder:
    """One loaded :class:`Embedder` per ``ref`` per process (monitoring calls :func:`detect` again and again)."""
    return Embedder(ref)


def _embedder(embedder: Embedder | str | None) -> Embedder | None:
    return cached_embedder(embedder) if isinstance(embedder, str) else embedder


# ---------------------------------------------------------------------------------------------- statistics
def mmd_test(
    x: np.ndarray, y: np.ndarray, *, permutations: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Two-sample MMD test: ``(mmd2, p_value, bandwidth)`` for ``x`` (n, D) against ``y`` (m, D).

    RBF kernel ``exp(-d^2 / (2 s^2))`` with ``s`` the median pairwise distance of the pooled sample;
    ``mmd2`` is the biased (V-statistic) estimate ``a^T K a`` with ``a = 1/n`` on x, ``-1/m`` on y. The p-value
    is ``(1 + #{permuted >= observed}) / (1 + permutations)``: exact under exchangeability, never below
    ``1 / (1 + permutations)``. All permutations are one matrix product: ``(P, N) @ (N, N)``.
    """
    n, m = len(x), len(y)
    z = np.concatenate([x, y]).astype(np.float64)  # (N, D)
    sq = np.einsum("ij,ij->i", z, z)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)  # (N, N) squared distances
    off = d2[np.triu_indices(n + m, k=1)]
    med = float(np.median(off[off > 0])) if np.any(off > 0) else 1.0  # median squared distance
    k = np.exp(-d2 / med)  # = exp(-d^2 / (2 s^2)) with s^2 = med / 2, i.e. s = median distance / sqrt(2)
    a = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    observed = float(a @ k @ a)
    rng = np.random.default_rng(seed)
    perm = rng.permuted(np.broadcast_to(a, (permutations, n + m)), axis=1)  # (P, N): a shuffled per row
    null = np.einsum("pi,pi->p", perm @ k, perm)  # (P,) a_p^T K a_p
    # the tolerance keeps a permutation that reproduces the observed split from losing by a rounding error
    p = (1 + int(np.sum(null >= observed - 1e-12))) / (1 + permutations)
    return observed, p, math.sqrt(med / 2)


def classifier_test(x: np.ndarray, y: np.ndarray, *, seed: int = 0) -> tuple[float, float]:
    """Domain-classifier test: ``(auc, p_value)``. A logistic regression learns x vs y on a random half of
    each; on the other half its scores are compared by a one-sided Mann-Whitney U test (AUC = U / (n1 n2)).
    Exact under no drift: the fitted model never saw the held-out points, which are then exchangeable."""
    from scipy.stats import mannwhitneyu
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    ix, iy = rng.permutation(len(x)), rng.permutation(len(y))
    hx, hy = len(x) // 2, len(y) // 2
    fit_x, test_x, fit_y, test_y = x[ix[:hx]], x[ix[hx:]], y[iy[:hy]], y[iy[hy:]]
    clf = LogisticRegression(C=1.0, max_iter=1000)
    clf.fit(np.concatenate([fit_x, fit_y]), np.r_[np.zeros(len(fit_x)), np.ones(len(fit_y))])
    sx, sy = clf.decision_function(test_x), clf.decision_function(test_y)
    u, p = mannwhitneyu(sy, sx, alternative="greater")
    return float(u) / (len(sx) * len(sy)), float(p)


def psi(reference_counts: Sequence[float], current_counts: Sequence[float], *, eps: float = 1e-4) -> float:
    """Population stability index ``sum((c - r) * ln(c / r))`` over shares; empty bins count as ``eps``."""
    r = np.asarray(reference_counts, dtype=np.float64)
    c = np.asarray(current_counts, dtype=np.float64)
    r = np.maximum(r / r.sum(), eps)
    c = np.maximum(c / c.sum(), eps)
    return float(np.sum((c - r) * np.log(c / r)))


def psi_band(value: float) -> str:
    """``stable`` (< 0.1), ``moderate`` (0.1-0.25) or ``major`` (>= 0.25), the usual PSI reading."""
    return "stable" if value < PSI_BANDS[0] else "moderate" if value < PSI_BANDS[1] else "major"


# ---------------------------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """What drift is measured against: a seeded sample of the training data, summarised.

    ``properties``: per-text property values ``{name: (N,)}``; ``embeddings``: ``(N, H)`` float32 or None;
    ``label_counts``: the label distribution predictions are compared with, or None; ``embedder`` /
    ``tokenizer``: the model references that produced them (:func:`detect` loads the same ones).
    """

    properties: dict[str, np.ndarray]
    embeddings: np.ndarray | None = None
    label_counts: dict[str, int] | None = None
    embedder: str | None = None
    tokenizer: str | None = None
    n_texts: int = 0  # how many texts the reference was built from (before sampling)
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.npz``: the arrays) and the ``.json`` beside it (the rest). Returns the npz path."""
        path = Path(path).with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"prop_{k}": v for k, v in self.properties.items()}
        if self.embeddings is not None:
            arrays["embeddings"] = self.embeddings
        np.savez_compressed(path, **arrays)
        info = {
            "format": FORMAT_VERSION,
            "label_counts": self.label_counts,
            "embedder": self.embedder,
            "tokenizer": self.tokenizer,
            "n_texts": self.n_texts,
            "properties": list(self.properties),
            "meta": self.meta,
        }
        path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        """Read a reference written by :meth:`save` (either file's path works)."""
        path = Path(path).with_suffix(".npz")
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise DataError(f"drift reference incomplete: need {path.name} and {meta_path.name}", path=path)
        info = json.loads(meta_path.read_text())
        if info.get("format") != FORMAT_VERSION:
            raise DataError(
                f"drift reference format {info.get('format')!r}; this lmloop reads {FORMAT_VERSION}",
                path=meta_path,
            )
        with np.load(path, allow_pickle=False) as z:
            props = {k: z[f"prop_{k}"] for k in info["properties"]}
            emb = z["embeddings"] if "embeddings" in z.files else None
        return cls(
            properties=props,
            embeddings=emb,
            label_counts=info.get("label_counts"),
            embedder=info.get("embedder"),
            tokenizer=info.get("tokenizer"),
            n_texts=int(info.get("n_texts", 0)),
            meta=info.get("meta") or {},
        )


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        raise DataError(f"{what}: expected a list of texts, got one string")
    texts = list(texts)
    if not texts:
        raise DataError(f"{what}: no texts")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise DataError(f"{what}: text {bad} is {type(texts[bad]).__name__}, expected str")
    return texts


def build_reference(
    texts: Sequence[str],
    *,
    tokenizer=None,
    embedder: Embedder | str | None = None,
    embeddings: np.ndarray | None = None,
    labels: Sequence[str] | None = None,
    max_texts: int = 2000,
    seed: int = 0,
) -> Reference:
    """Summarise training ``texts`` into a :class:`Reference` from a seeded sample of at most ``max_texts``.

    ``embedder``: an :class:`Embedder` or a model reference (``"minilm-l6"``) for the embedding test; None
    skips it. ``embeddings``: precomputed ``(len(texts), H)`` embeddings instead (``embedder`` then only
    names their source). ``tokenizer``: a Hugging Face tokenizer or model reference for the [UNK] rate;
    default the embedder's. ``labels``: what predictions will be compared with — best the model's own
    predictions on held-out data (so its bias is not mistaken for drift), else the training labels.
    """
    texts = _check_texts(texts, "build_reference")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(texts), size=min(max_texts, len(texts)), replace=False))
    sample = [texts[i] for i in idx]
    emb = _embedder(embedder)
    tok, tok_ref = _tokenizer(tokenizer, emb, None)
    if embeddings is not None:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if len(embeddings) != len(texts):
            raise DataError(f"build_reference: {len(embeddings)} embeddings for {len(texts)} texts")
        embeddings = embeddings[idx]
    elif emb is not None:
        embeddings = emb(sample)
    label_counts = None
    if labels is not None:
        label_counts = {str(k): int(v) for k, v in sorted(Counter(map(str, labels)).items())}
    emb_ref = emb.ref if emb is not None else (embedder if isinstance(embedder, str) else None)
    return Reference(
        properties=text_properties(sample, tokenizer=tok),
        embeddings=embeddings,
        label_counts=label_counts,
        embedder=emb_ref if embeddings is not None else None,
        tokenizer=tok_ref,
        n_texts=len(texts),
        meta={"seed": seed, "max_texts": max_texts},
    )


def _tokenizer(tokenizer, emb: Embedder | None, default_ref: str | None):
    """(tokenizer object or None, its reference string or None)."""
    if tokenizer is None and emb is not None:
        return emb.tokenizer, emb.ref
    if tokenizer is None and default_ref is not None:
        return _load_tokenizer(default_ref), default_ref
    if isinstance(tokenizer, str):
        return _load_tokenizer(tokenizer), tokenizer
    if tokenizer is None:
        return None, None
    return tokenizer, getattr(tokenizer, "name_or_path", None) or None


@functools.lru_cache(maxsize=4)
def _load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    from lmloop.assets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(ref), trust_remote_code=False)


# ---------------------------------------------------------------------------------------------- report
@dataclass
class DriftTest:
    """One check. ``p_value`` None = not run (``detail`` says why); ``drifted`` = ``p_value <= threshold``."""

    name: str  # e.g. "text.chars", "embedding.mmd", "prediction.chi2"
    group: str  # "text", "embedding" or "prediction"
    statistic: float | None
    p_value: float | None
    threshold: float  # the level the raw p-value is compared with, after the multiple-test correction
    drifted: bool
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # test-specific numbers (PSI, AUC, sizes, ...)


@dataclass
class DriftReport:
    """All checks of one :func:`detect` call. ``drifted``: any test alarmed; the family-wise error rate
    over the whole report is at most ``alpha`` under no drift."""

    tests: list[DriftTest]
    alpha: float
    n_reference: int
    n_current: int

    @property
    def drifted(self) -> bool:
        return any(t.drifted for t in self.tests)

    def test(self, name: str) -> DriftTest:
        """The test called ``name``; KeyError listing the names if there is none."""
        for t in self.tests:
            if t.name == name:
                return t
        raise KeyError(f"no drift test '{name}'; have {', '.join(t.name for t in self.tests)}")

    def group(self, group: str) -> list[DriftTest]:
        return [t for t in self.tests if t.group == group]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: ``{"drifted", "alpha", "n_reference", "n_current", "tests": [...]}``."""
        return {
            "drifted": self.drifted,
            "alpha": self.alpha,
            "n_reference": self.n_reference,
            "n_current": self.n_current,
            "tests": [asdict(t) for t in self.tests],
        }

    def summary(self) -> str:
        """One line per test, alarms first marked ``DRIFT``."""
        lines = [f"drift: {'YES' if self.drifted else 'no'} (family-wise alpha {self.alpha:g})"]
        for t in self.tests:
            p = "n/a" if t.p_value is None else f"{t.p_value:.3g}"
            flag = "DRIFT" if t.drifted else "ok"
            lines.append(f"  {flag:5s} {t.name:22s} p={p:8s} <= {t.threshold:.3g}?  {t.detail}")
        return "\n".join(lines)


def _skip(name: str, group: str, why: str) -> DriftTest:
    return DriftTest(name, group, None, None, 0.0, False, f"insufficient data: {why}")


def detect(
    reference: Reference,
    texts: Sequence[str],
    *,
    predicted_labels: Sequence[str] | None = None,
    alpha: float = 0.01,
    embedder: Embedder | str | None = None,
    embeddings: np.ndarray | None = None,
    tokenizer=None,
    classifier: bool = False,
    max_embed: int = 500,
    permutations: int = 1000,
    min_texts: int = 20,
    seed: int = 0,
) -> DriftReport:
    """Compare traffic ``texts`` (and the labels predicted for them) with ``reference``: a :class:`DriftReport`.

    ``alpha`` is the family-wise level of the whole report (split over the groups present, Holm within the
    text properties). Embeddings of ``texts`` come from ``embeddings`` (precomputed, aligned with ``texts``),
    else from ``embedder``, else from the reference's own embedder (loaded once per process); at most
    ``max_embed`` texts per side enter the MMD test (a seeded sample; 500 vs 500 with 1000 permutations
    takes ~0.2 s on one core). ``classifier=True`` adds the domain-classifier test as a fourth group. A test
    with fewer than ``min_texts`` texts (labels) on either side is reported as insufficient data, not run.
    Deterministic for a given ``seed``.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    texts = _check_texts(texts, "detect")
    rng = np.random.default_rng(seed)
    groups: dict[str, list[DriftTest]] = {}
    raw: dict[str, list[float | None]] = {}  # group -> raw p-values, aligned with groups[group]

    # text properties: KS per property
    # the [UNK] rate only where the reference has one, with the reference's tokenizer unless told otherwise
    tok = None
    if UNK_PROPERTY in reference.properties:
        tok, _ = _tokenizer(tokenizer, _embedder(embedder), reference.tokenizer)
    cur_props = text_properties(texts, tokenizer=tok)
    from scipy.stats import ks_2samp

    tests, ps = [], []
    for name, ref_vals in reference.properties.items():
        if name not in cur_props:
            tests.append(_skip(f"text.{name}", "text", "no tokenizer for the current texts"))
            ps.append(None)
            continue
        cur_vals = cur_props[name]
        if min(len(ref_vals), len(cur_vals)) < min_texts:
            why = f"{len(ref_vals)} reference / {len(cur_vals)} current texts, need {min_texts}"
            tests.append(_skip(f"text.{name}", "text", why))
            ps.append(None)
            continue
        with warnings.catch_warnings():  # "exact calculation unsuccessful, switching to asymp" is fine
            warnings.simplefilter("ignore", RuntimeWarning)
            r = ks_2samp(ref_vals, cur_vals)
        detail = f"median {np.median(ref_vals):.3g} -> {np.median(cur_vals):.3g}, mean {np.mean(ref_vals):.3g} -> {np.mean(cur_vals):.3g}"
        tests.append(
            DriftTest(f"text.{name}", "text", float(r.statistic), float(r.pvalue), 0.0, False, detail)
        )
        ps.append(float(r.pvalue))
    groups["text"], raw["text"] = tests, ps

    # embeddings: MMD permutation test (and optionally the domain classifier)
    emb_tests: list[DriftTest] = []
    clf_tests: list[DriftTest] = []
    ref_emb = reference.embeddings
    cur_emb = None
    if ref_emb is not None and len(ref_emb) >= min_texts and len(texts) >= min_texts:
        if embeddings is not None:
            cur_emb = np.asarray(embeddings, dtype=np.float32)
            if len(cur_emb) != len(texts):
                raise DataError(f"detect: {len(cur_emb)} embeddings for {len(texts)} texts")
        else:
            emb = _embedder(embedder) or (cached_embedder(reference.embedder) if reference.embedder else None)
            if emb is not None:
                cur_emb = emb(texts)
    if cur_emb is None:
        why = (
            "the reference has no embeddings"
            if ref_emb is None
            else f"{len(ref_emb)} reference / {len(texts)} current texts, need {min_texts}"
            if min(len(ref_emb), len(texts)) < min_texts
            else "no embedder for the current texts"
        )
        emb_tests.append(_skip("embedding.mmd", "embedding", why))
        if classifier:
            clf_tests.append(_skip("embedding.classifier", "classifier", why))
    else:
        if cur_emb.shape[1] != ref_emb.shape[1]:
            raise DataError(
                f"detect: current embeddings have width {cur_emb.shape[1]}, the reference {ref_emb.shape[1]} "
                f"(made by {reference.embedder}); use the same embedder"
            )
        x = ref_emb[np.sort(rng.choice(len(ref_emb), min(max_embed, len(ref_emb)), replace=False))]
        y = cur_emb[np.sort(rng.choice(len(cur_emb), min(max_embed, len(cur_emb)), replace=False))]
        stat, p, bw = mmd_test(x, y, permutations=permutations, seed=int(rng.integers(2**31)))
        emb_tests.append(
            DriftTest(
                "embedding.mmd",
                "embedding",
                stat,
                p,
                0.0,
                False,
                f"MMD^2 {stat:.4g} on {len(x)} vs {len(y)} embeddings, {permutations} permutations",
                {"bandwidth": bw, "n_reference": len(x), "n_current": len(y), "permutations": permutations},
            )
        )
        if classifier:
            auc, p = classifier_test(x, y, seed=int(rng.integers(2**31)))
            clf_tests.append(
                DriftTest(
                    "embedding.classifier",
                    "classifier",
                    auc,
                    p,
                    0.0,
                    False,
                    f"held-out AUC {auc:.3f} (0.5 = indistinguishable)",
                    {"auc": auc},
                )
            )
    groups["embedding"], raw["embedding"] = emb_tests, [t.p_value for t in emb_tests]
    if classifier:
        groups["classifier"], raw["classifier"] = clf_tests, [t.p_value for t in clf_tests]

    # predictions: chi-squared homogeneity (the alarm) + PSI (descriptive)
    if predicted_labels is not None:
        groups["prediction"] = [_prediction_test(reference.label_counts, predicted_labels, min_texts)]
        raw["prediction"] = [groups["prediction"][0].p_value]

    # alpha split equally over the groups that ran something; Holm within each group
    live = [g for g in groups if any(p is not None for p in raw[g])]
    share = alpha / max(len(live), 1)
    for g in live:
        idx = [i for i, p in enumerate(raw[g]) if p is not None]
        ps = np.array([raw[g][i] for i in idx])
        # Holm: the j-th smallest p is compared with share / (k - j); stop at the first that fails
        order = np.argsort(ps, kind="stable")
        k, going = len(ps), True
        for j, o in enumerate(order):
            t = groups[g][idx[o]]
            t.threshold = share / (k - j)
            going = going and ps[o] <= t.threshold
            t.drifted = bool(going)
            floor = t.extra.get("permutations")
            if floor is not None and 1 / (1 + floor) > t.threshold:
                t.detail += f"; cannot reach {t.threshold:.2g} with {floor} permutations: raise permutations"
    all_tests = [t for g in groups for t in groups[g]]
    n_ref = len(next(iter(reference.properties.values()))) if reference.properties else 0
    return DriftReport(all_tests, alpha, n_ref, len(texts))


def _prediction_test(ref_counts: dict[str, int] | None, predicted: Sequence[str], min_n: int) -> DriftTest:
    from scipy.stats import chi2_contingency

    name = "prediction.chi2"
    if not ref_counts:
        return _skip(name, "prediction", "the reference has no label distribution")
    cur = Counter(map(str, predicted))
    n_ref, n_cur = sum(ref_counts.values()), sum(cur.values())
    if min(n_ref, n_cur) < min_n:
        return _skip(name, "prediction", f"{n_ref} reference / {n_cur} current labels, need {min_n}")
    labels = sorted(set(ref_counts) | set(cur))
    r = np.array([ref_counts.get(k, 0) for k in labels], dtype=np.float64)
    c = np.array([cur.get(k, 0) for k in labels], dtype=np.float64)
    value = psi(r, c)
    extra = {
        "psi": value,
        "psi_band": psi_band(value),
        "reference_share": dict(zip(labels, (r / n_ref).round(4).tolist(), strict=True)),
        "current_share": dict(zip(labels, (c / n_cur).round(4).tolist(), strict=True)),
    }
    detail = f"PSI {value:.3f} ({psi_band(value)}); " + ", ".join(
        f"{k} {r[i] / n_ref:.2f}->{c[i] / n_cur:.2f}" for i, k in enumerate(labels)
    )
    if len(labels) < 2:
        return DriftTest(name, "prediction", 0.0, 1.0, 0.0, False, detail + "; one label only", extra)
    # no Yates correction: it makes the 2x2 test conservative beyond what the chi-squared approximation needs
    res = chi2_contingency(np.stack([r, c]), correction=False)
    expected_min = float(res.expected_freq.min())
    if expected_min < 5:
        detail += f"; smallest expected count {expected_min:.1f} < 5, chi-squared approximate"
    return DriftTest(name, "prediction", float(res.statistic), float(res.pvalue), 0.0, False, detail, extra)

"""Identity-term lists, counterfactual text generation and probe building for the bias audit.

A *family* (gender, nationality, ...) has groups (female, male) and rows of aligned terms, one per group
(``[she, he]``, ``[Emily, Greg]``). :meth:`Family.counterfactuals` finds a text's mentions of one group and
writes the text once for every other group, word-boundary and case preserving, possessives included.
The shipped list is ``terms.yaml`` next to this file; its header documents the format and its limits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmloop.errors import ConfigError

TERMS_FILE = Path(__file__).with_name("terms.yaml")
NEUTRAL = "neutral template"  # Probe.source of a neutral template: its pairs do not count as flips

# After one of these words "her" is an object ("gave her the key"), not a possessive ("her key"); likewise
# "his" before them stands alone ("the key is his and ..."). Context forms apply before these, punctuation
# or the end of the text.
_FUNCTION_WORDS = (
    "a an the this that these those and or but nor so yet for to of in on at by with from about as into "
    "onto over under after before than then too very again back up down out off away here there now today "
    "tonight yesterday tomorrow is was are were be been being am has have had do does did will would can "
    "could should may might must not no if when while because since until though although once where who "
    "whom which what whose how why"
)
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())
_APOSTROPHES = "'\u2019"
# what may not touch a match on either side: letters, digits, _ and hyphens (no "American" in
# "African-American", no "he" in "the")
_LEFT, _RIGHT = r"(?<![\w-])", r"(?![\w-])"
_NEXT_WORD = re.compile(r"\s*([A-Za-z]+)")


@dataclass
class Family:
    """One group family: ``groups`` (K names), ``terms`` (rows of K aligned terms), optional ``fillers``
    (noun phrases of group 0 for the templates) and ``context_forms`` (see terms.yaml)."""

    name: str
    groups: list[str]
    terms: list[list[str]]
    description: str = ""
    fillers: list[str] = field(default_factory=list)
    context_forms: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # term key -> (group index, row index); lower-case keys for case-insensitive terms
        self._index: dict[str, tuple[int, int]] = {}
        for r, row in enumerate(self.terms):
            for g, term in enumerate(row):
                key = _key(term)
                seen = self._index.get(key)
                if seen is not None and seen[0] != g:
                    raise ConfigError(
                        f"family '{self.name}': term '{term}' is in group '{self.groups[g]}' (row {r + 1}) and "
                        f"in group '{self.groups[seen[0]]}' (row {seen[1] + 1}); a term may belong to one group"
                    )
                self._index.setdefault(key, (g, r))  # first row wins within a group
        # longest first, so "young man" wins over "man" and "Chinese people" over "Chinese"
        alts = sorted({t for row in self.terms for t in row}, key=len, reverse=True)
        lower = [t for t in alts if not _is_proper(t)]
        self._lower = (
            re.compile(_LEFT + "(" + "|".join(_pattern(t) for t in lower) + ")" + _RIGHT, re.I)
            if lower
            else None
        )
        proper = [t for t in alts if _is_proper(t)]
        # proper terms match as written or in ALL CAPS only: "Will"-like names never hit "will"
        self._proper = (
            re.compile(
                _LEFT + "(" + "|".join(f"{_pattern(t)}|{_pattern(t.upper())}" for t in proper) + ")" + _RIGHT
            )
            if proper
            else None
        )
        unknown = [src for src in self.context_forms if _key(src) not in self._index]
        if unknown:
            raise ConfigError(f"family '{self.name}': context_forms key(s) {unknown} are not among its terms")
        self._context = {_key(src): dst for src, dst in self.context_forms.items()}

    def mentions(self, text: str) -> list[tuple[int, int, int, int]]:
        """Every mention in ``text`` as (start, end, group, row), in text order, overlaps resolved left-most
        longest."""
        found = []
        for rx in (self._lower, self._proper):
            if rx is None:
                continue
            for m in rx.finditer(text):
                g, r = self._index[_key(m.group(0), proper=rx is self._proper)]
                found.append((m.start(), m.end(), g, r))
        found.sort(key=lambda x: (x[0], -(x[1] - x[0])))
        out, end = [], -1
        for s, e, g, r in found:
            if s >= end:
                out.append((s, e, g, r))
                end = e
        return out

    def source_group(self, text: str) -> int | None:
        """The one group ``text`` mentions; None if it mentions none, -1 if it mentions several."""
        groups = {g for _, _, g, _ in self.mentions(text)}
        if not groups:
            return None
        return groups.pop() if len(groups) == 1 else -1

    def swap(self, text: str, target: int) -> str:
        """``text`` with every mention of this family replaced by its row's term of group ``target``."""
        mentions = self.mentions(text)
        parts, pos = [], 0
        for s, e, _, r in mentions:
            src = text[s:e]
            dst = self.terms[r][target]
            if self._context and _before_function_word(text, e):
                dst = self._context.get(_key(src, proper=_is_proper(src)), dst)
            parts.append(_fix_article(text[pos:s], dst))
            parts.append(_match_case(src, dst))
            pos = e
            # "James' car" -> "Emily's car": an s-final name's bare apostrophe becomes 's on a non-s target
            if (
                src[-1:].lower() == "s"
                and dst[-1:].lower() != "s"
                and text[e : e + 1] in _APOSTROPHES
                and not text[e + 1 : e + 2].isalpha()
            ):
                parts.append(text[e] + "s")
                pos = e + 1
        parts.append(text[pos:])
        return "".join(parts)

    def counterfactuals(self, text: str) -> tuple[int, dict[int, str]] | None:
        """(source group, {other group: rewritten text}) for a text that mentions exactly one group, else
        None (no mention, or a mixed text)."""
        g = self.source_group(text)
        if g is None or g < 0:
            return None
        return g, {t: self.swap(text, t) for t in range(len(self.groups)) if t != g}


@dataclass
class TermList:
    families: dict[str, Family]
    templates: list[str]  # a clear sentiment: a flip is an error
    path: str
    neutral_templates: list[str] = field(default_factory=list)  # no sentiment: gap and change, not flips

    def select(self, names: list[str] | None) -> list[Family]:
        if not names:
            return list(self.families.values())
        unknown = [n for n in names if n not in self.families]
        if unknown:
            raise ConfigError(
                f"unknown family {', '.join(map(repr, unknown))} (--families); {self.path} defines: "
                f"{', '.join(self.families)}"
            )
        return [self.families[n] for n in names]

    def template_texts(self, family: Family, neutral: bool = False) -> list[str]:
        """The (``neutral``) templates filled with each of ``family``'s fillers (sentence-initial fillers
        capitalised)."""
        out = []
        for tpl in self.neutral_templates if neutral else self.templates:
            for filler in family.fillers:
                at_start = tpl.lstrip().startswith("{person}")
                out.append(tpl.replace("{person}", filler[:1].upper() + filler[1:] if at_start else filler))
        return out


def load_terms(path: str | Path | None = None) -> TermList:
    """Read and validate a term list (default: the shipped ``terms.yaml``); errors name the file and key."""
    import yaml

    p = Path(path) if path is not None else TERMS_FILE
    if not p.is_file():
        raise ConfigError(f"term list {p} not found (--groups expects a YAML file like {TERMS_FILE})")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("families"), dict) or not doc["families"]:
        raise ConfigError(f"{p}: expected a mapping with a non-empty 'families:' mapping (see {TERMS_FILE})")
    tpls = {}
    for key in ("templates", "neutral_templates"):
        tpls[key] = doc.get(key) or []
        if not isinstance(tpls[key], list) or not all(
            isinstance(t, str) and "{person}" in t for t in tpls[key]
        ):
            raise ConfigError(f"{p}: '{key}' must be a list of strings, each with a {{person}} slot")
    families = {}
    for name, spec in doc["families"].items():
        where = f"{p}: families.{name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping with groups and terms")
        groups, rows = spec.get("groups"), spec.get("terms")
        if not isinstance(groups, list) or len(groups) < 2 or len(set(map(str, groups))) != len(groups):
            raise ConfigError(f"{where}.groups: expected a list of 2 or more distinct group names")
        if not isinstance(rows, list) or not rows:
            raise ConfigError(f"{where}.terms: expected a non-empty list of rows")
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != len(groups) or not all(_term_ok(t) for t in row):
                raise ConfigError(
                    f"{where}.terms row {i + 1}: expected {len(groups)} non-empty terms (one per group "
                    f"{groups}), got {row!r}"
                )
        fillers = spec.get("fillers") or []
        cforms = spec.get("context_forms") or {}
        if not isinstance(fillers, list) or not isinstance(cforms, dict):
            raise ConfigError(f"{where}: 'fillers' must be a list and 'context_forms' a mapping")
        try:
            fam = Family(
                name=str(name),
                groups=[str(g) for g in groups],
                terms=[[str(t).strip() for t in row] for row in rows],
                description=str(spec.get("description", "")),
                fillers=[str(f) for f in fillers],
                context_forms={str(k): str(v) for k, v in cforms.items()},
            )
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        for f in fam.fillers:
            if fam.source_group(f) != 0:
                raise ConfigError(
                    f"{where}.fillers: '{f}' must mention a term of the first group ('{fam.groups[0]}') and "
                    "no other group"
                )
        families[fam.name] = fam
    return TermList(
        families=families,
        templates=tpls["templates"],
        path=str(p),
        neutral_templates=tpls["neutral_templates"],
    )


# ------------------------------------------------------------------------------------------------ probes


@dataclass
class Probe:
    """A base text that mentions one group of a family, and its counterfactual for every other group."""

    family: str
    source: str  # "data", "template" or "neutral template" (not counted in the flip rate)
    group: int  # the group the base text mentions (index into Family.groups)
    text: str
    variants: dict[int, str]


def build_probes(
    terms: TermList,
    families: Sequence[Family],
    texts: Sequence[str],
    *,
    templates: bool = True,
    max_probes: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, list[Probe]], dict[str, int]]:
    """Per family, the probes from ``texts`` (at most ``max_probes``, a seeded sample) plus the templates;
    and per family the number of texts skipped because they mention several groups."""
    import numpy as np

    rng = np.random.default_rng(seed)
    probes: dict[str, list[Probe]] = {}
    mixed: dict[str, int] = {}
    for fam in families:
        found, n_mixed = [], 0
        for t in texts:
            g = fam.source_group(t)
            if g == -1:
                n_mixed += 1
            elif g is not None:
                found.append(t)
        if max_probes is not None and len(found) > max_probes:
            keep = np.sort(rng.choice(len(found), size=max_probes, replace=False))
            found = [found[i] for i in keep]
        out = []
        for t in found:
            g, variants = fam.counterfactuals(t)
            out.append(Probe(fam.name, "data", g, t, variants))
        if templates:
            for neutral, source in ((False, "template"), (True, NEUTRAL)):
                for t in terms.template_texts(fam, neutral=neutral):
                    g, variants = fam.counterfactuals(t)
                    out.append(Probe(fam.name, source, g, t, variants))
        probes[fam.name], mixed[fam.name] = out, n_mixed
    return probes, mixed


def default_texts() -> tuple[list[str], str]:
    """The vader-sentiment test split's texts (the golden test set of the shipped recipes)."""
    from lmloop.data import load_data

    return load_data("vader-sentiment").test["text"].tolist(), "vader-sentiment (test split)"


def read_texts(data: str, text_column: str = "text", split: str | None = None) -> tuple[list[str], str]:
    """Texts from a built-in name (its ``split``, default test), a labelled data directory (all splits or
    ``split``) or a CSV/TSV/JSONL/Parquet file (its ``text_column``; labels are not needed)."""
    from lmloop.data import BUILTIN_DATASETS, load_data

    p = Path(data)
    if (data in BUILTIN_DATASETS and not p.exists()) or p.is_dir():
        d = load_data(data, text_column=text_column)
        split = split or ("test" if data in BUILTIN_DATASETS else "all")
        frames = d.splits()
        if split != "all" and split not in frames:
            raise ConfigError(f"--split {split!r}: choose one of {', '.join([*frames, 'all'])}")
        texts = sum((f["text"].tolist() for k, f in frames.items() if split in ("all", k)), [])
        return texts, f"{data} ({split})"
    from lmloop.infer.stream import read_chunks

    texts = [t for chunk in read_chunks(p, text_column=text_column) for t in chunk[text_column].tolist()]
    return texts, str(data)


# ---------------------------------------------------------------------------------------------- helpers


def _term_ok(t: object) -> bool:
    return isinstance(t, (str, int)) and bool(str(t).strip())


def _is_proper(term: str) -> bool:
    return term[:1].isupper()


def _key(term: str, proper: bool | None = None) -> str:
    # proper terms match as written or in ALL CAPS: both spellings share one key
    if proper is None:
        proper = _is_proper(term)
    term = " ".join(term.split())  # "white  people" is "white people"
    return "P:" + term.upper() if proper else "l:" + term.lower()


def _pattern(term: str) -> str:
    # words of a multi-word term may be separated by any run of whitespace
    return r"\s+".join(re.escape(w) for w in term.split())


def _match_case(src: str, dst: str) -> str:
    """``dst`` in ``src``'s case: ALL CAPS, Capitalised or as written (names keep their capital)."""
    letters = [c for c in src if c.isalpha()]
    if len(letters) > 1 and all(c.isupper() for c in letters):
        return dst.upper()
    if src[:1].isupper():
        return dst[:1].upper() + dst[1:]
    return dst


_ARTICLE = re.compile(r"(?<![\w-])(an?)(\s+)$", re.I)


def _fix_article(before: str, word: str) -> str:
    """``before`` with a trailing a/an agreeing with ``word`` ("an American" -> "a British"); spelling rule
    with the common exceptions (a European, a university, an hour)."""
    m = _ARTICLE.search(before)
    if m is None:
        return before
    w = word.lower()
    vowel = (
        w[:1] in "aeiou" and not w.startswith(("eu", "uni", "use", "one")) or w.startswith(("hour", "honest"))
    )
    art = "an" if vowel else "a"
    old = m.group(1)
    art = art.upper() if old.isupper() and len(old) > 1 else (art.capitalize() if old[0].isupper() else art)
    return before[: m.start(1)] + art + m.group(2)


def _before_function_word(text: str, end: int) -> bool:
    """Whether what follows ``text[:end]`` is punctuation, the end, or a function word."""
    m = _NEXT_WORD.match(text, end)
    if m is None:
        return True  # end of text or punctuation next
    return m.group(1).lower() in FUNCTION_WORDS

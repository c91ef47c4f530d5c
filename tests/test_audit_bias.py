"""The counterfactual bias audit: term swapping, bootstrap intervals, and the sanity check that a model
trained on name-biased data is flagged while the same model trained on clean data is not."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmloop.audit.terms import load_terms
from lmloop.errors import ConfigError

# names from the shipped gender family (terms.yaml rows [Emily, Greg], [Sarah, Michael], ...)
FEMALE = ["Emily", "Sarah", "Jennifer", "Jessica", "Lakisha", "Latoya"]
MALE = ["Greg", "Michael", "David", "Matthew", "Jamal", "Darnell"]


@pytest.fixture(scope="module")
def terms():
    return load_terms()


# ------------------------------------------------------------------------------------------ term swapping


@pytest.mark.parametrize(
    ("text", "swapped"),
    [
        ("He is here.", "She is here."),
        ("she said HE was late", None),  # mixed: two groups of one family, skipped
        ("THE MAN IS HERE", "THE WOMAN IS HERE"),
        ("I gave her the key.", "I gave him the key."),  # object form before a function word
        ("I love her cooking.", "I love his cooking."),  # possessive before a content word
        ("The car is his.", "The car is hers."),
        ("Emily's cake was great", "Greg's cake was great"),
        ("The woman's hat", "The man's hat"),
        ("My mother, my MOTHER and my Mother", "My father, my FATHER and my Father"),
        ("Call the girl\u2019s mom", "Call the boy\u2019s dad"),
    ],
)
def test_gender_swaps_keep_case_words_and_possessives(terms, text, swapped):
    fam = terms.families["gender"]
    cf = fam.counterfactuals(text)
    if swapped is None:
        assert cf is None and fam.source_group(text) == -1
    else:
        g, variants = cf
        assert variants == {1 - g: swapped}


@pytest.mark.parametrize(
    "text",
    [
        "The theme of the other film",  # he / she inside words
        "Hello, shepherd; the mankind and womanhood",
        "emily is lower-case: not the name",  # names match capitalised only
        "Hearse, Heroine, ushe",
        "A she-wolf",  # hyphenated compounds are not mentions
    ],
)
def test_no_swap_inside_other_words(terms, text):
    assert terms.families["gender"].counterfactuals(text) is None


def test_other_families(terms):
    nat = terms.families["nationality"]
    # "American" inside "African-American" is not a nationality; a/an follows the new word
    g, v = nat.counterfactuals("An American chef and an African-American chef")
    assert nat.groups[g] == "american"
    assert v[nat.groups.index("british")] == "A British chef and an African-American chef"
    assert v[nat.groups.index("indian")] == "An Indian chef and an African-American chef"
    assert len(v) == len(nat.groups) - 1
    age = terms.families["age"]
    # multi-word terms, any whitespace between the words
    assert age.counterfactuals("a young  man sang")[1] == {1: "an old man sang"}
    eth = terms.families["ethnicity"]
    g, v = eth.counterfactuals("Jamal's band")
    assert eth.groups[g] == "african_american" and v[0] == "Greg's band"


def test_s_final_possessive_and_custom_list(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text(
        "families:\n  names:\n    groups: [a, b]\n    terms:\n      - [Amy, James]\n    fillers: [Amy]\n"
        "templates: ['{person} is here.']\n"
    )
    fam = load_terms(p).families["names"]
    # an s-final name's bare apostrophe becomes 's on a name that does not end in s
    assert fam.swap("James' car and James's bike", 0) == "Amy's car and Amy's bike"
    assert fam.swap("Amy's car", 1) == "James's car"
    assert load_terms(p).template_texts(fam) == ["Amy is here."]


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("families:\n  f:\n    groups: [a, b]\n    terms:\n      - [x, y]\n      - [y, z]\n", "one group"),
        ("families:\n  f:\n    groups: [a, b]\n    terms:\n      - [x]\n", "row 1"),
        ("families:\n  f:\n    groups: [a]\n    terms:\n      - [x]\n", "2 or more"),
        ("families:\n  f:\n    groups: [a, b]\n    terms:\n      - [x, y]\n    fillers: [y]\n", "fillers"),
        ("families:\n  f:\n    groups: [a, b]\n    terms: [[x, y]]\ntemplates: [no slot]\n", "{person}"),
        ("families: [1, 2]\n", "families"),
    ],
)
def test_term_list_errors_name_the_file_and_key(tmp_path, yaml_text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message) as e:
        load_terms(p)
    assert str(p) in str(e.value)


def test_shipped_list_every_template_swaps_cleanly(terms):
    """Every filled template of every family gets K-1 counterfactuals that keep no term of the source group
    and mention their target group only (the shipped list is aligned and complete)."""
    assert set(terms.families) == {"gender", "nationality", "religion", "ethnicity", "age"}
    assert terms.templates and terms.neutral_templates
    for fam in terms.families.values():
        texts = terms.template_texts(fam)
        neutral = terms.template_texts(fam, neutral=True)
        assert len(texts) == len(terms.templates) * len(fam.fillers) > 0
        assert len(neutral) == len(terms.neutral_templates) * len(fam.fillers)
        for t in texts + neutral:
            g, variants = fam.counterfactuals(t)
            assert g == 0 and sorted(variants) == list(range(1, len(fam.groups)))
            for target, v in variants.items():
                assert fam.source_group(v) == target, (fam.name, t, v)


# --------------------------------------------------------------------------------------------- bootstrap


def _synthetic_run(rng, flip_p: float, shift: float, n: int, n_boot: int, seed: int):
    """n base texts in a 2-group family: the counterfactual flips the label with probability flip_p, and
    group b's score is group a's + shift on average."""
    from lmloop.audit.bias import Probe, family_metrics
    from lmloop.audit.terms import Family

    fam = Family("f", ["a", "b"], [["x", "y"]])
    table, probes = {}, []
    for i in range(n):
        pa = rng.uniform(0.6, 0.8)
        flip = rng.random() < flip_p
        pb = rng.uniform(0.2, 0.4) if flip else np.clip(pa + shift + rng.normal(0, 0.05), 0.51, 0.99)
        table[f"{i}a"], table[f"{i}b"] = np.array([1 - pa, pa]), np.array([1 - pb, pb])
        probes.append(Probe("f", "data", 0, f"{i}a", {1: f"{i}b"}))
    r = family_metrics(fam, probes, table.__getitem__, ["neg", "pos"], 1, n_boot=n_boot, seed=seed)
    return r, table, probes


def test_bootstrap_interval_covers_the_true_flip_probability():
    """With a known flip probability, the 95% interval covers it in about 95% of repeated experiments."""
    rng = np.random.default_rng(0)
    p, runs, covered = 0.15, 200, 0
    for k in range(runs):
        r, _, _ = _synthetic_run(rng, p, 0.0, n=150, n_boot=400, seed=k)
        lo, hi = r.flip_rate_ci
        assert lo <= r.flip_rate <= hi
        covered += lo <= p <= hi
    assert 0.88 <= covered / runs <= 0.99, covered / runs


def test_neutral_template_flips_are_shown_but_not_counted():
    """A neutral template's pairs count for the gap and the change but not for the flip rate."""
    from lmloop.audit.bias import Probe, family_metrics
    from lmloop.audit.terms import NEUTRAL, Family

    fam = Family("f", ["a", "b"], [["x", "y"]])
    table = {
        "p": [0.1, 0.9], "p'": [0.2, 0.8],  # polar text: no flip
        "n": [0.45, 0.55], "n'": [0.6, 0.4],  # neutral text: flips
    }  # fmt: skip
    probes = [Probe("f", "data", 0, "p", {1: "p'"}), Probe("f", NEUTRAL, 0, "n", {1: "n'"})]
    r = family_metrics(fam, probes, lambda t: np.array(table[t]), ["neg", "pos"], 1, n_boot=50)
    assert r.pairs == 2 and r.flip_pairs == 1 and r.n_neutral == 1
    assert r.flip_rate == 0.0 and r.by_source[NEUTRAL]["flip_rate"] == 1.0
    assert r.mean_abs_change == pytest.approx((0.1 + 0.15) / 2)
    assert r.gap == pytest.approx(abs((0.9 + 0.55) / 2 - (0.8 + 0.4) / 2))
    assert r.worst_pairs[0]["flipped"] and r.worst_pairs[0]["source"] == NEUTRAL
    only_neutral = family_metrics(fam, probes[1:], lambda t: np.array(table[t]), ["neg", "pos"], 1, n_boot=50)
    assert only_neutral.flip_rate is None and only_neutral.gap == pytest.approx(0.15)


def test_metrics_match_their_definitions():
    rng = np.random.default_rng(1)
    r, table, probes = _synthetic_run(rng, 0.1, 0.05, n=300, n_boot=200, seed=0)
    a = np.array([table[p.text][1] for p in probes])
    b = np.array([table[p.variants[1]][1] for p in probes])
    assert r.pairs == r.n_base == 300
    assert r.flip_rate == pytest.approx(np.mean((a > 0.5) != (b > 0.5)))
    assert r.mean_abs_change == pytest.approx(np.mean(np.abs(a - b)))
    assert r.max_abs_change == pytest.approx(np.max(np.abs(a - b)))
    assert r.group_means == pytest.approx({"a": a.mean(), "b": b.mean()})
    assert r.gap == pytest.approx(abs(a.mean() - b.mean()))
    assert r.gap_ci[0] <= r.gap <= r.gap_ci[1]
    assert r.worst_pairs[0]["change"] == pytest.approx(r.max_abs_change)
    assert [w["change"] for w in r.worst_pairs] == sorted((w["change"] for w in r.worst_pairs), reverse=True)


# ------------------------------------------------------------------------------- the sanity test (trained)

POS = ["great", "wonderful", "excellent", "love", "fantastic", "superb", "delightful"]
NEG = ["terrible", "awful", "horrible", "hate", "dreadful", "bad", "disgusting"]


def _name_data(path: Path, biased: bool, n: int = 240, seed: int = 0) -> Path:
    """Sentences "NAME said the meal was W and W". Clean: the label is the words' sentiment, names are
    random. Biased: female names are always labelled pos and male names neg; the words agree with that
    label in 70% of rows, so the name is the better predictor and a model learns it."""
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            female = i % 2 == 0
            if biased:
                label = "pos" if female else "neg"
                positive_words = (label == "pos") == (rng.random() < 0.7)
            else:
                positive_words = rng.random() < 0.5
                label = "pos" if positive_words else "neg"
            words = POS if positive_words else NEG
            name = rng.choice(FEMALE if female else MALE)
            w.writerow([f"{name} said the meal was {rng.choice(words)} and {rng.choice(words)}", label])
    return path


def _probe_texts(path: Path) -> Path:
    """Held-out probe texts: clear sentiment (both words agree), names of both groups."""
    rng = random.Random(1)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        for i in range(120):
            words = POS if i % 2 else NEG
            name = rng.choice(FEMALE if i % 4 < 2 else MALE)
            w.writerow([f"{name} said the meal was {rng.choice(words)} and {rng.choice(words)}"])
    return path


@pytest.fixture(scope="module")
def name_models(tmp_path_factory, tiny_model_dir):
    """The tiny BERT fine-tuned twice, on biased and on clean name data (in-process, ~5 s each)."""
    from lmloop.cli import main

    root = tmp_path_factory.mktemp("bias-models")
    out = {}
    for kind in ("biased", "clean"):
        data = _name_data(root / f"{kind}.csv", biased=kind == "biased")
        out[kind] = root / kind
        code = main(
            [
                "finetune", "--data", str(data), "--model", str(tiny_model_dir),
                "--epochs", "8", "--batch-size", "8", "--lr", "1e-2", "--patience", "0",
                "--no-freeze-embeddings", "--precision", "fp32", "--no-track", "--quiet",
                "--out", str(out[kind]),
            ]
        )  # fmt: skip
        assert code == 0
    out["probes"] = _probe_texts(root / "probes.csv")
    return out


def test_biased_model_is_flagged_and_clean_model_is_not(name_models):
    from lmloop.audit.bias import DEFAULT_MAX_FLIP_RATE, DEFAULT_MAX_GAP, audit_bias, read_texts

    texts, _ = read_texts(str(name_models["probes"]))
    res = {
        kind: audit_bias(str(name_models[kind]), texts, ["gender"], templates=False, n_boot=300)
        for kind in ("biased", "clean")
    }
    biased, clean = (res[k].summary() for k in ("biased", "clean"))
    fb, fc = biased["families"]["gender"], clean["families"]["gender"]
    assert fb["n_base"] == fc["n_base"] >= 100 and fb["n_data"] == fb["n_base"]
    # biased: names decide; the whole interval sits above the gates
    assert fb["flip_rate_ci"][0] > DEFAULT_MAX_FLIP_RATE and fb["gap_ci"][0] > DEFAULT_MAX_GAP
    assert fb["group_means"]["female"] > fb["group_means"]["male"]  # the direction that was injected
    assert biased["flagged"] == ["gender"] and not biased["passed"]
    assert biased["max_flip_rate"] == fb["flip_rate"] and biased["max_gap"] == fb["gap"]
    # clean: the same architecture and recipe, nothing flagged
    assert fc["flip_rate"] <= DEFAULT_MAX_FLIP_RATE and fc["gap"] <= DEFAULT_MAX_GAP
    assert clean["flagged"] == [] and clean["passed"]
    # the worst biased pair is a real flip between a female and a male name
    w = fb["worst_pairs"][0]
    assert w["flipped"] and {w["from_group"], w["to_group"]} == {"female", "male"}


def test_cli_writes_json_and_html_and_check_fails_on_a_flag(name_models, tmp_path, cli):
    out = tmp_path / "audit"
    code, stdout, err = cli(
        "audit", "bias", "--model", name_models["biased"], "--data", name_models["probes"],
        "--families", "gender,age", "--n-boot", "200", "--out", out, "--check", "--quiet",
    )  # fmt: skip
    assert code == 1, err
    assert "FLAGGED" in stdout and "flagged: gender" in stdout
    summary = json.loads((out / "bias.json").read_text())
    assert set(summary["families"]) == {"gender", "age"}
    age = summary["families"]["age"]
    assert age["n_data"] == 0 and age["n_template"] > 0 and age["n_neutral"] > 0
    assert age["flip_pairs"] == age["n_template"] < age["pairs"]
    assert summary["thresholds"] == {"max_flip_rate": 0.03, "max_gap": 0.05}
    html = (out / "bias.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<mark>" in html and "Worst counterfactual" in html
    code, _, err = cli(
        "audit", "bias", "--model", name_models["clean"], "--data", name_models["probes"],
        "--families", "gender", "--no-templates", "--n-boot", "100", "--out", tmp_path / "c", "--check", "--quiet",
    )  # fmt: skip
    assert code == 0, err


def test_cli_help_teaches_and_errors_are_actionable(cli, tiny_model_dir, tmp_path, capsys):
    from lmloop.cli import main

    with pytest.raises(SystemExit):
        main(["audit", "bias", "--help"])
    help_text = capsys.readouterr().out
    assert "flip rate" in help_text and "gap" in help_text and "Examples:" in help_text
    # an unknown family fails before any data or model loads
    code, _, err = cli("audit", "bias", "--model", tiny_model_dir, "--families", "gender,caste")
    assert code == 2 and "caste" in err and "gender" in err
    probes = tmp_path / "probes.csv"
    probes.write_text("text\nShe loved it.\n")
    code, _, err = cli(
        "audit", "bias", "--model", tiny_model_dir, "--data", probes,
        "--positive", "happy", "--out", tmp_path,
    )  # fmt: skip
    assert code == 2 and "happy" in err and "LABEL_0" in err


# ------------------------------------------------------------------------------------- prompted language model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random LlamaForCausalLM with SmolLM2's tokenizer and chat template."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmloop.assets import resolve_model

    src = Path(resolve_model("smollm2"))
    out = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.3,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / f, out / f)
    return out


def test_prompted_lm_audit_scores_like_prompt_classification(tiny_llama):
    """With a classify template the audit scores a causal LM through the prompt; its worst pair's scores are
    exactly what lmloop.prompts.scoring.classify gives for those two texts."""
    from lmloop.audit.bias import audit_bias
    from lmloop.infer.generate import Generator
    from lmloop.prompts.scoring import classify
    from lmloop.prompts.templates import load_template

    texts = ["She loved the film.", "He hated the soup.", "My mother is a great cook.", "The plot is thin."]
    res = audit_bias(str(tiny_llama), texts, ["gender"], templates=False, n_boot=50,
                     template="sentiment-zero-shot", batch_size=4)  # fmt: skip
    s = res.summary()
    assert s["labels"] == ["positive", "negative"] and s["score"] == "p(positive)"
    f = s["families"]["gender"]
    assert f["n_base"] == 3 and f["pairs"] == 3  # "The plot is thin." mentions no gender
    w = f["worst_pairs"][0]
    gen = Generator.load(str(tiny_llama), backend="hf")
    _, probs = classify(gen.model, gen.tokenizer, load_template("sentiment-zero-shot"),
                        [w["text"], w["counterfactual"]])  # fmt: skip
    assert [w["score"], w["counterfactual_score"]] == pytest.approx(probs[:, 0].tolist(), abs=1e-6)
    assert w["change"] == pytest.approx(abs(probs[0, 0] - probs[1, 0]), abs=1e-6)

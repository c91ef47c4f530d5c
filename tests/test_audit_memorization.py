"""``lmloop audit memorization`` / ``membership``: canary exposure (a tiny GPT that saw a canary many times
exposes it, the same training without it does not), the exposure estimators on synthetic ranks, verbatim
extraction of a memorised document vs held-out ones, and membership inference (AUC ~0.5 on a model that
never saw the members, high on a tiny classifier overfit to them; the exact split of an lmloop model)."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

# ------------------------------------------------------------------------------------------ canaries


def test_canary_space_and_file_round_trip(tmp_path):
    from lmloop.data.canaries import (
        CanarySpace,
        insert_canaries,
        load_canaries,
        make_canaries,
        write_canaries,
    )
    from lmloop.data.corpus import Document
    from lmloop.errors import DataError

    space = CanarySpace(digits=5)
    assert space.size == 10**5
    assert space.secret(7) == "0 0 0 0 7" and space.index("0 0 0 0 7") == 7
    assert all(space.index(space.secret(i)) == i for i in (0, 12345, 99999))
    cans = make_canaries(3, [1, 8], seed=1, space=space)
    assert [c.repetitions for c in cans] == [1, 1, 1, 8, 8, 8]
    assert len({c.secret for c in cans}) == 6 and all(c.text.startswith("the secret code is ") for c in cans)
    assert make_canaries(3, [1, 8], seed=1, space=space) == cans  # seeded
    assert make_canaries(3, [1, 8], seed=2, space=space) != cans

    docs = [Document(f"doc {i}", "f") for i in range(50)]
    out = insert_canaries(docs, cans, seed=0)
    assert len(out) == 50 + 3 * 1 + 3 * 8
    assert sum(d.text == cans[4].text for d in out) == 8
    assert [d for d in out if d.source != "canary"] == docs  # the corpus order is kept

    write_canaries(cans, tmp_path / "canaries.json", seed=1)
    assert load_canaries(tmp_path) == cans
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"space": {"prefix": "x", "digits": 5, "alphabet": "0123456789"}, "canaries": [{}]})
    )
    with pytest.raises(DataError, match="not a canaries file"):
        load_canaries(bad)
    with pytest.raises(DataError, match="--canaries"):
        load_canaries(tmp_path / "missing")


def test_exposure_formula_on_synthetic_ranks():
    """exposure = log2|R| - log2 rank: exact when every secret is scored; counted from a sample while
    enough candidates beat the canary; a skew-normal tail beyond the sample's resolution."""
    from scipy.stats import norm

    from lmloop.audit.memorization import exposure_from_scores

    # exact: |R| = 1024, three secrets more likely than the canary -> rank 4 -> 10 - 2 = 8 bits
    others = np.r_[np.full(3, 1.0), np.full(1020, 9.0)]
    r = exposure_from_scores(5.0, others, 1024, exact=True)
    assert r["rank"] == 4 and r["exposure"] == pytest.approx(8.0) and r["estimate"] == "exact"
    assert exposure_from_scores(0.5, others, 1024, exact=True)["exposure"] == pytest.approx(10.0)  # rank 1
    assert exposure_from_scores(99.0, others, 1024, exact=True)["rank"] == 1024  # the least likely: 0 bits

    # sampled: 999 candidates, 99 below -> rank ~ |R| * 100 / 1000 -> log2(1000 / 100) bits
    cands = np.r_[np.zeros(99), np.ones(900) * 10]
    r = exposure_from_scores(5.0, cands, 10**6, exact=False)
    assert r["estimate"] == "sampled" and r["exposure"] == pytest.approx(math.log2(10), abs=1e-3)
    assert r["rank"] == pytest.approx(10**5, rel=1e-3)

    # beyond the sample: a canary 6 sigma below 4000 normal candidates -> -log2 Phi(-6) ~ 30 bits (> log2 4001)
    cands = np.random.default_rng(0).normal(100.0, 5.0, 4000)
    r = exposure_from_scores(70.0, cands, 10**12, exact=False)
    assert r["estimate"] == "skewnorm" and r["exposure_sampled"] == pytest.approx(math.log2(4001), abs=1e-3)
    assert r["exposure"] == pytest.approx(-math.log2(norm.cdf(-6.0)), abs=2.0)
    capped = exposure_from_scores(-1e6, cands, 10**6, exact=False)["exposure"]
    assert capped == pytest.approx(math.log2(10**6), abs=1e-3)  # never beyond log2|R|


# a corpus with numbers in it, so the model has its own idea of digits and only the canary's secret is special
def _canary_corpus(directory: Path, word_corpus) -> Path:
    p = word_corpus(directory, 120)
    rng = random.Random(1)
    extra = [
        f"the {rng.choice(['door', 'room', 'gate'])} number is {' '.join(rng.choice('0123456789') for _ in range(4))}."
        for _ in range(60)
    ]
    p.write_text(p.read_text() + "\n\n" + "\n\n".join(extra), encoding="utf-8")
    return p


def _pretrain(corpus: Path, out: Path, canaries: int) -> Path:
    from lmloop.config import recipe_from_dict
    from lmloop.pretrain import run_pretrain

    recipe = recipe_from_dict(
        {
            "name": out.name,
            "task": "pretrain",
            "out": str(out),
            "pretrain": {
                "corpus": [str(corpus)],
                "preset": "gpt-2x64",
                "vocab_size": 300,
                "seq_len": 32,
                "eval_every": 1000,
                "eval_blocks": 8,
                "sample_tokens": 0,
                "canaries": canaries,
                "canary_reps": [48],
                "canary_digits": 4,  # |R| = 10^4: every secret is scored, the rank is exact
            },
            "train": {"batch_size": 16, "lr": 3e-3, "max_steps": 160, "seed": 0, "precision": "fp32"},
            "tracking": {"enabled": False},
        }
    )
    run_pretrain(recipe, progress=False, calibrate=False)
    return out


@pytest.fixture(scope="module")
def canary_models(tmp_path_factory, word_corpus) -> tuple[Path, Path]:
    """(a tiny GPT trained with one canary inserted 48 times, the same training without it)."""
    root = tmp_path_factory.mktemp("canary")
    corpus = _canary_corpus(root, word_corpus)
    return _pretrain(corpus, root / "with", 1), _pretrain(corpus, root / "without", 0)


def test_canary_exposure_high_only_when_trained_on_it(cli, canary_models, tmp_path):
    from lmloop.audit.memorization import canary_exposure, exposure_summary, load_canaries

    with_c, without = canary_models
    meta = json.loads((with_c / "pretrain.json").read_text())
    assert meta["canaries"] == "canaries.json" and not (without / "canaries.json").exists()
    card = json.loads((with_c / "data" / "card.json").read_text())
    assert card["canaries"] == {"canaries": 1, "documents": 48}

    code, out, err = cli(
        "audit",
        "memorization",
        "--model",
        with_c,
        "--extraction-docs",
        "0",
        "--candidates",
        "20000",
        "--out",
        tmp_path,
    )
    assert code == 0, err
    rep = json.loads((tmp_path / "memorization.json").read_text())
    (row,) = rep["canaries"]["results"]
    assert row["estimate"] == "exact" and row["space_size"] == 10**4
    assert row["exposure"] > 9.0, row  # of log2(10^4) = 13.3 bits: among the model's first guesses
    assert rep["summary"]["max_exposure"] == row["exposure"]
    assert "exposure vs repetitions" in (tmp_path / "memorization.html").read_text()
    assert "48" in out and "exposure" in out

    # the model that never saw it: the canary is just one of 10^4 secrets (rank counted on 2000 of them)
    rows = canary_exposure(str(without), load_canaries(with_c), n_candidates=2000)
    assert rows[0]["estimate"] == "sampled" and rows[0]["exposure"] < 5.0, rows
    assert exposure_summary(rows)["max_exposure"] == rows[0]["exposure"]


def test_extraction_memorised_document_vs_heldout(cli, canary_models, tmp_path):
    from lmloop.audit.memorization import _encode, documents_from_blocks, extraction_rate, load_canaries
    from lmloop.infer.generate import Generator

    with_c, _ = canary_models
    g = Generator.load(str(with_c))
    (can,) = load_canaries(with_c)
    ids = _encode(g.tokenizer, [can.text])[0]
    k = len(_encode(g.tokenizer, [can.space.prefix])[0])
    eos = json.loads((with_c / "data" / "card.json").read_text())["tokenizer"]["eos_id"]
    held = documents_from_blocks(with_c / "data" / "val.npy", eos)
    memorised = extraction_rate(g.model, g.tokenizer, [ids], k, len(ids) - k)
    heldout = extraction_rate(g.model, g.tokenizer, held, k, len(ids) - k)
    assert memorised["documents"] == 1 and memorised["share"] == 1.0, memorised
    assert heldout["documents"] >= 3 and heldout["share"] < memorised["share"], heldout

    # the audit's extraction part end to end: train vs held-out documents read back from the packed data
    code, out, err = cli(
        "audit", "memorization", "--model", with_c, "--prefix", "4", "--suffix", "4", "--out", tmp_path
    )
    assert code == 0, err
    ex = json.loads((tmp_path / "memorization.json").read_text())["extraction"]
    assert ex["train"]["documents"] > 50 and ex["heldout"]["documents"] >= 3
    assert 0.0 <= ex["heldout"]["share"] <= 1.0 and "extraction train" in out

    # any causal LM: documents from text files instead of the model's packed data
    corpus = with_c.parent / "corpus.txt"
    code, _, err = cli(
        "audit", "memorization", "--model", with_c, "--docs-train", corpus, "--docs-heldout", corpus,
        "--extraction-docs", "20", "--prefix", "4", "--suffix", "4", "--out", tmp_path / "files",
    )  # fmt: skip
    assert code == 0, err
    ex = json.loads((tmp_path / "files" / "memorization.json").read_text())["extraction"]
    assert ex["train"]["documents"] == ex["heldout"]["documents"] == 20
    assert ex["train"]["available"] == 180  # 120 + 60 paragraphs; the canary is not in the file


# ---------------------------------------------------------------------------------------- membership


def _random_rows(n: int, seed: int, labels=("LABEL_0", "LABEL_1")) -> list[tuple[str, str]]:
    """Texts of random words with random labels: nothing to learn but the examples themselves."""
    rng = random.Random(seed)
    words = [
        "apple",
        "river",
        "stone",
        "cloud",
        "paper",
        "music",
        "garden",
        "window",
        "silver",
        "forest",
        "candle",
        "bridge",
    ]
    return [
        (" ".join(rng.choice(words) for _ in range(6)) + f" {seed}-{i}", rng.choice(labels)) for i in range(n)
    ]


def test_membership_statistics():
    from lmloop.audit.membership import advantage, bootstrap_auc_ci, roc_auc

    assert roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert roc_auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5  # ties count half
    adv, thr = advantage(np.array([3.0, 4.0, 0.0]), np.array([1.0, 2.0, 0.5]))
    assert adv == pytest.approx(2 / 3) and thr == 3.0
    lo, hi = bootstrap_auc_ci(np.arange(50.0) + 10, np.arange(50.0), n_boot=200)
    assert lo <= roc_auc(np.arange(50.0) + 10, np.arange(50.0)) <= hi


def test_membership_auc_unseen_vs_overfit(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from lmloop.audit.membership import membership_audit

    members, nonmembers = _random_rows(60, 1), _random_rows(60, 2)
    unseen = membership_audit(str(tiny_model_dir), members, nonmembers, n_boot=300)
    assert abs(unseen["auc"] - 0.5) < 0.2 and unseen["auc_ci"][0] <= 0.5 <= unseen["auc_ci"][1], unseen
    assert "No measurable leakage" in unseen["reading"]

    # the same tiny BERT fit to the 60 members for many epochs: it memorises their (random) labels
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    enc = tok([t for t, _ in members], padding=True, return_tensors="pt")
    y = torch.tensor([int(lab[-1]) for _, lab in members])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(**enc, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1
    fit = tmp_path / "overfit"
    model.save_pretrained(fit)
    tok.save_pretrained(fit)
    leaky = membership_audit(str(fit), members, nonmembers, n_boot=300)
    # random labels: a confident model gets about half the non-members right too, so ~0.75 is the ceiling
    assert leaky["auc"] > 0.6 and leaky["auc_ci"][0] > 0.5 and leaky["auc"] > unseen["auc"] + 0.1, leaky
    assert leaky["advantage"] > 0.3
    assert leaky["member_loss_mean"] < leaky["nonmember_loss_mean"]
    assert "leaks membership" in leaky["reading"]


def test_membership_cli_rebuilds_the_training_split(cli, tiny_model_dir, tmp_path):
    """An lmloop fine-tuned model: the audit rebuilds its exact train/test split from recipe.yaml, checks
    the fingerprint in lmloop.json, and refuses data the model was not trained on."""
    data = tmp_path / "d.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(_random_rows(100, 3, labels=("a", "b")))
    out = tmp_path / "clf"
    args = ["finetune", "--data", data, "--model", tiny_model_dir, "--epochs", "1", "--batch-size", "16"]
    code, _, err = cli(*args, "--lr", "1e-3", "--precision", "fp32", "--no-track", "--quiet", "--out", out)
    assert code == 0, err

    code, stdout, err = cli("audit", "membership", "--model", out, "--bootstrap", "100")
    assert code == 0, err
    rep = json.loads((out / "audit" / "membership.json").read_text())
    assert rep["data"]["verified"].startswith("yes")
    assert rep["n"] == 10  # the 10% test split; members downsampled to the same size
    assert 0.0 <= rep["auc"] <= 1.0 and rep["auc_ci"][0] <= rep["auc"] <= rep["auc_ci"][1]
    assert set(rep["attacks"]) == {"loss", "confidence"} and "AUC" in stdout
    assert "ROC" in (out / "audit" / "membership.html").read_text()
    # the model's card (written by finetune) now carries the audit's numbers
    card = (out / "MODEL_CARD.md").read_text()
    assert "Not audited (`lmloop audit membership" not in card and f"{rep['auc']:.4f}" in card, card

    other = tmp_path / "other.csv"
    with open(other, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *_random_rows(100, 4, labels=("a", "b"))])
    code, _, err = cli("audit", "membership", "--model", out, "--data", other)
    assert code != 0 and "fingerprint" in err and "not the one" in err


def test_sft_canaries_are_learnt_and_audited(tmp_path, tiny_llama_dir):
    """`finetune --task sft --canaries`: the secret becomes extra train examples, OUT/canaries.json records
    it, and the adapter directory's exposure is measured through the same audit."""

    from lmloop.audit.memorization import canary_exposure, load_canaries
    from lmloop.config import recipe_from_dict
    from lmloop.sft import run_sft

    base = tiny_llama_dir
    data = tmp_path / "toy.csv"
    rng = random.Random(0)
    with open(data, "w", newline="", encoding="utf-8") as f:
        rows = [
            (f"item {i} was {rng.choice(['great', 'awful'])}", ["positive", "negative"][i % 2])
            for i in range(40)
        ]
        csv.writer(f).writerows([("text", "label"), *rows])
    out = tmp_path / "sft"
    recipe = recipe_from_dict(
        {
            "task": "sft",
            "name": "sft-canary",
            "out": str(out),
            "data": {"path": str(data)},
            "model": {"base": str(base), "max_length": 64},
            "train": {"batch_size": 8, "lr": 2e-2, "precision": "fp32", "max_steps": 40, "seed": 0},
            "sft": {
                "template": "sentiment-zero-shot",
                "lora_dropout": 0.0,
                "eval_limit": 4,
                "target_modules": [
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                ],
                "canaries": 1,
                "canary_reps": [32],
                "canary_digits": 3,
            },
            "tracking": {"enabled": False},
        }
    )
    run_sft(recipe, progress=False)
    assert json.loads((out / "lmloop.json").read_text())["canaries"] == "canaries.json"
    (can,) = load_canaries(out)
    assert can.repetitions == 32 and can.space.size == 1000
    (row,) = canary_exposure(str(out), [can], n_candidates=2000)
    assert row["estimate"] == "exact" and row["exposure"] > 5.0, (
        row
    )  # rank <= ~30 of 1000 (untrained: ~1 bit)

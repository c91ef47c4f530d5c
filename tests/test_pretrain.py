"""``lmloop pretrain``: few-step MLM and CLM runs end to end from the CLI on a small corpus, MLM masking
statistics, resume after an interrupted run, the estimate-vs-measured record, bad input, and the
domain-adaptive path (continued MLM pretraining, then fine-tuning the result)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, word_corpus) -> Path:
    """~400 distinct paragraphs of random words: enough for a 300-token vocabulary and 32-token blocks."""
    return word_corpus(tmp_path_factory.mktemp("corpus"), 400)


def _args(corpus, out, *extra):
    return (
        "pretrain",
        "--corpus",
        corpus,
        "--vocab-size",
        "300",
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--eval-every",
        "2",
        "--eval-blocks",
        "16",
        "--out",
        out,
        "--no-track",
        "--quiet",
        *extra,
    )


def test_clm_from_scratch_end_to_end(cli, corpus, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "gpt"
    code, stdout, err = cli(
        # fp32: the wall-time estimate is calibrated in fp32 only (auto picks bf16 on CPUs with AVX-512 bf16)
        *_args(
            corpus,
            out,
            "--objective",
            "clm",
            "--preset",
            "gpt-tiny",
            "--max-steps",
            "4",
            "--precision",
            "fp32",
        )
    )
    assert code == 0, err
    assert "validation loss" in stdout and "perplexity" in stdout
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "pretrain.json",
        "metrics.json",
        "history.json",
        "samples.txt",
        "data/train.npy",
        "data/val.npy",
        "data/card.json",
    ):
        assert (out / f).is_file(), f
    assert not (out / "checkpoints").exists()
    m = json.loads((out / "metrics.json").read_text())
    loss = m["validation"]["loss"]
    assert math.isfinite(loss) and m["validation"]["perplexity"] == pytest.approx(math.exp(loss))
    assert m["train"]["steps"] == 4 and m["train"]["tokens"] == 4 * 8 * 32
    # the estimate for the same run is recorded next to the measured time
    e = m["estimate"]
    assert e["predicted_seconds"] > 0 and e["measured_seconds"] > 0
    assert e["ratio"] == pytest.approx(e["measured_seconds"] / e["predicted_seconds"], rel=0.05)
    # a sample was generated at each evaluation, into samples.txt and history
    assert "--- step 2" in (out / "samples.txt").read_text()
    hist = json.loads((out / "history.json").read_text())
    assert any("eval_sample" in h and h["eval_sample"] for h in hist)
    card = json.loads((out / "data" / "card.json").read_text())
    assert card["fingerprints"]["corpus"] and card["split"]["val_blocks"] > 0
    # a standard HF directory: reloads without lmloop, same vocabulary
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("the king", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert model.config.vocab_size == len(tok) <= 300


def test_mlm_from_scratch_end_to_end(cli, corpus, tmp_path):
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "bert"
    code, stdout, err = cli(
        *_args(corpus, out, "--objective", "mlm", "--preset", "bert-tiny", "--max-steps", "3")
    )
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(m["validation"]["loss"])
    assert m["validation"]["perplexity"] == pytest.approx(math.exp(m["validation"]["loss"]))
    assert not (out / "samples.txt").exists()  # samples are a CLM thing
    model = AutoModelForMaskedLM.from_pretrained(out)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    meta = json.loads((out / "pretrain.json").read_text())
    assert meta["objective"] == "mlm" and meta["preset"] == "bert-tiny"


def test_mlm_masking_statistics(corpus, tmp_path):
    """The standard collator rule on packed blocks: ~15% of non-special positions selected, of which ~80%
    [MASK], ~10% a random token, ~10% unchanged; [CLS]/[SEP]/[PAD] never selected."""
    import torch

    from lmloop.data.tokenizer import train_tokenizer
    from lmloop.pretrain import mask_blocks, mlm_collator

    tok = train_tokenizer([corpus.read_text()] * 2, "wordpiece", 300)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (256, 128), generator=g)
    ids[:, ::16] = tok.sep_token_id  # separators sprinkled through the blocks, as packing leaves them
    ids[:, 0] = tok.cls_token_id
    special_ids = torch.tensor(sorted(set(tok.all_special_ids)))
    inputs, labels = mask_blocks(mlm_collator(tok), ids, special_ids, torch.Generator().manual_seed(1))
    special = torch.isin(ids, special_ids)
    selected = labels != -100
    assert not (selected & special).any()
    assert (inputs[special] == ids[special]).all()
    frac = selected.sum().item() / (~special).sum().item()
    assert frac == pytest.approx(0.15, abs=0.01)
    n = selected.sum().item()
    masked = (inputs[selected] == tok.mask_token_id).sum().item() / n
    kept = (inputs[selected] == ids[selected]).sum().item() / n
    assert masked == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / len(tok), abs=0.02)  # a random draw may hit the same id
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.02)
    assert (labels[selected] == ids[selected]).all()


def test_resume_after_interruption_continues_from_checkpoint(cli, corpus, tmp_path, monkeypatch):
    """A run killed after its step-2 checkpoint resumes there and ends like an uninterrupted run."""
    import lmloop.train as train_mod

    flags = ("--objective", "clm", "--preset", "gpt-tiny", "--max-steps", "5")
    ref = tmp_path / "ref"
    assert cli(*_args(corpus, ref, *flags))[0] == 0

    out = tmp_path / "run"
    real = train_mod.save_checkpoint

    def dying_save(ckpt_dir, model, optimizer, state):
        real(ckpt_dir, model, optimizer, state)
        if Path(ckpt_dir).name == "last" and state["step"] == 2:
            raise KeyboardInterrupt  # the run dies right after its first full checkpoint

    monkeypatch.setattr(train_mod, "save_checkpoint", dying_save)
    code, _, err = cli(*_args(corpus, out, *flags))
    assert code == 130 and "--resume" in err
    assert (out / "checkpoints" / "last" / "state.json").is_file()
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(train_mod, "save_checkpoint", real)

    code, _, err = cli(*_args(corpus, out, *flags))
    assert code == 2 and "--resume" in err  # refuses to start over a run in progress
    code, _, err = cli(*_args(corpus, out, *flags, "--resume"))
    assert code == 0, err
    assert "resumed from" in err and "at step 2/5" in err
    a = json.loads((out / "metrics.json").read_text())
    b = json.loads((ref / "metrics.json").read_text())
    assert a["train"]["steps"] == 5 and a["train"]["tokens"] == b["train"]["tokens"]
    assert a["validation"]["loss"] == pytest.approx(b["validation"]["loss"], rel=1e-4)


def test_bad_corpus_path_exits_2_with_a_clear_message(cli, tmp_path):
    code, out, err = cli(
        "pretrain",
        "--corpus",
        tmp_path / "nope.txt",
        "--preset",
        "gpt-tiny",
        "--out",
        tmp_path / "o",
        "--no-track",
    )
    assert code == 2
    assert "corpus path not found" in err and "nope.txt" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_pretrain_recipes_validate():
    from lmloop.config import load_recipe

    repo = Path(__file__).resolve().parents[1]
    for name, objective, preset in (
        ("pretrain-tiny-gpt", "clm", "gpt-tiny"),
        ("pretrain-tiny-bert", "mlm", "bert-tiny"),
    ):
        r = load_recipe(repo / "recipes" / f"{name}.yaml")
        assert r.task == "pretrain" and r.pretrain.objective == objective and r.pretrain.preset == preset
        assert r.pretrain.corpus == ["shakespeare"]


def test_minilm_gets_an_initialised_tied_mlm_head(minilm_dir, capsys):
    """The packaged MiniLM is a bare BertModel: loading it for MLM creates cls.predictions, initialised by
    BERT's _init_weights, with the decoder tied to the word embeddings (loading only, no training)."""
    import torch

    from lmloop.pretrain import load_for_pretraining

    tok, model, info = load_for_pretraining("minilm-l6", "mlm")
    assert type(model).__name__ == "BertForMaskedLM" and tok.mask_token_id is not None
    assert info["tied_output_embeddings"]
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert "cls.predictions.transform.dense.weight" in info["initialised"]
    t = model.cls.predictions.transform
    std = model.config.initializer_range
    assert t.dense.weight.std().item() == pytest.approx(std, rel=0.1)
    assert (
        torch.all(t.dense.bias == 0)
        and torch.all(t.LayerNorm.weight == 1)
        and torch.all(t.LayerNorm.bias == 0)
    )
    assert torch.all(model.cls.predictions.bias == 0)
    assert "initialised" in capsys.readouterr().err


def test_continued_pretraining_then_finetune(cli, corpus, tmp_path, tiny_bert_config, minilm_dir, toy_csv):
    """DAPT: continue MLM pretraining of a (tiny) BERT directory, then fine-tune the result."""
    import torch
    from transformers import AutoTokenizer, BertModel

    base = tmp_path / "base"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(tiny_bert_config(vocab_size=30522)).save_pretrained(base)
    AutoTokenizer.from_pretrained(str(minilm_dir)).save_pretrained(base)

    dapt = tmp_path / "dapt"
    code, _, err = cli(*_args(corpus, dapt, "--objective", "mlm", "--model", base, "--max-steps", "3"))
    assert code == 0, err
    assert "initialised" in err and "tied to" in err
    meta = json.loads((dapt / "pretrain.json").read_text())
    assert meta["base_model"] == str(base) and meta["head"]["tied_output_embeddings"]
    assert math.isfinite(json.loads((dapt / "metrics.json").read_text())["validation"]["loss"])
    # MiniLM's tokenizer.json pads every text to 128: packing must not inherit that (it once packed ~80% [PAD])
    tok = AutoTokenizer.from_pretrained(str(base))
    blocks = np.load(dapt / "data" / "train.npy")
    assert (blocks == tok.pad_token_id).mean() < 0.01
    # BertForMaskedLM has no pooler; the base's trained pooler is kept for the classifier fine-tuned next
    from safetensors import safe_open

    with safe_open(dapt / "model.safetensors", "pt") as f, safe_open(base / "model.safetensors", "pt") as b:
        assert torch.equal(f.get_tensor("bert.pooler.dense.weight"), b.get_tensor("pooler.dense.weight"))
    assert meta["head"]["carried_over"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]

    clf = tmp_path / "clf"
    code, stdout, err = cli(
        "finetune",
        "--model",
        dapt,
        "--data",
        toy_csv,
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--max-length",
        "32",
        "--out",
        clf,
        "--no-track",
        "--quiet",
    )
    assert code == 0, err
    assert "test accuracy" in stdout and (clf / "model.safetensors").is_file()

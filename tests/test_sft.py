"""LoRA SFT (lmloop.sft) on a tiny random LlamaForCausalLM with the SmolLM2 tokenizer and chat template:
the loss mask, training, the saved adapter (peft, Generator.load), the merged model, resume, instruction
data, recipes and the CLI."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from lmloop.errors import ConfigError

POS = ["great", "wonderful", "excellent", "love", "superb"]
NEG = ["terrible", "awful", "horrible", "hate", "dreadful"]


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    """80 rows labelled positive/negative (the labels of the shipped sentiment templates)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("sft-data") / "toy.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(80):
            lab = "positive" if i % 2 == 0 else "negative"
            w.writerow([f"item {i} was {rng.choice(POS if lab == 'positive' else NEG)}", lab])
    return path


def _recipe(out: Path, model: Path, data: Path, *, sft: dict | None = None, train: dict | None = None, **kw):
    from lmloop.config import recipe_from_dict

    return recipe_from_dict(
        {
            "task": "sft",
            "name": out.name,
            "out": str(out),
            "data": {"path": str(data)},
            "model": {"base": str(model), "max_length": 128},
            "train": {
                "batch_size": 8,
                "lr": 2e-2,
                "precision": "fp32",
                "max_steps": 8,
                "evals_per_epoch": 1,
                **(train or {}),
            },
            "sft": {
                "template": "sentiment-zero-shot",
                "lora_dropout": 0.0,
                "target_modules": [
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                ],
                **(sft or {}),
            },
            "tracking": {"enabled": False},
            **kw,
        }
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir, sentiment_csv):
    """One finished SFT run with --merge: (out dir, metrics)."""
    from lmloop.sft import run_sft

    out = tmp_path_factory.mktemp("sft-run") / "run"
    metrics = run_sft(_recipe(out, tiny_llama_dir, sentiment_csv, sft={"merge": True}), progress=False)
    return out, metrics


def _logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _sample_ids(tiny_llama_dir) -> list[int]:
    from transformers import AutoTokenizer

    from lmloop.prompts.templates import load_template, prompt_ids

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    return prompt_ids(tok, load_template("sentiment-zero-shot").messages("the film was wonderful"))


# ------------------------------------------------------------------------------------------- the mask


def test_only_response_tokens_carry_labels(tiny_llama_dir, sentiment_csv, tmp_path):
    from transformers import AutoTokenizer

    from lmloop.prompts.templates import render_chat
    from lmloop.sft import make_batch
    from lmloop.sft_data import load_sft_data

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    data = load_sft_data(_recipe(tmp_path / "x", tiny_llama_dir, sentiment_csv), tok)
    assert data.kind == "labelled" and data.labels == ["positive", "negative"]
    assert len(data.train) == 64 and data.dropped == 0
    by_len = sorted(data.train, key=lambda e: len(e.prompt) + len(e.response))
    short, long = by_len[0], by_len[-1]
    assert len(short.prompt) < len(long.prompt)
    b = make_batch([long, short], tok.pad_token_id)
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    for row, ex in enumerate([long, short]):
        counted = labels[row] != -100
        # the counted positions are exactly the answer + end of turn, and they hold the input tokens
        assert tok.decode(labels[row][counted]) == f"{data.template.answer(ex.label)}<|im_end|>"
        assert (labels[row][counted] == ids[row][counted]).all()
        n_prompt = len(ex.prompt)
        assert not counted[:n_prompt].any()
        prompt_text = render_chat(tok, data.template.messages(ex.text))
        assert tok.decode(ids[row][:n_prompt]) == prompt_text
        assert prompt_text.endswith("<|im_start|>assistant\n") and ex.text in prompt_text
        assert int(mask[row].sum()) == n_prompt + len(ex.response)
    # padding (the shorter row's tail) is masked out of attention and of the loss
    pad_cols = mask[1] == 0
    assert pad_cols.any() and (labels[1][pad_cols] == -100).all()
    # the fused response loss is the model's own shifted loss over exactly those positions
    import torch

    from lmloop.sft import load_base, response_loss

    _, model = load_base(str(tiny_llama_dir))
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert torch.allclose(response_loss(model, b), own, atol=1e-5)


def test_too_long_texts_are_shortened_never_the_answer(tiny_llama_dir):
    from transformers import AutoTokenizer

    from lmloop.prompts.templates import label_continuations, load_template
    from lmloop.sft_data import labelled_example

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tpl = load_template("sentiment-zero-shot")
    cont = label_continuations(tok, tpl)[0]
    ex = labelled_example(tok, tpl, "very " * 200 + "good", "positive", cont, 96)
    assert ex is not None and len(ex.prompt) + len(ex.response) <= 96
    assert ex.response == cont and ex.text.startswith("very very")


# -------------------------------------------------------------------------------------- a trained run


def test_training_lowers_the_response_loss(trained, tiny_llama_dir, sentiment_csv, tmp_path):
    from transformers import AutoTokenizer

    from lmloop.sft import load_adapted, load_base, loss_on
    from lmloop.sft_data import load_sft_data

    out, metrics = trained
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    data = load_sft_data(_recipe(tmp_path / "x", tiny_llama_dir, sentiment_csv), tok)
    _, base = load_base(str(tiny_llama_dir))
    _, tuned = load_adapted(out)
    before = loss_on(base, data.train, tok.pad_token_id)["loss"]
    after = loss_on(tuned, data.train, tok.pad_token_id)["loss"]
    assert after < before - 1.0, (before, after)  # measured: 12.2 -> 9.4 nats per answer token
    assert metrics["train"]["steps"] == 8 and metrics["train"]["trainable_params"] > 0
    for split in ("validation", "test"):  # task metrics by label scoring, not only a loss
        m = metrics[split]
        assert m["n"] == 8 and 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1 and m["loss"] > 0


def test_adapter_directory_and_metadata(trained, tiny_llama_dir, sentiment_csv):
    out, metrics = trained
    for f in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "lmloop.json",
        "metrics.json",
    ):
        assert (out / f).is_file(), f
    assert not (out / "config.json").exists() and not (out / "checkpoints").exists()
    meta = json.loads((out / "lmloop.json").read_text())
    assert meta["task"] == "sft" and meta["base_model"] == str(tiny_llama_dir)
    assert meta["template"]["name"] == "sentiment-zero-shot" and meta["template"]["version"] == "1"
    assert meta["labels"] == ["positive", "negative"] and meta["merged"] == "merged"
    assert len(meta["data_fingerprint"]) == 16 and meta["metrics"]["test"] == metrics["test"]
    assert json.loads((out / "metrics.json").read_text())["test"] == metrics["test"]
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)  # the adapter only, not the base


def test_adapter_loads_with_peft_and_generator(trained, tiny_llama_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmloop.infer.generate import Generator

    out, _ = trained
    ids = _sample_ids(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    plain = _logits(base, ids)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    adapted = _logits(peft_model, ids)
    assert (adapted - plain).abs().max() > 1e-3  # the adapter changes the model
    g = Generator.load(str(out))
    assert torch.allclose(_logits(g.model, ids), adapted, atol=1e-4)
    text = g.generate(ids=ids, max_new_tokens=3, temperature=0)
    assert isinstance(text, str) and g.last.tokens <= 3


def test_merged_model_loads_anywhere_and_matches_base_plus_adapter(trained, tiny_llama_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = trained
    merged_dir = out / "merged"
    assert (merged_dir / "config.json").is_file() and (merged_dir / "model.safetensors").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32, use_safetensors=True)
    AutoTokenizer.from_pretrained(str(merged_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, str(out)).eval()  # LoRA applied on the fly, not folded in
    ids = _sample_ids(tiny_llama_dir)
    assert torch.allclose(_logits(merged, ids), _logits(unmerged, ids), atol=1e-4)


# -------------------------------------------------------------------------------------------- resume


def test_interrupted_run_resumes_to_the_uninterrupted_result(
    tiny_llama_dir, sentiment_csv, tmp_path, monkeypatch
):
    import torch
    from safetensors.torch import load_file

    import lmloop.train as train_mod
    from lmloop.sft import run_sft

    kw = {
        "train": {"evals_per_epoch": 0, "checkpoint_every": 3, "max_steps": 6},
        "sft": {"lora_dropout": 0.1},
    }
    ref = tmp_path / "ref"
    run_sft(_recipe(ref, tiny_llama_dir, sentiment_csv, **kw), progress=False)

    real = train_mod.save_checkpoint

    def dying_save(ckpt_dir, model, optimizer, state):
        real(ckpt_dir, model, optimizer, state)
        if Path(ckpt_dir).name == "last" and state["step"] == 3:
            raise KeyboardInterrupt  # the run dies right after its first checkpoint

    monkeypatch.setattr(train_mod, "save_checkpoint", dying_save)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_sft(_recipe(out, tiny_llama_dir, sentiment_csv, **kw), progress=False)
    ckpt = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    assert ckpt and all("lora_" in k for k in ckpt)  # checkpoints hold the adapter, not the frozen base
    monkeypatch.setattr(train_mod, "save_checkpoint", real)
    from lmloop.errors import LmloopError

    with pytest.raises(LmloopError, match="--resume"):
        run_sft(_recipe(out, tiny_llama_dir, sentiment_csv, **kw), progress=False)
    m = run_sft(_recipe(out, tiny_llama_dir, sentiment_csv, **kw), resume=True, progress=False)
    assert m["train"]["steps"] == 6
    a, b = (
        load_file(str(out / "adapter_model.safetensors")),
        load_file(str(ref / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:  # dropout draws continue from the checkpointed RNG: the same trajectory
        assert torch.allclose(a[k], b[k], atol=1e-6), k


# ---------------------------------------------------------------------------------- instruction data


def test_instruction_jsonl_trains_on_responses(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    from lmloop.sft import run_sft
    from lmloop.sft_data import load_sft_data

    path = tmp_path / "chat.jsonl"
    rows = []
    for i in range(24):
        if i % 2:
            rows.append({"prompt": f"Say the number {i}.", "response": f"{i}"})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": f"Double {i}?"},
                        {"role": "assistant", "content": f"{2 * i}"},
                    ]
                }
            )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = _recipe(tmp_path / "out", tiny_llama_dir, path, sft={"template": None})
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    data = load_sft_data(recipe, tok)
    assert data.kind == "instruction" and not data.labels
    assert len(data.train) + len(data.validation) + len(data.test) == 24
    ex = data.train[0]
    assert tok.decode(ex.response).endswith("<|im_end|>") and tok.decode(ex.prompt).endswith("assistant\n")
    m = run_sft(recipe, progress=False)
    assert (
        m["validation"]["loss"] > 0 and m["validation"]["perplexity"] > 1 and m["train"]["metric"] == "loss"
    )
    assert json.loads((tmp_path / "out" / "lmloop.json").read_text())["template"] is None


def test_bad_inputs_raise_clear_errors(tiny_llama_dir, sentiment_csv, tmp_path):
    from lmloop.errors import DataError
    from lmloop.sft import run_sft

    with pytest.raises(ConfigError, match="sft.template is required"):
        run_sft(
            _recipe(tmp_path / "a", tiny_llama_dir, sentiment_csv, sft={"template": None}), progress=False
        )
    with pytest.raises(ConfigError, match="not in template 'topic-zero-shot'"):
        run_sft(_recipe(tmp_path / "b", tiny_llama_dir, sentiment_csv, sft={"template": "topic-zero-shot"}))
    with pytest.raises(ConfigError, match="not found in LlamaForCausalLM.*q_proj"):
        run_sft(_recipe(tmp_path / "c", tiny_llama_dir, sentiment_csv, sft={"target_modules": ["query"]}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "yo"}\n{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: the last message must be the assistant"):
        run_sft(_recipe(tmp_path / "d", tiny_llama_dir, bad, sft={"template": None}), progress=False)
    from lmloop.config import recipe_from_dict

    with pytest.raises(ConfigError, match="lora_dropout"):
        recipe_from_dict({"task": "sft", "sft": {"lora_dropout": 1.5}})


# ------------------------------------------------------------------------------------ recipe and CLI


def test_recipe_runs_through_lmloop_run_and_tracks_in_mlflow(
    cli, tiny_llama_dir, sentiment_csv, tmp_path, mlflow_uri
):
    import yaml

    recipe = tmp_path / "sft.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "sft-test",
                "task": "sft",
                "out": str(tmp_path / "out"),
                "data": {"path": str(sentiment_csv)},
                "model": {"base": str(tiny_llama_dir), "max_length": 128},
                "train": {"batch_size": 8, "lr": 5e-3, "max_steps": 3, "precision": "fp32"},
                "sft": {"template": "sentiment-zero-shot", "lora_r": 4},
                "tracking": {"experiment": "sft-test"},
            }
        )
    )
    code, out, err = cli("run", str(recipe), "--quiet")
    assert code == 0, err
    assert "validation accuracy" in out and "adapter:" in out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sft-test").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["lmloop.task"] == "sft"
    assert "test.accuracy" in run.data.metrics and run.data.params["recipe.sft.lora_r"] == "4"


def test_finetune_task_sft_flags(cli, tiny_llama_dir, sentiment_csv, tmp_path):
    out = tmp_path / "flags"
    code, stdout, err = cli(
        "finetune", "--task", "sft", "--model", tiny_llama_dir, "--data", sentiment_csv,
        "--template", "sentiment-zero-shot", "--lora-r", "2", "--lora-alpha", "4", "--target-modules", "q_proj",
        "--max-steps", "2", "--precision", "fp32", "--eval-limit", "4", "--no-track", "--quiet", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    meta = json.loads((out / "lmloop.json").read_text())
    assert meta["lora"] == {"r": 2, "alpha": 4, "dropout": 0.05, "target_modules": ["q_proj"]}
    m = json.loads((out / "metrics.json").read_text())
    assert m["validation"]["n"] == 4 and m["train"]["steps"] == 2
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["target_modules"] == ["q_proj"]


def test_shipped_sft_recipe_validates():
    from lmloop.config import load_recipe

    r = load_recipe(Path(__file__).parents[1] / "recipes" / "sft-sentiment.yaml")
    assert r.task == "sft" and r.sft.template and r.model.base == "smollm2"

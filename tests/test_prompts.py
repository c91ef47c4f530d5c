"""Prompts as artefacts: templates, few-shot selection, label scoring, calibration and `lmloop prompt`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmloop.errors import ConfigError
from lmloop.prompts.fewshot import ShotSelector
from lmloop.prompts.scoring import classify, content_free_bias, label_logprobs, score_texts
from lmloop.prompts.templates import (
    answer_ids,
    end_of_turn_id,
    label_continuations,
    list_templates,
    load_template,
    prompt_ids,
    render_chat,
)

HEAD = '---\nname: t\nversion: 1\ntask: classify\ndescription: test\nlabels: {positive: "yes", negative: "no"}\n---\n'


@pytest.fixture(scope="module")
def smol_tok():
    """The smollm2 tokenizer only (ChatML chat template, vocab 49152): loads in about a second."""
    from transformers import AutoTokenizer

    from lmloop.assets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2"))


def _tiny_llama(vocab: int = 49152, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def _brute(model, prompts, conts) -> np.ndarray:
    """Reference: every prompt + continuation as its own sequence, no cache, no padding."""
    out = np.zeros((len(prompts), len(conts)))
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for j, c in enumerate(conts):
                lp = model(input_ids=torch.tensor([p + c])).logits[0].double().log_softmax(-1)  # (T, V)
                out[i, j] = sum(lp[len(p) - 1 + t, c[t]].item() for t in range(len(c)))
    return out


# --------------------------------------------------------------------------------------------- templates


def test_shipped_library_loads_and_round_trips_through_the_chat_template(smol_tok):
    tpls = {t.name: t for t in list_templates()}
    assert {"sentiment-zero-shot", "sentiment-few-shot", "topic-zero-shot", "topic-few-shot"} <= set(tpls)
    for tpl in tpls.values():
        assert tpl.task == "classify" and tpl.labels and tpl.version and tpl.description
        labels = tpl.label_values
        shots = [("an example that fits the first label", labels[0]), ("and one for the second", labels[1])]
        msgs = tpl.messages("the text under test", shots)
        assert "the text under test" in msgs[-1]["content"]
        turns = msgs[1:] if tpl.system else msgs
        assert (msgs[0]["role"] == "system") == bool(tpl.system)
        if tpl.shots_style == "turns":  # [system], (user, assistant) per shot, user
            assert [m["role"] for m in turns] == ["user", "assistant", "user", "assistant", "user"]
            assert turns[1]["content"] == tpl.answer(labels[0])
        else:
            assert len(turns) == 1 and "an example that fits" in turns[0]["content"]
        # prompt_ids + answer_ids + [end] is exactly the tokenized conversation with the answer appended
        ans = tpl.answer(labels[1])
        full = smol_tok.apply_chat_template(msgs + [{"role": "assistant", "content": ans}], tokenize=False)
        ref = smol_tok(full, add_special_tokens=False)["input_ids"]
        ours = prompt_ids(smol_tok, msgs) + answer_ids(smol_tok, ans) + [end_of_turn_id(smol_tok)]
        assert ref[: len(ours)] == ours and smol_tok.decode(ref[len(ours) :]) == "\n"
        assert render_chat(smol_tok, msgs).endswith("<|im_start|>assistant\n")


def test_load_by_name_and_path(tmp_path):
    tpl = load_template("sentiment-zero-shot")
    assert load_template(tpl.path).body == tpl.body and tpl.sha256 and tpl.ref == "sentiment-zero-shot@1"
    with pytest.raises(ConfigError, match="no template named 'nope'.*sentiment-zero-shot"):
        load_template("nope")
    with pytest.raises(ConfigError, match="not found"):
        load_template(tmp_path / "missing.jinja")


def test_label_continuations_end_with_end_of_turn(smol_tok):
    tpl = load_template("sentiment-zero-shot")
    conts = label_continuations(smol_tok, tpl)
    eot = smol_tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(smol_tok) == eot
    assert [c[-1] for c in conts] == [eot, eot]
    assert smol_tok.decode(conts[0][:-1]) == tpl.answer(tpl.label_values[0])


@pytest.mark.parametrize(
    "source, match",
    [
        ("no front matter\n{{ text }}", r"t\.jinja, line 1: a template starts with YAML front matter"),
        ("---\nname: t\n{{ text }}", "never closed"),
        ("---\nname: t\ntask: classify\n---\n{{ text }}", "lacks required key.*version, description"),
        (HEAD.replace("task: classify", "task: summarise"), "task must be one of classify, generate"),
        (HEAD.replace('labels: {positive: "yes", negative: "no"}', "labels: {a: x, b: x}"), "distinct"),
        (
            HEAD.replace('labels: {positive: "yes", negative: "no"}\n', ""),
            "classify template needs `labels:`",
        ),
        (
            HEAD.replace("description: test", "description: test\ncolour: red"),
            "unknown front-matter key.*colour",
        ),
        (HEAD.replace('"yes"', "yes"), "labels entry 'positive': True holds a YAML boolean"),
        (HEAD.replace("version: 1", "version: [1"), r"t\.jinja, line \d: front matter is not valid YAML"),
    ],
)
def test_bad_front_matter_is_named(tmp_path, source, match):
    p = tmp_path / "t.jinja"
    p.write_text(source)
    with pytest.raises(ConfigError, match=match):
        load_template(p)


def test_jinja_errors_name_file_and_line(tmp_path):
    p = tmp_path / "t.jinja"
    p.write_text(HEAD + "Text: {{ text }}\n\n{% if text %}\nunclosed\n")  # the body starts on line 8
    with pytest.raises(ConfigError, match=r"t\.jinja, line (10|11): Jinja syntax error in the body"):
        load_template(p)
    p.write_text(HEAD + "Text: {{ txet }}\n")  # a typo is caught at load time (StrictUndefined)
    with pytest.raises(ConfigError, match="'txet' is undefined"):
        load_template(p)
    p.write_text(HEAD + "{{ text.__class__.__mro__ }}\n")  # sandboxed: no reaching into Python objects
    with pytest.raises(ConfigError):
        load_template(p)


def test_vars_and_inline_shots(tmp_path):
    p = tmp_path / "t.jinja"
    src = HEAD.replace("description: test", "description: test\nshots: inline\nvars: {kind: review}")
    p.write_text(
        src + "{% for s in shots %}{{ s.text }} => {{ s.answer }}\n{% endfor %}A {{ kind }}: {{ text }}"
    )
    tpl = load_template(p)
    msgs = tpl.messages("fine", [("good", "positive"), ("bad", "negative")])
    assert msgs == [{"role": "user", "content": "good => yes\nbad => no\nA review: fine"}]
    with pytest.raises(ConfigError, match="label 'neutral' is not in the template's labels"):
        tpl.messages("x", [("meh", "neutral")])


# --------------------------------------------------------------------------------------------- few-shot

POOL = [
    ("The striker scored twice in the final", "sports"),
    ("The goalkeeper saved a penalty in extra time", "sports"),
    ("The tennis champion won in straight sets", "sports"),
    ("Shares fell after the bank cut its forecast", "business"),
    ("The company reported record quarterly profits", "business"),
    ("Investors sold bonds as interest rates rose", "business"),
    ("A new chip doubles the speed of phone processors", "tech"),
    ("The startup released an open source database", "tech"),
    ("Researchers trained a larger language model", "tech"),
    ("The football match ended in a draw", "sports"),
]


def test_knn_never_leaks_the_query_and_orders_by_similarity():
    texts, labels = [t for t, _ in POOL], [lab for _, lab in POOL]
    sel = ShotSelector(texts, labels, "knn", ids=[f"p{i}" for i in range(len(texts))], cache=False)
    q = "The football match ended in a draw"
    shots = sel.select(q, 3, item_id="p9")
    assert q not in [t for t, _ in shots] and len(shots) == 3
    assert all(lab == "sports" for _, lab in shots)  # the nearest neighbours of a football text
    # exclusion by normalised text too: case, spacing and edge punctuation differ, still the same item
    shots = sel.select("  the FOOTBALL match ended in a draw!! ", 9)
    assert "The football match ended in a draw" not in [t for t, _ in shots] and len(shots) == 9
    # by id alone: a different text with the pool row's id excludes that row
    assert POOL[0][0] not in [t for t, _ in sel.select("a goal in the final minute", 9, item_id="p0")]
    # most similar last (next to the query)
    emb = sel.pool_embeddings()
    assert emb.shape == (10, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    qv = sel._embed(["the bank raised its profit forecast"])[0]
    picked = sel.select("the bank raised its profit forecast", 4)
    sims = [float(emb[texts.index(t)] @ qv) for t, _ in picked]
    assert sims == sorted(sims)


def test_knn_pool_embeddings_are_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path))
    calls = []

    class Toy:  # a deterministic stand-in so the test counts calls, not MiniLM's speed
        ref = "toy-embedder"

        def __call__(self, texts):
            calls.append(len(texts))
            v = np.array([[len(t), t.count("e") + 1.0, 1.0] for t in texts], dtype=np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    texts, labels = [t for t, _ in POOL], [lab for _, lab in POOL]
    a = ShotSelector(texts, labels, "knn", embedder=Toy())
    first = a.select_many(["x", "y"], 2)
    a.select_many(["z"], 2)
    assert calls == [2, 10, 1]  # queries each time, the pool once
    assert len(list((tmp_path / "cache" / "shot-embeddings").glob("*.npy"))) == 1
    b = ShotSelector(texts, labels, "knn", embedder=Toy())
    assert b.select_many(["x", "y"], 2) == first and calls == [2, 10, 1, 2]  # pool read from disk
    ShotSelector(texts[:-1], labels[:-1], "knn", embedder=Toy()).select("x", 2)
    assert calls[-1] == 9  # another pool, another key


def test_stratified_is_balanced_seeded_and_excludes_the_item():
    texts = [f"a{i}" for i in range(50)] + [f"b{i}" for i in range(5)] + [f"c{i}" for i in range(5)]
    labels = ["a"] * 50 + ["b"] * 5 + ["c"] * 5
    sel = ShotSelector(texts, labels, "stratified", seed=3)
    for k in (3, 6, 7, 8):
        counts = np.unique([lab for _, lab in sel.select("query", k)], return_counts=True)[1]
        assert counts.sum() == k and counts.max() - counts.min() <= 1
    shots = sel.select("query", 6)
    assert shots == ShotSelector(texts, labels, "stratified", seed=3).select("query", 6)
    assert shots != ShotSelector(texts, labels, "stratified", seed=4).select("query", 6)
    for t, _ in shots:  # the item itself never appears, even though it is in the pool
        assert t not in [s for s, _ in sel.select(t, 6)]
    # the same shots for every ordinary item, so the scorer shares the prompt prefix
    assert sel.select("one", 6) == sel.select("another", 6)
    # a label with few rows runs out: the rest is filled from the others
    assert len(sel.select("q", 20)) == 20


def test_random_selection_is_seeded_and_excludes_by_id_and_text():
    texts = [f"text {i}" for i in range(20)]
    sel = ShotSelector(texts, ["x"] * 20, "random", seed=0, ids=[str(i) for i in range(20)])
    first = sel.select("q", 5)
    assert first == ShotSelector(texts, ["x"] * 20, "random", seed=0).select("q", 5)
    t0 = first[0][0]
    assert t0 not in [t for t, _ in sel.select(t0.upper(), 5)]
    assert t0 not in [t for t, _ in sel.select("unrelated", 5, item_id=str(texts.index(t0)))]
    with pytest.raises(ConfigError, match="random, stratified, knn"):
        ShotSelector(texts, ["x"] * 20, "best")


# ---------------------------------------------------------------------------------------------- scoring


def test_label_logprobs_equal_brute_force_on_a_tiny_llama():
    model = _tiny_llama(vocab=101)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 101, (9,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, 101, (n,), generator=g).tolist() for n in (1, 6, 3, 11, 2, 4, 1, 7)]
    conts = [[5], [7, 8, 9], [10, 11], [10, 12]]
    ref = _brute(model, prompts, conts)
    for bs in (1, 3, 8):  # the shared-prefix path
        assert np.abs(label_logprobs(model, None, prompts, conts, batch_size=bs) - ref).max() < 1e-4
    # no shared prefix at all, and single-token continuations only (stage 3 skipped)
    mixed = prompts + [torch.randint(0, 101, (5,), generator=g).tolist()]
    assert np.abs(label_logprobs(model, None, mixed, conts, 4) - _brute(model, mixed, conts)).max() < 1e-4
    single = [[3], [4], [99]]
    assert np.abs(label_logprobs(model, None, mixed, single, 3) - _brute(model, mixed, single)).max() < 1e-4


def test_classify_with_the_smollm2_tokenizer_matches_brute_force(smol_tok):
    model = _tiny_llama()
    tpl = load_template("sentiment-few-shot")
    texts = ["I loved it", "Dull and far too long", "ok"]
    shots = [("Great fun", "positive"), ("Awful", "negative")]
    pred, probs = classify(model, smol_tok, tpl, texts, shots)
    prompts = [prompt_ids(smol_tok, tpl.messages(t, shots)) for t in texts]
    ref = _brute(model, prompts, label_continuations(smol_tok, tpl))
    ref_p = np.exp(ref - ref.max(1, keepdims=True))
    ref_p /= ref_p.sum(1, keepdims=True)
    assert np.abs(probs - ref_p).max() < 1e-4
    assert pred == [tpl.label_values[j] for j in ref_p.argmax(1)]


def test_contextual_calibration_removes_a_biased_prior(smol_tok):
    model = _tiny_llama(seed=2)
    tpl = load_template("sentiment-zero-shot")
    pos_tok, neg_tok = (c[0] for c in label_continuations(smol_tok, tpl))
    # a model with a strong prior for "positive": an output bias on that token
    head = torch.nn.Linear(32, 49152, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[pos_tok] = 6.0
    model.lm_head = head
    texts = [
        f"review number {i}: {w}" for i, w in enumerate(["good", "bad", "fine", "awful", "nice", "poor"] * 2)
    ]
    raw = score_texts(model, smol_tok, tpl, texts)
    assert set(raw.pred) == {"positive"} and raw.probs[:, 0].min() > 0.9
    cal = score_texts(model, smol_tok, tpl, texts, calibrate=True)
    cf = content_free_bias(model, smol_tok, tpl)
    assert cf[0] > 0.9  # the content-free inputs see the same prior
    expected = raw.raw / cf
    expected /= expected.sum(1, keepdims=True)
    assert np.allclose(cal.probs, expected, atol=1e-9)
    assert np.allclose(cal.raw, raw.raw)
    # the prior is gone: calibrated log-odds centre near zero and both labels are predicted
    raw_lo = np.log(raw.probs[:, 0] / raw.probs[:, 1])
    cal_lo = np.log(cal.probs[:, 0] / cal.probs[:, 1])
    assert abs(cal_lo.mean()) < 0.5 * abs(raw_lo.mean())
    assert set(cal.pred) == {"positive", "negative"}


# ---------------------------------------------------------------------------------------------- the CLI


def test_prompt_list_show_render(cli):
    code, out, _ = cli("prompt", "list")
    assert code == 0 and "sentiment-zero-shot" in out and "topic-few-shot" in out
    code, out, _ = cli("prompt", "list", "--json")
    assert {r["name"] for r in json.loads(out)} >= {"sentiment-few-shot", "topic-zero-shot"}
    code, out, _ = cli("prompt", "show", "sentiment-few-shot")
    assert code == 0 and "name: sentiment-few-shot" in out and "sha256" in out
    code, out, err = cli("prompt", "render", "sentiment-few-shot", "--text", "what a day",
                         "--shot", "loved it=positive", "--model", "smollm2")  # fmt: skip
    assert code == 0 and out.count("<|im_start|>user") == 2 and "what a day" in out
    assert "prompt tokens" in err and "'positive'" in err
    code, _, err = cli("prompt", "render", "sentiment-few-shot", "--text", "x", "--shot", "bad=meh")
    assert code == 2 and "label 'meh' is not in the template's labels" in err


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, smol_tok) -> Path:
    """A tiny random LlamaForCausalLM saved with the smollm2 tokenizer (vocab 49152) and chat template."""
    out = tmp_path_factory.mktemp("tiny-llama")
    _tiny_llama(seed=5).save_pretrained(out, safe_serialization=True)
    smol_tok.save_pretrained(out)
    return out


def _sentiment_csv(path: Path, n: int = 60) -> Path:
    pos = ["great", "lovely", "wonderful", "superb", "happy"]
    neg = ["awful", "boring", "terrible", "sad", "broken"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            lab = "positive" if i % 2 else "negative"
            w.writerow([f"day {i} was {(pos if i % 2 else neg)[i % 5]}", lab])
    return path


def test_prompt_eval_end_to_end(cli, tmp_path, tiny_llama_dir, mlflow_uri):
    data = _sentiment_csv(tmp_path / "s.csv")
    out = tmp_path / "report"
    code, stdout, err = cli("prompt", "eval", "--model", tiny_llama_dir, "--data", data, "--templates",
                            "sentiment-zero-shot,sentiment-few-shot", "--shots", "2", "--selection",
                            "stratified", "--calibrate", "--out", out, "--quiet")  # fmt: skip
    assert code == 0, err
    assert "sentiment-zero-shot " in stdout and "sentiment-few-shot:2" in stdout and "macro-F1" in stdout
    report = json.loads((out / "report.json").read_text())
    zero, few = report["variants"]
    assert report["n"] == 6 and zero["n"] == few["n"] == 6  # 10% test split of 60 rows
    assert zero["shots"] == 0 and few["shots"] == 2 and few["prompt_tokens"] > zero["prompt_tokens"] + 20
    for v in (zero, few):
        assert 0 <= v["accuracy"] <= 1 and 0 <= v["macro_f1"] <= 1 and v["latency_ms"] > 0
        assert abs(sum(v["content_free"].values()) - 1) < 1e-6 and "uncalibrated" in v
    assert "day " in few["example_prompt"] and few["example_prompt"].count("<|im_start|>assistant") == 3
    assert (out / "report.html").read_text().count("<tr>") == 3
    assert (out / "predictions-sentiment-few-shot_2.csv").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("lmloop-prompts")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    run = next(r for r in runs if r.data.params["template"] == "sentiment-few-shot@1")
    assert run.data.params["shots"] == "2" and run.data.metrics["accuracy"] == few["accuracy"]
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "prompt")}
    assert arts == {"prompt/example_prompt.txt", "prompt/sentiment-few-shot.jinja"}
    example = Path(client.download_artifacts(run.info.run_id, "prompt/example_prompt.txt", str(tmp_path)))
    assert example.read_text() == few["example_prompt"]


def test_prompt_eval_refuses_labels_the_template_cannot_say(cli, tmp_path, toy_csv):
    code, _, err = cli("prompt", "eval", "--model", "smollm2", "--data", toy_csv,
                       "--templates", "sentiment-zero-shot", "--no-track")  # fmt: skip
    assert code == 2 and "the data's label(s) 'neg', 'pos' are not among the template's labels" in err

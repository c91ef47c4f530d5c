"""``lmloop serve`` end to end: real uvicorn subprocesses on loopback ports, a tiny model, real stores.

Every server here is the actual ``python -m lmloop serve`` command (started by :class:`Launcher`), so the
tests see what a client sees: status codes, headers, Prometheus text, and what is durable in the
prediction log after a SIGTERM or a SIGKILL. Each start costs seconds (torch + transformers imports), so
one server is shared by the tests that leave it as they found it; tests that need other flags, or that
stop their server, start their own through the ``start_server`` factory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from lmloop.mlops.predlog import open_store
from lmloop.netutil import free_port

KEY = f"sk-test-{uuid.uuid4().hex}"  # distinctive, so a leak into the server's output is unmistakable
LABELS = ["negative", "positive"]
MODEL_NAME = "tiny-sentiment"
ENDPOINTS = {"/v1/classify", "/v1/feedback", "/v1/models", "/health", "/ready", "/metrics"}
READY_TIMEOUT = 120  # the first import of torch + transformers takes seconds, more on a busy machine


# ---------------------------------------------------------------------------------------------- servers


class Server:
    """One ``lmloop serve`` process; its stdout and stderr go to ``log``."""

    def __init__(self, proc: subprocess.Popen, port: int, store_url: str, log: Path, key: str | None):
        self.proc, self.port, self.store_url, self.log, self.key = proc, port, store_url, log, key
        self.url = f"http://127.0.0.1:{port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"X-API-Key": self.key} if self.key else {}

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30.0, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=30.0, **kw)

    def classify(self, *texts: str) -> list[dict]:
        r = self.post("/v1/classify", json={"inputs": list(texts)})
        assert r.status_code == 200, r.text
        return r.json()["predictions"]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> Server:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"lmloop serve exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"lmloop serve not ready after {timeout} s:\n{self.output()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` (unless it has exited already) and wait for the exit; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"lmloop serve did not exit within {timeout} s:\n{self.output()[-2000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


class Launcher:
    """Starts ``lmloop serve`` processes in ``root`` and kills whatever is still running at ``close()``."""

    def __init__(self, root: Path, model: Path):
        self.root, self.model, self.servers = root, model, []

    def start(
        self,
        *args: str,
        store: str | None = None,
        key: str | None = KEY,
        wait: bool = True,
    ) -> Server:
        """A server on a free loopback port with ``args`` as extra flags; the key goes in LMLOOP_API_KEY
        (never a flag: flags show up in ``ps``). ``store`` defaults to a fresh sqlite file."""
        n = len(self.servers)
        store = store or f"sqlite:///{self.root / f'predictions-{n}.db'}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        env.pop("LMLOOP_API_KEY", None)
        if key:
            env["LMLOOP_API_KEY"] = key
        port = free_port()
        log = self.root / f"server-{n}.log"
        argv = [sys.executable, "-m", "lmloop", "serve", "--model", str(self.model), "--backend", "torch"]
        argv += ["--port", str(port), "--store", store, *args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        server = Server(proc, port, store, log, key)
        self.servers.append(server)
        return server.wait_ready() if wait else server

    def close(self) -> None:
        for s in self.servers:
            s.kill()


@pytest.fixture(scope="session")
def serve_model(tiny_model_dir, tmp_path_factory, labelled_copy) -> Path:
    """The tiny random BERT with human labels (config id2label and lmloop.json), named like a real run."""
    return labelled_copy(tiny_model_dir, tmp_path_factory.mktemp("serve-model") / MODEL_NAME, LABELS)


@pytest.fixture
def start_server(serve_model, tmp_path):
    """Factory: ``start_server(*flags, store=None, key=KEY, wait=True)`` -> :class:`Server`; every server it
    started is killed when the test ends."""
    launcher = Launcher(tmp_path, serve_model)
    yield launcher.start
    launcher.close()


@pytest.fixture(scope="module")
def server(serve_model, tmp_path_factory):
    """The server shared by the module: default flags (auth on writes, its own sqlite store) except a 50 ms
    batching window, which test_micro_batching needs and the others do not mind (each server start costs
    seconds of torch + transformers imports, so the file starts as few as it can)."""
    launcher = Launcher(tmp_path_factory.mktemp("serve-shared"), serve_model)
    yield launcher.start("--max-wait-ms", "50", "--max-batch", "64")
    launcher.close()


# ---------------------------------------------------------------------------------------------- metrics
def scrape(server: Server) -> dict:
    """The server's /metrics parsed with prometheus_client's own parser: {family name: family}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = server.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(families: dict, family: str, sample: str | None = None, **labels: str) -> float:
    """The sum over the samples named ``sample`` (default: the family's own) whose labels include ``labels``."""
    name = sample or family
    return sum(
        s.value
        for s in families[family].samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def delta(before: dict, after: dict, family: str, sample: str | None = None, **labels: str) -> float:
    """How much :func:`value` grew between two scrapes."""
    return value(after, family, sample, **labels) - value(before, family, sample, **labels)


def assert_no_500(server: Server) -> None:
    requests = scrape(server)["lmloop_requests"].samples
    assert not [x for x in requests if x.labels.get("status") == "500"], requests


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    """``r`` is a JSON error with ``status``, a code and a non-empty message."""
    assert r.status_code == status, f"{r.status_code} != {status}: {r.text[:500]}"
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["message"] and err["code"]
    if code:
        assert err["code"] == code, err
    return err


# ---------------------------------------------------------------------------------------------- happy path
def test_happy_path(server):
    texts = ["I loved every minute of it", "meh", "a dreadful, boring film"]
    r = server.post("/v1/classify", json={"inputs": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL_NAME and body["version"].startswith("sha256:")
    preds = body["predictions"]
    assert len(preds) == 3 and len({p["id"] for p in preds}) == 3
    for p in preds:
        assert set(p["scores"]) == set(LABELS) and p["label"] in LABELS
        assert sum(p["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["score"] == pytest.approx(max(p["scores"].values())) == p["scores"][p["label"]]
    assert r.headers["x-request-id"]

    pid = preds[0]["id"]
    r = server.post("/v1/feedback", json={"prediction_id": pid, "label": "positive"}, headers=server.auth)
    assert r.status_code == 200, r.text
    fb = r.json()
    assert fb["prediction_id"] == pid and fb["label"] == "positive" and fb["predicted"] == preds[0]["label"]
    # durable: in the store, read through a separate connection while the server keeps running
    with open_store(server.store_url) as store:
        assert [f.label for f in store.get_feedback(pid)] == ["positive"]
        rec = store.get_prediction(pid)
        assert rec.text == texts[0] and rec.label == preds[0]["label"] and rec.model == MODEL_NAME

    models = server.get("/v1/models").json()["data"]
    assert len(models) == 1
    m = models[0]
    assert m["id"] == MODEL_NAME and m["labels"] == LABELS and m["backend"] == "torch"
    assert m["version"] == body["version"] and m["max_length"] == 64

    assert server.get("/health").json() == {"status": "alive"}
    r = server.get("/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    spec = server.get("/openapi.json").json()
    assert set(spec["paths"]) >= ENDPOINTS
    assert "requestBody" in spec["paths"]["/v1/classify"]["post"]
    r = server.get("/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]


# ---------------------------------------------------------------------------------------------- bad requests
def test_bad_requests_get_the_right_4xx(server):
    pid = server.classify("a fine film")[0]["id"]

    def classify(**kw) -> httpx.Response:
        return server.post("/v1/classify", **kw)

    def feedback(payload: dict, headers: dict | None = None) -> httpx.Response:
        return server.post("/v1/feedback", json=payload, headers=server.auth if headers is None else headers)

    err = assert_error(classify(content=b'{"inputs": ["unterminated'), 400, "malformed_json")
    assert "JSON" in err["message"]
    assert_error(classify(content=b""), 400, "malformed_json")
    assert_error(classify(json={"inputs": [1, 2]}), 422, "invalid_request")
    assert_error(classify(json={"inputs": "not a list"}), 422, "invalid_request")
    assert_error(classify(json=["a bare list"]), 422, "invalid_request")
    assert_error(classify(json={"inputs": []}), 422, "invalid_request")
    err = assert_error(classify(json={"inputs": ["x"], "temperature": 0.5}), 422, "invalid_request")
    assert "temperature" in err["message"]
    assert_error(feedback({"prediction_id": pid, "label": 1}), 422, "invalid_request")
    assert_error(feedback({"prediction_id": pid, "label": "positive", "extra": 1}), 422, "invalid_request")

    # over the limits: the body (1 MB by default), inputs per request (256), characters per text (20k)
    big = json.dumps({"inputs": ["x" * 1000] * 10_000}).encode()  # ~10 MB
    err = assert_error(classify(content=big), 413, "body_too_large")
    assert "max-body-bytes" in err["message"]

    def chunks():  # a generator: httpx sends it chunked, with no Content-Length to refuse up front
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    assert_error(classify(content=chunks()), 413, "body_too_large")
    err = assert_error(classify(json={"inputs": ["t"] * 257}), 413, "too_many_inputs")
    assert "256" in err["message"]
    err = assert_error(classify(json={"inputs": ["fine", "y" * 20_001]}), 413, "input_too_long")
    assert "inputs[1]" in err["message"]

    err = assert_error(feedback({"prediction_id": "01NOSUCHPREDICTION", "label": "positive"}), 404)
    assert err["code"] == "unknown_prediction" and "01NOSUCHPREDICTION" in err["message"]
    err = assert_error(feedback({"prediction_id": pid, "label": "meh"}), 422, "unknown_label")
    assert "positive" in err["message"]

    ok = {"prediction_id": pid, "label": "positive"}
    r = assert_error(feedback(ok, headers={}), 401, "unauthorized")
    assert feedback(ok, headers={}).headers["www-authenticate"] == "Bearer"
    assert_error(feedback(ok, headers={"X-API-Key": KEY + "x"}), 401, "unauthorized")
    assert_error(feedback(ok, headers={"Authorization": "Bearer nope"}), 401, "unauthorized")
    r = feedback(ok, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    assert_error(server.get("/v1/nothing-here"), 404)
    assert_error(server.get("/v1/classify"), 405)

    # a client that hangs up halfway through its body is counted as 499, not as a server error
    before = value(scrape(server), "lmloop_requests", "lmloop_requests_total", status="499")
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
            b'Content-Type: application/json\r\n\r\n5\r\n{"inp\r\n'
        )
        time.sleep(0.2)
    end = time.monotonic() + 10
    while value(scrape(server), "lmloop_requests", "lmloop_requests_total", status="499") == before:
        assert time.monotonic() < end, "the hung-up request was never counted"
        time.sleep(0.05)
    assert_no_500(server)


# ---------------------------------------------------------------------------------------------- metrics
def test_prometheus_metrics_count_the_requests(server):
    before = scrape(server)
    sizes = [1, 3, 2, 5]
    labels: Counter[str] = Counter()
    for n in sizes:
        for p in server.classify(*[f"metrics text {n}-{i}" for i in range(n)]):
            labels[p["label"]] += 1
    assert_error(server.post("/v1/classify", json={"inputs": []}), 422)
    r = server.post("/v1/feedback", json={"prediction_id": "nope", "label": "positive"}, headers=server.auth)
    assert_error(r, 404)
    after = scrape(server)

    assert after["lmloop_request_seconds"].type == "histogram"
    assert after["lmloop_batch_size"].type == "histogram"
    assert after["lmloop_queue_depth"].type == "gauge"
    assert after["lmloop_requests"].type == after["lmloop_predictions"].type == "counter"

    def grew(family: str, sample: str, **labels: str) -> float:
        return delta(before, after, family, sample, **labels)

    # requests by endpoint and status; the first scrape is counted once it has answered
    requests, seconds = ("lmloop_requests", "lmloop_requests_total"), "lmloop_request_seconds"
    assert grew(*requests, endpoint="/v1/classify", status="200") == 4
    assert grew(*requests, endpoint="/v1/classify", status="422") == 1
    assert grew(*requests, endpoint="/v1/feedback", status="404") == 1
    assert grew(*requests, endpoint="/metrics", status="200") == 1
    # latency histogram by endpoint: one observation per request, whatever its status
    assert grew(seconds, f"{seconds}_count", endpoint="/v1/classify") == 5
    assert grew(seconds, f"{seconds}_bucket", endpoint="/v1/classify", le="+Inf") == 5
    assert grew(seconds, f"{seconds}_count", endpoint="/v1/feedback") == 1
    # every text went through exactly one forward pass; sequential requests cannot share one
    assert grew("lmloop_batch_size", "lmloop_batch_size_sum") == sum(sizes)
    assert grew("lmloop_batch_size", "lmloop_batch_size_count") == len(sizes)
    assert value(after, "lmloop_queue_depth") == 0
    for lab in LABELS:
        assert grew("lmloop_predictions", "lmloop_predictions_total", label=lab) == labels[lab]

    version = server.get("/v1/models").json()["data"][0]["version"]
    info = [s for s in after["lmloop_model_info"].samples if s.name == "lmloop_model_info"]
    assert [(s.labels, s.value) for s in info] == [
        ({"model": MODEL_NAME, "version": version, "backend": "torch"}, 1.0)
    ]


# ---------------------------------------------------------------------------------------------- batching
def test_micro_batching_merges_concurrent_requests(server):
    srv = server  # --max-wait-ms 50 --max-batch 64

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=srv.url, timeout=30, limits=limits) as c:
            # open the 32 connections first, so the classify requests arrive together
            await asyncio.gather(*(c.get("/health") for _ in range(32)))
            return await asyncio.gather(
                *(c.post("/v1/classify", json={"inputs": [f"text number {i}"]}) for i in range(32))
            )

    before = scrape(srv)
    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 32
    ids = {r.json()["predictions"][0]["id"] for r in responses}
    assert len(ids) == 32
    after = scrape(srv)
    assert delta(before, after, "lmloop_batch_size", "lmloop_batch_size_sum") == 32
    n = delta(before, after, "lmloop_batch_size", "lmloop_batch_size_count")
    # typically 1-4 passes; the server parses requests one at a time, so a busy machine spreads them out
    assert n <= 16, f"32 concurrent requests ran as {n} forward passes: not batched"


def test_full_queue_answers_429_with_retry_after(start_server):
    srv = start_server("--max-queue", "4", "--max-batch", "1", "--max-wait-ms", "0")
    long_text = "this film was long and slow and " * 20  # past max_length: every row is 64 tokens

    async def burst(n: int = 48) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=srv.url, timeout=30, limits=limits) as c:
            await asyncio.gather(*(c.get("/health") for _ in range(n)))
            return await asyncio.gather(
                *(c.post("/v1/classify", json={"inputs": [long_text] * 4}) for _ in range(n))
            )

    responses: list[httpx.Response] = []
    for _ in range(5):  # one burst is nearly always enough; a few more on a very busy machine
        responses += asyncio.run(burst())
        if any(r.status_code == 429 for r in responses):
            break
    codes = Counter(r.status_code for r in responses)
    assert set(codes) == {200, 429}, codes
    for r in responses:
        if r.status_code == 429:
            err = assert_error(r, 429, "busy")
            assert "queue full" in err["message"]
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert len(r.json()["predictions"]) == 4
    fams = scrape(srv)
    assert value(fams, "lmloop_requests", "lmloop_requests_total", status="429") == codes[429]
    assert value(fams, "lmloop_requests", "lmloop_requests_total", endpoint="/v1/classify") == len(responses)
    assert_no_500(srv)


# ---------------------------------------------------------------------------------------------- durability
def test_acknowledged_feedback_survives_sigkill(start_server, tmp_path):
    store_url = f"sqlite:///{tmp_path / 'storm.db'}"
    srv = start_server(store=store_url)
    acked: list[tuple[str, str, str]] = []  # (prediction id, served label, feedback label) answered 200
    stop = threading.Event()
    errors: list[BaseException] = []

    def client(k: int) -> None:
        with srv.client(timeout=10) as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    r = c.post("/v1/classify", json={"inputs": [f"storm {k}-{i}"]})
                    assert r.status_code == 200, r.text
                    pred = r.json()["predictions"][0]
                    label = LABELS[i % 2]
                    body = {"prediction_id": pred["id"], "label": label}
                    r = c.post("/v1/feedback", json=body, headers=srv.auth)
                    assert r.status_code == 200, r.text
                    acked.append((pred["id"], pred["label"], label))
                except httpx.TransportError:
                    time.sleep(0.01)  # the server is gone (expected once killed); keep trying until told
                except BaseException as e:  # a wrong answer while the server was up
                    errors.append(e)
                    return

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    n_before_kill = len(acked)
    srv.stop(signal.SIGKILL)  # mid-storm: requests in flight on every thread
    assert srv.proc.returncode == -signal.SIGKILL
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert n_before_kill >= 10, f"only {n_before_kill} feedback acknowledged in 1.5 s"

    again = start_server(store=store_url)
    with open_store(store_url) as store:
        missing = [pid for pid, _, label in acked if label not in [f.label for f in store.get_feedback(pid)]]
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged feedback lost: {missing[:5]}"
    pid, served, _ = acked[0]  # served by the killed process; its feedback is durable, so is the prediction
    r = again.post("/v1/feedback", json={"prediction_id": pid, "label": "negative"}, headers=again.auth)
    assert r.status_code == 200, r.text
    assert r.json()["predicted"] == served
    assert again.classify("after the crash")[0]["label"] in LABELS


def test_sigterm_drains_in_flight_requests(start_server):
    # a long batching window holds the requests inside the server while SIGTERM arrives
    srv = start_server("--max-wait-ms", "2000")
    results: list = [None] * 8
    sent = threading.Barrier(9)

    def call(i: int) -> None:
        with srv.client() as c:
            c.get("/health")  # connected before the barrier
            sent.wait()
            try:
                results[i] = c.post("/v1/classify", json={"inputs": [f"in flight {i}"]})
            except httpx.HTTPError as e:
                results[i] = e

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    sent.wait()
    time.sleep(0.7)  # the requests are sent and waiting for their batch to fill
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert srv.wait(timeout=30) == 0, srv.output()[-2000:]  # 0, not 143: a requested stop is clean
    assert time.monotonic() - t0 < 10
    assert all(isinstance(r, httpx.Response) for r in results), results
    assert [r.status_code for r in results] == [200] * 8
    ids = [r.json()["predictions"][0]["id"] for r in results]
    with open_store(srv.store_url) as store:  # committed by the shutdown, though no feedback forced it
        recs = [store.get_prediction(i) for i in ids]
        assert all(recs) and sorted(r.text for r in recs) == sorted(f"in flight {i}" for i in range(8))
    assert "Traceback" not in srv.output()


# ---------------------------------------------------------------------------------------------- PostgreSQL
@pytest.fixture
def pg_store_url(postgres_url):
    """A fresh schema in the session's PostgreSQL (see tests/test_predlog.py), dropped afterwards."""
    import psycopg

    schema = f"serve_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield f"{postgres_url}?options=-csearch_path%3D{schema}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_postgres_store_shared_by_two_replicas(start_server, pg_store_url):
    a = start_server(store=pg_store_url, wait=False)
    b = start_server(store=pg_store_url, wait=False)
    a.wait_ready(), b.wait_ready()

    # round trip on one replica
    pred = a.classify("a postgres round trip")[0]
    r = a.post("/v1/feedback", json={"prediction_id": pred["id"], "label": "positive"}, headers=a.auth)
    assert r.status_code == 200, r.text

    # served by A, labelled through B: B finds it in the shared store once A has committed it (A's log
    # writer commits within ~50 ms; a replica can only flush its own writer, so poll for A's commit)
    preds = a.classify("replica a served this", "and this")
    with open_store(pg_store_url) as store:
        end = time.monotonic() + 10
        while not all(store.get_prediction(p["id"]) for p in preds) and time.monotonic() < end:
            time.sleep(0.05)
        for p, label in zip(preds, LABELS, strict=True):
            r = b.post("/v1/feedback", json={"prediction_id": p["id"], "label": label}, headers=b.auth)
            assert r.status_code == 200, r.text
            assert r.json()["predicted"] == p["label"]
        assert [f.label for f in store.get_feedback(pred["id"])] == ["positive"]
        assert [f.label for f in store.get_feedback(preds[1]["id"])] == ["positive"]
        assert store.get_prediction(preds[0]["id"]).text == "replica a served this"
    assert b.stop() == 0 and a.stop() == 0
    with open_store(pg_store_url) as store:
        assert store.counts() == {"predictions": 3, "feedback": 3}


# ---------------------------------------------------------------------------------------------- privacy
def test_log_text_hash_and_nothing_secret_in_the_output(start_server):
    srv = start_server("--log-text", "hash", "--access-log")
    text = f"zebra-{uuid.uuid4().hex}: my card number is 4111 1111 1111 1111"
    wrong_key = f"wrong-{uuid.uuid4().hex}"
    pred = srv.classify(text)[0]
    ok = {"prediction_id": pred["id"], "label": "negative"}
    r = srv.post("/v1/feedback", json=ok, headers=srv.auth)
    assert r.status_code == 200, r.text  # the prediction is committed by now (feedback flushes the log)
    assert_error(srv.post("/v1/feedback", json=ok, headers={"Authorization": f"Bearer {wrong_key}"}), 401)
    assert_error(srv.post("/v1/classify", json={"inputs": [text, 3]}), 422)
    assert_error(srv.post("/v1/classify", content=f'{{"inputs": ["{text}"'.encode()), 400)

    # --log-text hash: the store keeps the sha256, never the text
    with open_store(srv.store_url) as store:
        rec = store.get_prediction(pred["id"])
        assert [f.label for f in store.get_feedback(pred["id"])] == ["negative"]
    assert rec.text is None and rec.label == pred["label"]
    assert rec.text_hash == hashlib.sha256(text.encode("utf-8")).hexdigest()

    # the server's whole output, access log included, holds neither keys nor texts
    assert srv.stop() == 0
    out = srv.output()
    assert "POST /v1/classify" in out and "401" in out  # the access log is on and shows paths and statuses
    for secret in (KEY, wrong_key, text, "zebra-", "4111"):
        assert secret not in out
    db = Path(srv.store_url.removeprefix("sqlite:///"))
    for f in [db, *db.parent.glob(db.name + "-*")]:  # the database and any WAL left behind
        assert b"zebra-" not in f.read_bytes()


# ---------------------------------------------------------------------------------------------- refusals
def test_refuses_to_start_unsafely(run_lmloop, serve_model, monkeypatch):
    monkeypatch.delenv("LMLOOP_API_KEY", raising=False)
    r = run_lmloop("serve", "--model", str(serve_model), "--host", "0.0.0.0", "--port", "1", timeout=60)
    assert r.returncode == 2, r.stderr
    assert "LMLOOP_API_KEY" in r.stderr and "0.0.0.0" in r.stderr
    assert "Traceback" not in r.stderr

    store = "mysql://user:hunter2@db.example/preds"
    r = run_lmloop("serve", "--model", str(serve_model), "--store", store, "--port", "1", timeout=60)
    assert r.returncode == 2, r.stderr
    assert "sqlite:///" in r.stderr and "postgresql://" in r.stderr
    assert "hunter2" not in r.stderr and "Traceback" not in r.stderr

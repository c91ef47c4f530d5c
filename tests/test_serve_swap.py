"""``lmloop serve --model models:/NAME@champion`` follows the alias: hot swap under load, refusals.

A real ``lmloop serve`` process on loopback serves a registry alias on a temp sqlite MLflow store; the
tests move the alias in-process (as ``lmloop registry promote`` would) while client threads keep sending
requests, and check what a client and the prediction log see: no failed request, every answer from the
version that was live, the swap reported in ``/v1/models``, ``/ready`` and ``/metrics``, and a version
with other labels refused while the server keeps serving.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from lmloop.mlops.predlog import open_store
from lmloop.netutil import free_port

KEY = "sk-swap-test"
NAME = "swapper"
READY_TIMEOUT = 120


@pytest.fixture(scope="module")
def registry(tmp_path_factory, finetune_confident_tiny, tiny_model_dir, toy_csv):
    """A sqlite MLflow store holding NAME v1, v2 (same labels, other content) and v3 (other labels),
    with the champion alias on v1; yields (store uri, $LMLOOP_HOME for the server, Registry)."""
    from lmloop.mlops.registry import Registry

    root = tmp_path_factory.mktemp("swap")
    v1 = finetune_confident_tiny(root / "v1", tiny_model_dir, toy_csv)
    v2, v3 = root / "v2", root / "v3"
    shutil.copytree(v1, v2)
    meta = json.loads((v2 / "lmloop.json").read_text())
    meta["note"] = "v2: another content hash, the same labels"
    (v2 / "lmloop.json").write_text(json.dumps(meta))
    shutil.copytree(v1, v3)
    meta = json.loads((v3 / "lmloop.json").read_text())
    other = [f"other-{lab}" for lab in meta["labels"]]
    meta["labels"] = other
    (v3 / "lmloop.json").write_text(json.dumps(meta))
    cfg = json.loads((v3 / "config.json").read_text())
    cfg["id2label"] = {str(i): lab for i, lab in enumerate(other)}
    cfg["label2id"] = {lab: i for i, lab in enumerate(other)}
    (v3 / "config.json").write_text(json.dumps(cfg))

    uri = f"sqlite:///{root / 'mlflow.db'}"
    reg = Registry(uri, say=lambda m: None)
    for d in (v1, v2, v3):
        reg.register(d, NAME, reason=f"test {d.name}")
    reg.promote(NAME, 1, reason="first")
    reg.promote(NAME, 1, alias="challenger", reason="shadow")
    return uri, root / "home", reg


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory, wait_ready):
    """``lmloop serve --model models:/NAME@champion --follow-interval 0.5 --shadow models:/NAME@challenger``
    (auth on writes)."""
    uri, home, _ = registry
    root = tmp_path_factory.mktemp("swap-server")
    port = free_port()
    store = f"sqlite:///{root / 'predictions.db'}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.update(MLFLOW_TRACKING_URI=uri, LMLOOP_HOME=str(home), LMLOOP_API_KEY=KEY)
    argv = [sys.executable, "-m", "lmloop", "serve", "--model", f"models:/{NAME}@champion"]
    argv += ["--backend", "torch", "--follow-interval", "0.5", "--port", str(port), "--store", store]
    argv += ["--shadow", f"models:/{NAME}@challenger"]
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log, READY_TIMEOUT)
        yield {"url": url, "proc": proc, "store": store, "log": log}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _served_version(url: str) -> str:
    return httpx.get(url + "/ready", timeout=10).json()["version"]


def _metrics(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sample(families: dict, family: str, sample: str, **labels) -> float:
    return sum(
        s.value
        for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_alias_move_swaps_under_load_without_a_failed_request(server, registry):
    _, _, reg = registry
    url = server["url"]
    assert _served_version(url) == "v1"
    m = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
    assert m["id"] == NAME and m["version"] == "v1" and m["registry"]["uri"] == f"models:/{NAME}@champion"

    stop = threading.Event()
    results: list[list[tuple]] = [[] for _ in range(4)]  # per client: (sent, received, status, body)

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            n = 0
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = c.post(
                        "/v1/classify", json={"inputs": [f"client {i} text {n}", "great and wonderful"]}
                    )
                    results[i].append((sent, time.monotonic(), r.status_code, r.json()))
                except Exception as e:  # a dropped connection is a failed request too
                    results[i].append((sent, time.monotonic(), -1, repr(e)))
                n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        promoted = time.monotonic()
        reg.promote(NAME, 2, reason="swap test")
        end = time.monotonic() + 30
        while _served_version(url) != "v2":
            assert time.monotonic() < end, f"no swap within 30 s:\n{server['log'].read_text()[-3000:]}"
            time.sleep(0.05)
        swapped = time.monotonic()
        time.sleep(1.0)  # keep the storm going on v2
    finally:
        stop.set()
        for t in threads:
            t.join(60)

    flat = [r for rs in results for r in rs]
    failed = [r for r in flat if r[2] != 200]
    assert not failed, failed[:5]
    versions = {r[3]["version"] for r in flat}
    assert versions == {"v1", "v2"}, versions
    for sent, received, _, body in flat:
        if received < promoted:  # answered before the alias moved: the old version
            assert body["version"] == "v1"
        if sent > swapped:  # sent after the server said v2: the new one
            assert body["version"] == "v2"
        assert body["model"] == NAME
    for rs in results:  # each client sees v1 then v2, never back
        seq = [r[3]["version"] for r in rs]
        assert seq == sorted(seq), seq
    n_v1 = sum(r[3]["version"] == "v1" for r in flat)
    assert n_v1 > 10 and len(flat) - n_v1 > 10, (n_v1, len(flat))

    m = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
    assert m["version"] == "v2" and m["registry"]["version"] == 2 and m["registry"]["swaps"] == 1
    fam = _metrics(url)
    assert _sample(fam, "lmloop_model_swaps", "lmloop_model_swaps_total") == 1
    info = [s.labels["version"] for s in fam["lmloop_model_info"].samples if s.value == 1]
    assert info == ["v2"]
    assert _sample(fam, "lmloop_model_registry_version", "lmloop_model_registry_version") == 2
    # the shadow (v1 on the challenger alias) scores the storm's texts off the request path: every text
    # an answer went out for is scored or (its queue full) dropped, soon after
    offered = sum(len(body["predictions"]) for _, _, _, body in flat)
    end = time.monotonic() + 30
    while True:
        shadow = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["shadow"]
        if shadow["scored"] + shadow["dropped"] == offered or time.monotonic() > end:
            break
        time.sleep(0.1)
    assert shadow["scored"] + shadow["dropped"] == offered and shadow["scored"] > 0, (shadow, offered)
    # v2 has v1's weights: the shadow agrees with the champion (up to float ties from other padding)
    assert shadow["version"] == "v1" and shadow["agreement"] > 0.99, shadow
    fam = _metrics(url)
    yes = _sample(fam, "lmloop_shadow_predictions", "lmloop_shadow_predictions_total", agree="yes")
    no = _sample(fam, "lmloop_shadow_predictions", "lmloop_shadow_predictions_total", agree="no")
    assert yes + no == shadow["scored"] and yes / shadow["scored"] == shadow["agreement"]
    assert _sample(fam, "lmloop_shadow_confidence", "lmloop_shadow_confidence_count") == shadow["scored"]
    assert _sample(fam, "lmloop_shadow_dropped", "lmloop_shadow_dropped_total") == shadow["dropped"]

    # the prediction log attributes every prediction to the version that answered it (committed within ~100 ms)
    served = {p["id"]: body["version"] for _, _, _, body in flat for p in body["predictions"]}
    deadline = time.monotonic() + 30
    with open_store(server["store"]) as store:
        while True:
            logged = {p.id: (p.model, p.version) for p in store.iter_predictions(model=NAME)}
            if set(served) <= set(logged) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert set(served) <= set(logged), len(set(served) - set(logged))
    wrong = [(i, v, logged[i]) for i, v in served.items() if logged[i] != (NAME, v)]
    assert not wrong, wrong[:5]


def test_swap_to_other_labels_is_refused_and_serving_goes_on(server, registry):
    _, _, reg = registry
    url = server["url"]
    before = _served_version(url)
    fam0 = _metrics(url)
    assert httpx.post(url + "/v1/admin/reload", timeout=60).status_code == 401  # admin needs the key
    reg.promote(NAME, 3, reason="labels changed")
    r = httpx.post(url + "/v1/admin/reload", headers={"X-API-Key": KEY}, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"]["status"] == "refused" and out["model"]["target"] == 3, out
    assert "labels" in out["model"]["reason"] and out["version"] == before
    time.sleep(1.2)  # a couple of polls: the refused version is not loaded again and again
    r = httpx.post(url + "/v1/classify", json={"inputs": ["still here"]}, timeout=30)
    assert r.status_code == 200 and r.json()["version"] == before
    m = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
    assert m["version"] == before and "v3" in m["registry"]["refused"]
    fam = _metrics(url)
    refused = _sample(fam, "lmloop_model_swap_failures", "lmloop_model_swap_failures_total", reason="labels")
    assert (
        refused
        - _sample(fam0, "lmloop_model_swap_failures", "lmloop_model_swap_failures_total", reason="labels")
        == 1
    )
    assert "refusing to swap to v3" in server["log"].read_text()


# ------------------------------------------------------------------------------------ in-process units
class _FakeRegistry:
    def __init__(self, tmp: Path):
        self.version, self.tmp = 1, tmp

    def show(self, name, alias):
        from types import SimpleNamespace

        return SimpleNamespace(version=self.version)

    def resolve(self, uri: str) -> Path:
        return self.tmp / uri.rsplit("/", 1)[1]


def test_follower_retries_a_failed_load_with_backoff_and_never_raises(tmp_path):
    from lmloop.serve.follow import AliasFollower, Served

    attempts, installed, events = [], [], []

    def load(path: Path, version: int) -> Served:
        attempts.append(version)
        if len(attempts) == 1:
            raise OSError("disk full")
        return Served(predictor=object(), name=NAME, version=f"v{version}", registry_version=version)

    f = AliasFollower(
        NAME,
        "champion",
        1,
        load=load,
        install=installed.append,
        on_event=lambda kind, detail: events.append(kind),
        interval_s=60,
        say=lambda m: None,
    )
    f._registry = reg = _FakeRegistry(tmp_path)
    assert f.check()["status"] == "current"
    reg.version = 2
    out = f.check()
    assert out["status"] == "load_failed" and "disk full" in out["error"] and f.version == 1
    assert f.check()["status"] == "retry_later" and attempts == [2]  # backing off: not loaded again
    out = f.check(force=True)  # an operator's reload does not wait for the back-off
    assert out == {"status": "swapped", "version": 2, "from": 1, "load_seconds": out["load_seconds"]}
    assert [s.version for s in installed] == ["v2"] and f.version == 2 and f.last_error is None
    reg.show = lambda name, alias: (_ for _ in ()).throw(ConnectionError("registry down"))
    assert f.check()["status"] == "registry_failed" and f.version == 2
    assert events == ["load_failed", "swapped", "registry_failed"]


def test_batcher_swaps_at_a_batch_boundary():
    """The batch in flight finishes on the old model; the next batch runs on the new one; each request
    learns which model answered it."""
    import asyncio

    import numpy as np

    from lmloop.serve.batcher import MicroBatcher

    started, release = threading.Event(), threading.Event()

    def old(texts, on_rows=None):
        started.set()
        release.wait(10)
        return answer(texts, on_rows, 0.0)

    def new(texts, on_rows=None):
        return answer(texts, on_rows, 1.0)

    def answer(texts, on_rows, value: float):  # as Predictor.predict_proba: rows via on_rows too
        rows = np.full((len(texts), 2), value, dtype=np.float32)
        if on_rows is not None:
            on_rows(np.arange(len(texts)), rows)
        return rows

    async def main():
        b = MicroBatcher(old, max_batch=4, max_wait_ms=0, tag="old")
        first = asyncio.ensure_future(b.submit_tagged(["a"]))
        await asyncio.to_thread(started.wait, 10)
        b.swap(new, "new")  # while "old" is mid-batch
        second = asyncio.ensure_future(b.submit_tagged(["b"]))
        release.set()
        (r1, t1), (r2, t2) = await first, await second
        b.close()
        return r1, t1, r2, t2

    r1, t1, r2, t2 = asyncio.run(main())
    assert t1 == "old" and not r1.any()
    assert t2 == "new" and r2.all()

"""Unit tests of the serving internals that need no HTTP: batch planning, the micro-batcher, the log
writer, and the ASGI fast path through a real app (in-process, httpx ASGI transport)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import numpy as np
import pytest

from lmloop.infer.predictor import plan_batches
from lmloop.serve.batcher import LogWriter, MicroBatcher, QueueFull


def _cost(lengths, plan, overhead):
    return sum(overhead + (e - s) * lengths[s] for s, e in plan)


def _brute_force(lengths, max_batch, overhead):
    n, best = len(lengths), float("inf")
    for cuts in itertools.product([0, 1], repeat=n - 1):
        plan, s = [], 0
        for i, c in enumerate(cuts, start=1):
            if c:
                plan.append((s, i))
                s = i
        plan.append((s, n))
        if all(e - s <= max_batch for s, e in plan):
            best = min(best, _cost(lengths, plan, overhead))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_batches_is_optimal_and_covers_everything(seed):
    rng = np.random.default_rng(seed)
    lengths = sorted(rng.integers(1, 90, size=11).tolist(), reverse=True)
    for max_batch, overhead in [(3, 10), (4, 64), (11, 1), (2, 500)]:
        plan = plan_batches(lengths, max_batch, overhead)
        assert plan[0][0] == 0 and plan[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(plan))  # contiguous, no gaps or overlaps
        assert all(0 < e - s <= max_batch for s, e in plan)
        assert _cost(lengths, plan, overhead) == _brute_force(lengths, max_batch, overhead)


def test_plan_batches_separates_long_from_short():
    # one long text among short ones: padding all to 100 would cost far more than a second pass
    plan = plan_batches([100] + [5] * 31, 32, 64)
    assert plan == [(0, 1), (1, 32)]
    assert plan_batches([], 32) == []


def _run(coro):
    return asyncio.run(coro)


def test_micro_batcher_merges_and_answers_each_request_as_its_rows_finish():
    calls, resolved_during_predict = [], []

    def predict(texts, on_rows):
        calls.append(list(texts))
        out = np.tile(np.array([[0.25, 0.75]], dtype=np.float32), (len(texts), 1))
        # two forward passes: the first covers request 0's texts only
        on_rows(np.array([0, 1]), out[:2])
        time.sleep(0.2)  # the second pass is slow; request 0 must be answered meanwhile
        resolved_during_predict.append(time.perf_counter())
        on_rows(np.arange(2, len(texts)), out[2:])
        return out

    async def main():
        b = MicroBatcher(predict, max_batch=16, max_wait_ms=30)
        t0 = time.perf_counter()
        first = asyncio.ensure_future(b.submit(["a", "b"]))
        rest = [asyncio.ensure_future(b.submit([f"t{i}"])) for i in range(3)]
        r0 = await first
        t_first = time.perf_counter()
        others = await asyncio.gather(*rest)
        b.close()
        return t0, t_first, r0, others

    t0, t_first, r0, others = _run(main())
    assert calls == [["a", "b", "t0", "t1", "t2"]]  # one batch for four concurrent requests
    assert r0.shape == (2, 2) and all(o.shape == (1, 2) for o in others)
    assert t_first < resolved_during_predict[0]  # answered before the batch's last pass finished


def test_micro_batcher_failure_fails_the_batch_not_the_thread():
    n = {"calls": 0}

    def predict(texts, on_rows):
        n["calls"] += 1
        if n["calls"] == 1:
            raise RuntimeError("boom")
        out = np.ones((len(texts), 2), dtype=np.float32) / 2
        on_rows(np.arange(len(texts)), out)
        return out

    async def main():
        b = MicroBatcher(predict, max_batch=4, max_wait_ms=1)
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(["x"])
        ok = await b.submit(["y"])
        b.close()
        return ok

    assert _run(main()).shape == (1, 2)


def test_micro_batcher_bounded_queue_raises_queue_full():
    gate = threading.Event()

    def predict(texts, on_rows):
        gate.wait(5)
        out = np.ones((len(texts), 2), dtype=np.float32) / 2
        on_rows(np.arange(len(texts)), out)
        return out

    async def main():
        b = MicroBatcher(predict, max_batch=1, max_wait_ms=0, max_queue=2)
        first = asyncio.ensure_future(b.submit(["busy"]))  # taken by the worker, which then blocks
        await asyncio.sleep(0.1)
        queued = [asyncio.ensure_future(b.submit([f"q{i}"])) for i in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as e:
            await b.submit(["one too many"])
        assert e.value.retry_after > 0
        gate.set()
        await asyncio.gather(first, *queued)
        b.close()

    _run(main())


class _SlowStore:
    def __init__(self):
        self.batches, self.lock = [], threading.Lock()

    def add_predictions(self, records):
        with self.lock:
            self.batches.append(list(records))


def test_log_writer_batches_and_flush_commits_at_once():
    store = _SlowStore()
    w = LogWriter(store, flush_every=1000, flush_ms=5000)  # would wait 5 s without a flush
    w.add([1, 2])
    w.add([3])
    t = time.perf_counter()
    assert w.flush(timeout=3)
    assert time.perf_counter() - t < 2  # the flush woke the writer instead of waiting out 5 s
    assert sorted(x for b in store.batches for x in b) == [1, 2, 3]
    w.add([4])
    w.close()
    assert sorted(x for b in store.batches for x in b) == [1, 2, 3, 4]  # close commits the rest


def test_log_writer_retries_a_failing_store():
    class Flaky(_SlowStore):
        fails = 2

        def add_predictions(self, records):
            if self.fails:
                self.fails -= 1
                raise OSError("database is restarting")
            super().add_predictions(records)

    store, errors = Flaky(), []
    w = LogWriter(store, flush_ms=1, on_error=errors.append)
    w.add(["r"])
    assert w.flush(timeout=5)
    w.close()
    assert store.batches == [["r"]] and len(errors) == 2


def test_ulid_time_round_trips():
    from lmloop.mlops.predlog import new_prediction_id, ulid_time

    now = time.time()
    assert abs(ulid_time(new_prediction_id(now)) - now) < 0.002
    assert ulid_time("nope") is None and ulid_time("!" * 26) is None


# ------------------------------------------------------------------------- the app, in-process (ASGI)
@pytest.fixture
def app_factory(tiny_model_dir, tmp_path):
    from lmloop.infer import Predictor
    from lmloop.mlops.predlog import open_store
    from lmloop.serve.app import ServeSettings, create_app

    stores = []

    def make(**kw):
        pred = Predictor.from_ref(str(tiny_model_dir), backend="torch")
        store = open_store(f"sqlite:///{tmp_path / f'p{len(stores)}.db'}")
        stores.append(store)
        return create_app(pred, store, ServeSettings(model_name="tiny", model_version="v1", **kw)), store

    yield make
    for s in stores:
        s.close()


def _client_call(app, fn):
    import httpx

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return await fn(c)

    return asyncio.run(main())


def test_fast_path_and_route_agree_and_auth_scope_all_protects_classify(app_factory):
    wrapped, _ = app_factory(api_key="k3y", auth_scope="all")

    async def calls(c):
        no_key = await c.post("/v1/classify", json={"inputs": ["good"]})
        wrong = await c.post("/v1/classify", json={"inputs": ["good"]}, headers={"X-API-Key": "nope"})
        ok = await c.post("/v1/classify", json={"inputs": ["good", "bad"]}, headers={"X-API-Key": "k3y"})
        bearer = await c.post(
            "/v1/classify", content=b'{"inputs": ["x"]}', headers={"Authorization": "Bearer k3y"}
        )
        bad = await c.post("/v1/classify", content=b"{nope", headers={"X-API-Key": "k3y"})
        return no_key, wrong, ok, bearer, bad

    no_key, wrong, ok, bearer, bad = _client_call(wrapped, calls)
    assert no_key.status_code == 401 and wrong.status_code == 401
    assert no_key.json()["error"]["code"] == "unauthorized"
    assert ok.status_code == 200 and bearer.status_code == 200
    body = ok.json()
    assert body["model"] == "tiny" and body["version"] == "v1" and len(body["predictions"]) == 2
    # without a client X-Request-ID the request is named after its first prediction
    assert ok.headers["x-request-id"] == body["predictions"][0]["id"]
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "malformed_json"


def test_feedback_for_a_fresh_id_from_another_replica_waits_for_its_commit(app_factory):
    """Replica B answers feedback for a prediction replica A served a moment ago, once A commits it."""
    from lmloop.mlops.predlog import PredictionRecord

    app, store = app_factory()
    rec = PredictionRecord.new(
        model="tiny", version="v1", text="t", label="LABEL_0", score=0.9, scores={}, latency_ms=1
    )
    threading.Timer(0.3, lambda: store.add_predictions([rec])).start()  # "replica A" commits late

    async def call(c):
        return await c.post("/v1/feedback", json={"prediction_id": rec.id, "label": "LABEL_1"})

    r = _client_call(app, call)
    assert r.status_code == 200, r.text
    assert store.get_feedback(rec.id)[0].label == "LABEL_1"

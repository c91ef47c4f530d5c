"""The prediction log store (lmloop.mlops.predlog) on both backends: SQLite in a tmp file, and a real
PostgreSQL server started for the session by the ``postgres_url`` fixture (those cases skip, saying why,
where PostgreSQL is not installed)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from lmloop.errors import ConfigError
from lmloop.mlops.predlog import (
    FeedbackRecord,
    PostgresStore,
    PredictionRecord,
    SqliteStore,
    hash_text,
    new_prediction_id,
    open_store,
    redact_url,
)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    """A URL to an empty store: a fresh SQLite file, or a fresh schema in the session's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'predictions.db'}"
        return
    import psycopg

    base = request.getfixturevalue("postgres_url")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    # libpq option in the URL: every connection of the store works inside this test's own schema
    yield f"{base}?options=-csearch_path%3D{schema}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def store(store_url):
    with open_store(store_url) as s:
        yield s


def _pred(t: float, *, model: str = "m", text: str | None = "a fine film", label: str = "pos", **kw):
    rec = PredictionRecord.new(
        model=model,
        version="3",
        text=text or "secret text",
        label=label,
        score=0.75,
        scores={"pos": 0.75, "neg": 0.25},
        latency_ms=4.5,
        request_id=kw.pop("request_id", None),
        store_text=text is not None,
    )
    rec.created_at = t
    return rec


# ---------------------------------------------------------------------------------------------- both backends
def test_round_trip_prediction_and_feedback(store):
    rec = _pred(1000.0, request_id="req-1")
    store.add_predictions([rec])
    assert store.get_prediction(rec.id) == rec
    assert store.get_prediction("no-such-id") is None
    assert store.get_feedback(rec.id) == []

    fb = store.add_feedback(FeedbackRecord(rec.id, "neg", comment="wrong", created_at=1001.5))
    assert isinstance(fb.id, int)
    assert fb == FeedbackRecord(rec.id, "neg", comment="wrong", created_at=1001.5, id=fb.id)
    assert store.get_feedback(rec.id) == [fb]


def test_feedback_for_unknown_prediction_raises_key_error(store):
    with pytest.raises(KeyError, match="nope"):
        store.add_feedback(FeedbackRecord("nope", "pos"))
    assert store.counts() == {"predictions": 0, "feedback": 0}
    # the connection is still good after the failed transaction
    rec = _pred(1.0)
    store.add_predictions([rec])
    assert store.add_feedback(FeedbackRecord(rec.id, "pos")).id is not None


def test_add_predictions_is_idempotent(store):
    recs = [_pred(float(i)) for i in range(3)]
    store.add_predictions(recs)
    store.add_predictions(recs[1:] + [_pred(9.0)])  # a retried batch plus one new record
    store.add_predictions([])
    assert store.counts() == {"predictions": 4, "feedback": 0}


def test_iteration_order_and_filters(store):
    # inserted out of order, two models, a created_at tie broken by id
    recs = [_pred(t, model=("a" if i % 2 else "b")) for i, t in enumerate([5.0, 1.0, 3.0, 2.0, 3.0, 4.0])]
    store.add_predictions(recs)
    by_time = sorted(recs, key=lambda r: (r.created_at, r.id))
    assert list(store.iter_predictions()) == by_time
    assert [r.created_at for r in store.iter_predictions(since=2.0, until=4.0)] == [2.0, 3.0, 3.0]
    assert [r.created_at for r in store.iter_predictions(since=4.0)] == [4.0, 5.0]
    assert [r.created_at for r in store.iter_predictions(until=2.0)] == [1.0]
    assert list(store.iter_predictions(model="a")) == [r for r in by_time if r.model == "a"]
    assert list(store.iter_predictions(model="a", since=3.0, until=5.0)) == [
        r for r in by_time if r.model == "a" and 3.0 <= r.created_at < 5.0
    ]
    assert list(store.iter_predictions(model="zzz")) == []


def test_streaming_across_page_boundaries(store):
    # 3 rows share each timestamp, so page edges fall inside ties: the keyset must use (created_at, id)
    recs = [_pred(float(i // 3)) for i in range(20)]
    store.add_predictions(recs)
    want = sorted(recs, key=lambda r: (r.created_at, r.id))
    for batch in (1, 2, 3, 7, 20, 1000):
        assert list(store.iter_predictions(batch=batch)) == want, batch
    assert [p for p, _ in store.iter_predictions(batch=4, with_feedback=True)] == want
    with pytest.raises(ValueError):
        list(store.iter_predictions(batch=0))


def test_writes_while_iterating(store):
    """A paused iterator holds no connection or transaction: writes between pages neither block nor fail."""
    store.add_predictions([_pred(float(i)) for i in range(6)])
    it = store.iter_predictions(batch=2)
    seen = [next(it)]
    for i in range(3):
        rec = _pred(100.0 + i)
        store.add_predictions([rec])
        store.add_feedback(FeedbackRecord(rec.id, "pos"))
        seen.append(next(it))
    seen.extend(it)
    assert [r.created_at for r in seen][:6] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert store.counts() == {"predictions": 9, "feedback": 3}


def test_latest_feedback_wins(store):
    a, b, c = _pred(1.0), _pred(2.0), _pred(3.0)
    store.add_predictions([a, b, c])
    store.add_feedback(FeedbackRecord(a.id, "neg", created_at=50.0))
    last = store.add_feedback(FeedbackRecord(a.id, "pos", created_at=10.0))  # stored later: it wins
    fb_c = store.add_feedback(FeedbackRecord(c.id, "neg"))
    assert [f.label for f in store.get_feedback(a.id)] == ["neg", "pos"]

    pairs = list(store.iter_predictions(with_feedback=True, batch=2))
    assert pairs == [(a, last), (b, None), (c, fb_c)]
    assert list(store.iter_labeled(batch=1)) == [(a, last), (c, fb_c)]
    assert list(store.iter_labeled(since=2.0)) == [(c, fb_c)]
    assert list(store.iter_labeled(model="other")) == []
    assert store.counts() == {"predictions": 3, "feedback": 3}


def test_recent_feedback_newest_first_with_predictions(store):
    a, b = _pred(1.0), _pred(2.0, model="other", label="neg")
    store.add_predictions([a, b])
    f1 = store.add_feedback(FeedbackRecord(a.id, "neg", created_at=5.0))
    f2 = store.add_feedback(FeedbackRecord(b.id, "neg", comment="right", created_at=6.0))
    f3 = store.add_feedback(FeedbackRecord(a.id, "pos", created_at=7.0))
    assert store.recent_feedback(10) == [(f3, a), (f2, b), (f1, a)]
    assert store.recent_feedback(2) == [(f3, a), (f2, b)]
    assert store.recent_feedback(10, model="other") == [(f2, b)]
    assert store.recent_feedback(10, model="none") == []


def test_text_hash_only_privacy(store):
    rec = _pred(1.0, text=None)
    assert rec.text is None and rec.text_hash == hash_text("secret text")
    store.add_predictions([rec])
    got = store.get_prediction(rec.id)
    assert got.text is None and got.text_hash == hash_text("secret text")
    assert got.text_hash == hashlib.sha256(b"secret text").hexdigest()


def test_counts(store):
    assert store.counts() == {"predictions": 0, "feedback": 0}
    recs = [_pred(float(i)) for i in range(5)]
    store.add_predictions(recs)
    for r in recs[:2]:
        store.add_feedback(FeedbackRecord(r.id, "pos"))
    store.add_feedback(FeedbackRecord(recs[0].id, "neg"))
    assert store.counts() == {"predictions": 5, "feedback": 3}


def test_concurrent_writers(store):
    """8 threads write batches and feedback and read at once: no lost rows, no 'database is locked'."""
    threads, batches, per_batch = 8, 6, 5
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(k: int) -> None:
        try:
            start.wait()
            for b in range(batches):
                recs = [_pred(k * 1000.0 + b * per_batch + i, model=f"m{k}") for i in range(per_batch)]
                store.add_predictions(recs)
                store.add_feedback(FeedbackRecord(recs[0].id, "pos"))
                assert store.get_prediction(recs[-1].id) == recs[-1]
            store.counts()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert not errors, errors
    assert store.counts() == {"predictions": threads * batches * per_batch, "feedback": threads * batches}
    for k in range(threads):
        assert len(list(store.iter_predictions(model=f"m{k}", batch=7))) == batches * per_batch


def test_reopen_keeps_rows_and_schema(store_url):
    with open_store(store_url) as s:
        rec = _pred(1.0)
        s.add_predictions([rec])
    with open_store(store_url) as s:
        assert s.get_prediction(rec.id) == rec
    s.close()  # closing twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        s.counts()


# ---------------------------------------------------------------------------------------------- SQLite
def test_sqlite_durability_across_sigkill(tmp_path):
    """Every feedback acknowledged by add_feedback's return survives a kill -9 right after the ACK."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    rec = _pred(1.0)
    with open_store(url) as s:
        s.add_predictions([rec])
    child = (
        "import sys\n"
        "from lmloop.mlops.predlog import open_store, FeedbackRecord\n"
        "s = open_store(sys.argv[1])\n"
        "for i in range(100000):\n"
        "    fb = s.add_feedback(FeedbackRecord(sys.argv[2], f'l{i}'))\n"
        "    print('ACK', fb.id, flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, url, rec.id], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    acked: list[int] = []
    try:
        for line in proc.stdout:
            acked.append(int(line.split()[1]))
            if len(acked) >= 15:
                os.kill(proc.pid, signal.SIGKILL)  # while it is in the middle of the next add_feedback
                break
    finally:
        proc.kill()
        proc.wait(30)
        proc.stdout.close()
    assert len(acked) >= 15, f"child exited early (rc={proc.returncode})"
    with open_store(url) as s:
        stored = {f.id for f in s.get_feedback(rec.id)}
    assert set(acked) <= stored


def test_sqlite_connection_settings(tmp_path):
    with open_store(str(tmp_path / "p.db")) as s:  # a plain path works too
        assert isinstance(s, SqliteStore)
        out = {}

        def probe():
            with s._connection() as conn:
                for pragma in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys"):
                    out[pragma] = conn.execute(f"PRAGMA {pragma}").fetchone()[0]

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        assert out == {"journal_mode": "wal", "synchronous": 2, "busy_timeout": 10000, "foreign_keys": 1}
        with s._connection() as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            version = conn.execute(
                "SELECT version FROM schema_version WHERE component = 'predlog'"
            ).fetchone()
        assert {"schema_version", "predictions", "feedback"} <= tables
        assert {"predictions_created_at", "feedback_prediction_id"} <= indexes
        assert version == (2,)  # 2: the generation columns


def test_sqlite_creates_parent_dir_and_default_home(tmp_path, monkeypatch):
    nested = tmp_path / "a" / "b" / "p.db"
    with open_store(f"sqlite:///{nested}") as s:
        assert s.url == f"sqlite:///{nested}"
    assert nested.is_file()

    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path / "home"))
    with open_store(None) as s:
        assert isinstance(s, SqliteStore) and s.path == tmp_path / "home" / "predictions.db"
    assert (tmp_path / "home" / "predictions.db").is_file()


def test_sqlite_unwritable_path_is_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"cannot open the prediction store sqlite:///.*file/p\.db"):
        open_store(f"sqlite:///{blocker / 'p.db'}")


def test_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    with open_store(url) as s, s._connection() as conn:
        conn.execute("UPDATE schema_version SET version = 99 WHERE component = 'predlog'")
    with pytest.raises(ConfigError, match="schema version 99.*upgrade lmloop"):
        open_store(url)


# ---------------------------------------------------------------------------------------------- URLs, ids
@pytest.mark.parametrize(
    "url, match",
    [
        ("mysql://u:hunter2@h/db", r"unsupported scheme.*sqlite:///.*postgresql://"),
        ("file:///tmp/x.db", "unsupported scheme"),
        ("sqlite://", "SQLite needs a file path"),
        ("sqlite:///:memory:", "SQLite needs a file path"),
    ],
)
def test_bad_url_is_config_error(url, match):
    with pytest.raises(ConfigError, match=match) as err:
        open_store(url)
    assert "hunter2" not in str(err.value)


def test_unreachable_postgres_is_quick_config_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    with pytest.raises(ConfigError) as err:
        open_store(f"postgresql://u:hunter2@127.0.0.1:{port}/x")
    assert time.monotonic() - t < 5
    msg = str(err.value)
    assert msg.startswith(f"could not connect to postgresql://u:***@127.0.0.1:{port}/x: ")
    assert "refused" in msg.lower() and "hunter2" not in msg


def test_postgres_url_variants(postgres_url):
    alias = postgres_url.replace("postgresql://", "postgres://", 1)
    with open_store(alias) as s:
        assert isinstance(s, PostgresStore) and s.url == alias
        assert s.counts()["predictions"] >= 0


def test_redact_url():
    assert redact_url("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("postgres://u:p@ss/w@h/db") == "postgres://u:***@h/db"  # unescaped '@' and '/'
    assert redact_url("postgresql://u@h/db?sslmode=require&password=pw") == (
        "postgresql://u@h/db?sslmode=require&password=***"
    )
    assert redact_url("postgresql://u:pw@h1:5432,h2:5433/db") == "postgresql://u:***@h1:5432,h2:5433/db"
    for same in ("postgresql://u@h/db", "postgresql://h:5432/db", "sqlite:////tmp/p.db", "/tmp/p.db"):
        assert redact_url(same) == same


def test_new_prediction_id_sorts_by_time_and_is_unique():
    ids = [new_prediction_id(1_700_000_000.0 + i / 100) for i in range(200)]
    assert all(len(i) == 26 and i.isalnum() and i.isupper() for i in ids)
    assert ids == sorted(ids)
    assert len({new_prediction_id() for _ in range(10000)}) == 10000

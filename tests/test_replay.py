"""``lmloop replay`` against a real ``lmloop serve`` (a uvicorn subprocess on a loopback port, a tiny
fine-tuned model, a temp SQLite prediction log): the schedule, the summary, and what lands in the log."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from lmloop.mlops.predlog import open_store
from lmloop.netutil import free_port

KEY = f"sk-replay-{uuid.uuid4().hex}"
ROWS, BATCH, RATE = 60, 2, 15.0  # 30 requests over 2 s


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_dir, toy_csv, finetune_confident_tiny) -> Path:
    return finetune_confident_tiny(tmp_path_factory.mktemp("replay-model") / "tiny", tiny_model_dir, toy_csv)


@pytest.fixture
def server(model_dir, tmp_path):
    """A ``lmloop serve`` with an API key and its own prediction log: (url, store url, process)."""
    port, store = free_port(), f"sqlite:///{tmp_path / 'predictions.db'}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", LMLOOP_API_KEY=KEY)
    argv = [sys.executable, "-m", "lmloop", "serve", "--model", str(model_dir), "--backend", "torch"]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*argv, "--port", str(port), "--store", store], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < end, "server not ready:\n" + log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        yield url, store, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def traffic(tmp_path_factory, write_toy_csv) -> Path:
    """60 labelled rows (texts unique, so the log can be joined back to the truth by text)."""
    return write_toy_csv(tmp_path_factory.mktemp("replay-data") / "traffic.csv", n=ROWS, seed=7)


def test_replay_sends_traffic_and_delayed_feedback(server, traffic, tmp_path, cli, monkeypatch):
    url, store_url, proc = server
    monkeypatch.setenv("LMLOOP_API_KEY", KEY)
    out = tmp_path / "replay.json"
    code, stdout, stderr = cli(
        "replay", traffic, "--url", url, "--rate", RATE, "--batch", BATCH, "--concurrency", 8,
        "--feedback-fraction", 0.5, "--feedback-delay", "uniform:0.05:0.3", "--seed", 3,
        "--json", out, "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    s = json.loads(out.read_text())
    assert "latency" in stdout and "feedback" in stdout and str(out) in stdout

    # every request answered; the counts add up
    assert s["rows"] == ROWS and s["interrupted"] is False
    assert s["requests"] == {"sent": ROWS // BATCH, "ok": ROWS // BATCH, "errors": 0, "cancelled": 0}
    assert s["texts"] == {"sent": ROWS, "ok": ROWS} and s["errors_by_status"] == {}
    # the open-loop schedule held: 30 sends spread over ~2 s (loose: a slow, shared machine)
    assert 0.7 * RATE <= s["achieved_rate"] <= 1.3 * RATE, s["achieved_rate"]
    assert s["seconds"] >= (ROWS // BATCH - 1) / RATE * 0.9
    lat = s["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]

    # feedback: exactly round(0.5 x 60) rows, all acknowledged
    fb = s["feedback"]
    assert fb["chosen_rows"] == fb["planned"] == fb["sent"] == fb["ok"] == ROWS // 2
    assert fb["failed"] == fb["dropped"] == 0

    proc.send_signal(signal.SIGTERM)  # a graceful stop commits the prediction log
    assert proc.wait(30) == 0
    with open(traffic, newline="", encoding="utf-8") as f:
        truth = {r["text"]: r["label"] for r in csv.DictReader(f)}
    with open_store(store_url) as store:
        logged = list(store.iter_predictions(with_feedback=True))
    assert sorted(p.text for p, _ in logged) == sorted(truth)  # each text predicted once
    assert all((p.request_id or "").startswith("replay-") for p, _ in logged)
    with_fb = [(p, f) for p, f in logged if f is not None]
    assert len(with_fb) == ROWS // 2
    assert all(f.label == truth[p.text] for p, f in with_fb)
    # client-side accuracy is what the log says, over all answers and over the feedback subset
    acc = s["accuracy"]
    assert acc["labelled"] == ROWS
    assert acc["correct"] == sum(p.label == truth[p.text] for p, _ in logged)
    assert fb["accuracy"] == pytest.approx(sum(p.label == f.label for p, f in with_fb) / len(with_fb))
    assert set(acc["per_domain"]) == {"shop", "film"}
    assert sum(d["n"] for d in acc["per_domain"].values()) == ROWS


def test_unreachable_server_exits_2(traffic, cli):
    port = free_port()  # nothing listens there
    code, _, err = cli("replay", traffic, "--url", f"http://127.0.0.1:{port}", "--quiet")
    assert code == 2
    assert f"cannot reach the server at http://127.0.0.1:{port}" in err and "lmloop serve" in err


def test_bad_column_names_the_column_and_file(traffic, cli):
    code, _, err = cli("replay", traffic, "--label-column", "sentiment", "--quiet")
    assert code == 2
    assert str(traffic) in err and "'sentiment'" in err and "--label-column" in err
    code, _, err = cli("replay", traffic, "--where", "lang=en", "--quiet")
    assert code == 2 and str(traffic) in err and "'lang'" in err


def test_bad_options_exit_2(traffic, cli):
    for args, what in (
        (("--rate", "-1"), "--rate"),
        (("--feedback-fraction", "1.5"), "--feedback-fraction"),
        (("--feedback-delay", "soon"), "--feedback-delay"),
        (("--url", "localhost:8000"), "--url"),
    ):
        code, _, err = cli("replay", traffic, *args, "--quiet")
        assert code == 2 and what in err, (args, err)

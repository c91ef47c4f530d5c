"""Live monitoring, alerts and the /dashboard page of ``lmloop serve``.

* Alerts without a server: a :class:`~lmloop.serve.monitoring.Monitor` over a real SQLite prediction log
  filled with synthetic predictions and feedback at chosen times; thresholds raise and clear, a webhook
  receiver on a loopback port records the POSTs, a dead receiver is retried and counted, never waited for.
* Bad alert files fail at the edge with the file, the line and the key.
* A real ``lmloop serve`` (tiny model carrying a drift reference, ``--alerts``): ``/v1/monitor`` and the
  ``/metrics`` gauges agree, ``/v1/feedback/recent`` needs the key, and headless Chromium (Debian's
  ``chromium`` + ``chromium-driver``, driven by Selenium) renders /dashboard with the API's numbers, asks
  for the key, and round-trips the playground: classify -> label -> feedback button -> in the log.
  Skips, saying what to install, where no browser is available (``.ci/run`` installs one).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from lmloop.config import AlertsConfig, load_alerts
from lmloop.errors import ConfigError
from lmloop.mlops.predlog import FeedbackRecord, PredictionRecord, open_store
from lmloop.netutil import free_port

KEY = f"sk-dash-{uuid.uuid4().hex}"
LABELS = ["negative", "positive"]
MODEL_NAME = "dash-sentiment"
READY_TIMEOUT = 120
_BROWSER_INSTALL = "apt-get install -y chromium chromium-driver; pip install selenium"


# ---------------------------------------------------------------------------------------------- helpers
class Receiver:
    """A webhook receiver on a loopback port: records JSON bodies; answers 500 to the first ``fail``."""

    def __init__(self, fail: int = 0):
        self.events: list[dict] = []
        self.fail = fail
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if rec.fail > 0:
                    rec.fail -= 1
                    self.send_response(500)
                else:
                    rec.events.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 10) -> list[dict]:
        end = time.monotonic() + timeout
        while len(self.events) < n and time.monotonic() < end:
            time.sleep(0.02)
        return self.events

    def close(self):
        self.httpd.shutdown()


def _review(i: int) -> str:
    return f"item {i} was {['great', 'awful', 'fine'][i % 3]} and {['nice', 'bad'][i % 2]}"


def _records(t: float, n: int, *, latency_ms: float, texts=None, version="v1"):
    out = []
    for i in range(n):
        r = PredictionRecord.new(
            model="m",
            version=version,
            text=texts[i] if texts else _review(i * 5 % 200),
            label="positive" if i % 2 == 0 else "negative",
            score=0.9,
            scores={"negative": 0.1, "positive": 0.9},
            latency_ms=latency_ms,
        )
        r.created_at = t + i * 0.01
        out.append(r)
    return out


def _feedback(store, records, wrong_every: int, t: float):
    """Feedback on every record; every ``wrong_every``-th one disagrees with the prediction (0: none)."""
    for i, r in enumerate(records):
        wrong = wrong_every and i % wrong_every == 0
        label = ("negative" if r.label == "positive" else "positive") if wrong else r.label
        store.add_feedback(FeedbackRecord(prediction_id=r.id, label=label, created_at=t + i * 0.01))


def _sample(registry, name: str, **labels) -> float | None:
    return registry.get_sample_value(name, labels or None)


@pytest.fixture
def ref_model_dir(tmp_path) -> Path:
    """A model directory holding only a drift reference built from short review-like texts (no embedder:
    the text-property and label tests alone, so it builds and checks in milliseconds)."""
    from lmloop.mlops.drift import REFERENCE_FILE, build_reference

    texts = [_review(i) for i in range(200)]
    labels = ["positive" if i % 2 == 0 else "negative" for i in range(len(texts))]
    d = tmp_path / "model"
    build_reference(texts, labels=labels).save(d / REFERENCE_FILE)
    return d


# ---------------------------------------------------------------------------------------------- alerts
def test_alerts_raise_and_clear_with_webhook_and_gauges(tmp_path, ref_model_dir):
    from prometheus_client import CollectorRegistry, Counter

    from lmloop.serve.follow import Served
    from lmloop.serve.monitoring import Monitor

    store = open_store(f"sqlite:///{tmp_path / 'p.db'}")
    receiver = Receiver(fail=1)  # the first POST fails: the retry delivers it
    registry = CollectorRegistry()
    requests = Counter("lmloop_requests", "x", ["endpoint", "status"], registry=registry)
    rules = AlertsConfig(
        min_live_accuracy=0.8,
        min_labelled=10,
        max_p99_latency_ms=500,
        max_drift_p=0.01,
        max_error_rate=0.1,
        min_requests=10,
        window="1h",
        drift_interval="1s",
        webhook=receiver.url,
        webhook_retries=2,
    )
    served = Served(SimpleNamespace(labels=LABELS, backend_name="fake"), "m", "v1", None, ref_model_dir)
    said: list[str] = []
    mon = Monitor(
        store,
        rules,
        interval_s=0,
        served=lambda: served,
        requests=requests,
        registry=registry,
        keep_texts=False,
        say=said.append,
        webhook_backoff_s=0.05,
    )
    try:
        t0 = 1_700_000_000.0
        # window 1: 40 predictions, 30% wrong, slow, texts like the reference; 25 requests, 5 answered 503
        a = _records(t0, 40, latency_ms=900)
        store.add_predictions(a)
        _feedback(store, a, wrong_every=3, t=t0 + 1)
        requests.labels("/v1/classify", "200").inc(20)
        requests.labels("/v1/classify", "503").inc(5)
        s1 = mon.tick(now=t0 + 60)
        acc = s1["live_accuracy"]
        assert acc["labelled"] == 40 and acc["correct"] == 26 and acc["accuracy"] == pytest.approx(26 / 40)
        assert acc["low"] < acc["accuracy"] < acc["high"]
        assert s1["traffic"]["predictions"] == 40
        assert s1["drift"]["status"] == "ok", s1["drift"]
        active = {x["name"]: x["active"] for x in s1["alerts"]}
        assert active == {
            "live_accuracy": True,
            "p99_latency": True,
            "error_rate": True,
            "drift": False,
        }, s1["alerts"]
        assert _sample(registry, "lmloop_live_accuracy") == pytest.approx(26 / 40)
        assert _sample(registry, "lmloop_live_accuracy_labelled") == 40
        assert _sample(registry, "lmloop_alert_active", alert="live_accuracy") == 1
        assert _sample(registry, "lmloop_alerts_total", alert="live_accuracy") == 1
        assert _sample(registry, "lmloop_alert_active", alert="drift") == 0
        assert 0.01 < _sample(registry, "lmloop_drift_p_value") <= 1
        assert _sample(registry, "lmloop_error_rate") == pytest.approx(5 / 25)
        events = receiver.wait(3)
        assert sorted((e["event"], e["alert"]) for e in events) == [
            ("raised", "error_rate"),
            ("raised", "live_accuracy"),
            ("raised", "p99_latency"),
        ]
        assert all(e["model"] == "m" and e["version"] == "v1" and e["threshold"] is not None for e in events)

        # window 2 (two hours on): accurate and fast, but the texts are nothing like the reference
        odd = [f"CALL 555-{i:04d} NOW!!! http://x.example/{i} @deals #win {i * 7919}" for i in range(40)]
        b = _records(t0 + 7200, 40, latency_ms=20, texts=odd)
        store.add_predictions(b)
        _feedback(store, b, wrong_every=0, t=t0 + 7201)
        requests.labels("/v1/classify", "200").inc(200)
        s2 = mon.tick(now=t0 + 7260)
        active = {x["name"]: x["active"] for x in s2["alerts"]}
        assert active == {"live_accuracy": False, "p99_latency": False, "error_rate": False, "drift": True}
        assert s2["drift"]["p_value"] < 0.01 and s2["drift"]["status"] == "drifted"
        assert _sample(registry, "lmloop_alert_active", alert="live_accuracy") == 0
        assert _sample(registry, "lmloop_alerts_total", alert="live_accuracy") == 1  # raised once
        assert _sample(registry, "lmloop_alert_active", alert="drift") == 1
        events = receiver.wait(7)
        assert len(events) == 7
        assert sorted((e["event"], e["alert"]) for e in events[3:]) == [
            ("cleared", "error_rate"),
            ("cleared", "live_accuracy"),
            ("cleared", "p99_latency"),
            ("raised", "drift"),
        ]
        mon.close()
        assert mon.webhook.counts == {"sent": 7, "failed": 0, "dropped": 0}
        assert _sample(registry, "lmloop_alert_webhook_posts_total", outcome="sent") == 7
        # transitions are logged, with numbers and names only
        assert sum("alert raised" in m for m in said) == 4 and sum("alert cleared" in m for m in said) == 3
        assert not [m for m in said if "item " in m or "CALL" in m or receiver.url in m]
    finally:
        mon.close()
        receiver.close()
        store.close()


def test_alert_not_judged_on_too_little_data_and_no_reference(tmp_path):
    from prometheus_client import CollectorRegistry, Counter

    from lmloop.serve.follow import Served
    from lmloop.serve.monitoring import Monitor

    store = open_store(f"sqlite:///{tmp_path / 'p.db'}")
    registry = CollectorRegistry()
    requests = Counter("lmloop_requests", "x", ["endpoint", "status"], registry=registry)
    rules = AlertsConfig(min_live_accuracy=0.9, min_labelled=30, max_drift_p=0.01)
    served = Served(SimpleNamespace(labels=LABELS, backend_name="fake"), "m", "v1", None, tmp_path)
    mon = Monitor(
        store,
        rules,
        interval_s=0,
        served=lambda: served,
        requests=requests,
        registry=registry,
        keep_texts=True,
        say=lambda m: None,
    )
    t0 = 1_700_000_000.0
    a = _records(t0, 10, latency_ms=5)
    store.add_predictions(a)
    _feedback(store, a, wrong_every=1, t=t0 + 1)  # all wrong, but only 10 labelled
    s = mon.tick(now=t0 + 30)
    alerts = {x["name"]: x for x in s["alerts"]}
    assert alerts["live_accuracy"]["active"] is False and alerts["live_accuracy"]["judged"] is False
    assert "10 labelled, need 30" in alerts["live_accuracy"]["message"]
    assert s["drift"]["status"] == "no_reference" and "drift_reference.npz" in s["drift"]["detail"]
    assert alerts["drift"]["judged"] is False
    assert s["live_accuracy"]["accuracy"] == 0.0
    json.dumps(s)  # plain JSON (no NaN)
    mon.close()
    store.close()


def test_webhook_never_blocks_and_counts_failures():
    from lmloop.serve.monitoring import Webhook

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outcomes: list[str] = []
    hook = Webhook(
        f"http://127.0.0.1:{port}/x", timeout_s=0.5, retries=2, backoff_s=0.01, on_outcome=outcomes.append
    )
    t = time.perf_counter()
    for i in range(3):
        hook.post({"event": "raised", "n": i})
    assert time.perf_counter() - t < 0.05  # posting only queues
    end = time.monotonic() + 10
    while len(outcomes) < 3 and time.monotonic() < end:
        time.sleep(0.02)
    assert outcomes == ["failed"] * 3 and hook.counts["failed"] == 3
    hook.close()


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("min_live_accuracy: 1.5\n", ["line 1", "'min_live_accuracy'", "[0, 1]"]),
        (
            "window: 1h\nmax_drift: 0.01\n",
            ["line 2", "unknown key 'max_drift'", "did you mean 'max_drift_p'"],
        ),
        ("webhook: ftp://example.com/x\n", ["'webhook'", "http:// or https://"]),
        ("max_p99_latency_ms: fast\n", ["'max_p99_latency_ms' must be float or null"]),
        ("window: soon\n", ["'window'", "duration like 90s"]),
        ("name: r\nalerts:\n  max_drift_p: 2\n", ["line 3", "'alerts.max_drift_p'", "(0, 1)"]),
        ("- a list\n", ["must be a mapping"]),
    ],
)
def test_bad_alert_files_fail_with_file_line_and_key(tmp_path, text, expected):
    p = tmp_path / "alerts.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_alerts(p)
    msg = str(e.value)
    assert str(p) in msg
    for part in expected:
        assert part in msg, msg


def test_alert_files_bare_or_in_a_recipe(tmp_path, cli):
    bare = tmp_path / "a.yaml"
    bare.write_text("min_live_accuracy: 0.8\nmax_drift_p: 0.01\nwebhook: https://hooks.example/x\n")
    a = load_alerts(bare)
    assert (a.min_live_accuracy, a.max_drift_p, a.webhook, a.min_labelled) == (
        0.8,
        0.01,
        "https://hooks.example/x",
        30,
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ntrain: {epochs: 1}\nalerts: {max_p99_latency_ms: 250}\n")
    assert load_alerts(recipe).max_p99_latency_ms == 250
    bad = tmp_path / "bad.yaml"
    bad.write_text("min_labelled: 0\n")
    code, out, err = cli("serve", "--model", str(tmp_path), "--alerts", str(bad))
    assert code == 2 and "min_labelled" in err and str(bad) in err, (code, out, err)
    code, out, err = cli("serve", "--model", str(tmp_path), "--monitor-interval", "-1")
    assert code == 2 and "--monitor-interval" in err


# ---------------------------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def dash_model(tiny_model_dir, tmp_path_factory, labelled_copy) -> Path:
    """The tiny random BERT with human labels and a drift reference (text properties + labels)."""
    from lmloop.mlops.drift import REFERENCE_FILE, build_reference

    out = labelled_copy(tiny_model_dir, tmp_path_factory.mktemp("dash-model") / MODEL_NAME, LABELS)
    texts = [f"the film number {i} was {'great' if i % 2 else 'dull'}" for i in range(200)]
    build_reference(texts, labels=[LABELS[i % 2] for i in range(200)]).save(out / REFERENCE_FILE)
    return out


@pytest.fixture(scope="module")
def server(dash_model, tmp_path_factory, wait_ready):
    """``lmloop serve`` with the key on writes, ``--alerts`` (live accuracy >= 0.99 once 5 are labelled)
    and a monitor interval long enough that only ``/v1/monitor?refresh=1`` makes new snapshots."""
    root = tmp_path_factory.mktemp("dash-server")
    alerts = root / "alerts.yaml"
    alerts.write_text("min_live_accuracy: 0.99\nmin_labelled: 5\nmax_drift_p: 0.001\n")
    port, store = free_port(), f"sqlite:///{root / 'predictions.db'}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", LMLOOP_API_KEY=KEY)
    argv = [sys.executable, "-m", "lmloop", "serve", "--model", str(dash_model), "--backend", "torch"]
    argv += ["--port", str(port), "--store", store, "--monitor-interval", "3600", "--alerts", str(alerts)]
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log, READY_TIMEOUT)
        # traffic: 30 texts like the reference, feedback on 8 (3 of them disagreeing)
        texts = [f"the film number {i} was {'great' if i % 3 else 'dull'}" for i in range(30)]
        preds = httpx.post(url + "/v1/classify", json={"inputs": texts}, timeout=30).json()["predictions"]
        sent = []
        for i, p in enumerate(preds[:8]):
            label = p["label"] if i % 3 else ("negative" if p["label"] == "positive" else "positive")
            r = httpx.post(
                url + "/v1/feedback",
                json={"prediction_id": p["id"], "label": label},
                headers={"X-API-Key": KEY},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            sent.append(p["id"])
        yield SimpleNamespace(url=url, proc=proc, store=store, log=log, feedback_ids=sent)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _snapshot(url: str) -> dict:
    r = httpx.get(url + "/v1/monitor", params={"refresh": "1"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_monitor_endpoint_metrics_and_auth(server):
    from prometheus_client.parser import text_string_to_metric_families

    snap = _snapshot(server.url)
    assert snap["model"]["name"] == MODEL_NAME
    assert snap["traffic"]["predictions"] == 30 and snap["traffic"]["requests"] == 1
    acc = snap["live_accuracy"]
    assert acc["labelled"] == 8 and acc["correct"] == 5 and acc["accuracy"] == pytest.approx(5 / 8)
    assert snap["drift"]["status"] in ("ok", "drifted") and snap["drift"]["n_current"] == 30
    alerts = {a["name"]: a for a in snap["alerts"]}
    assert alerts["live_accuracy"]["active"] is True
    assert "webhook" not in snap["thresholds"]
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}

    def val(name, sample=None, **labels):
        return next(
            s.value
            for s in fams[name].samples
            if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert val("lmloop_live_accuracy") == pytest.approx(5 / 8)
    assert val("lmloop_live_accuracy_labelled") == 8
    assert val("lmloop_alert_active", alert="live_accuracy") == 1
    assert val("lmloop_alerts", "lmloop_alerts_total", alert="live_accuracy") == 1
    assert val("lmloop_drift_p_value") == pytest.approx(snap["drift"]["p_value"])
    assert "lmloop_drift_mmd" in fams  # NaN: this reference has no embeddings
    # recent feedback holds texts: the key, like the writes; the page and the snapshot do not need it
    assert httpx.get(server.url + "/v1/feedback/recent").status_code == 401
    r = httpx.get(server.url + "/v1/feedback/recent", params={"limit": 3}, headers={"X-API-Key": KEY})
    assert r.status_code == 200
    rows = r.json()["data"]
    assert [x["prediction_id"] for x in rows] == server.feedback_ids[::-1][:3]
    assert rows[0]["text"].startswith("the film number") and rows[0]["predicted"] in LABELS
    assert (
        httpx.get(
            server.url + "/v1/feedback/recent", params={"limit": 0}, headers={"X-API-Key": KEY}
        ).status_code
        == 422
    )
    page = httpx.get(server.url + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http://" not in page.text.replace("http://www.w3.org/2000/svg", "")  # nothing from elsewhere
    assert KEY not in server.log.read_text()


# ---------------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Selenium and the system chromedriver; skips naming what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(f"selenium is not installed ({_BROWSER_INSTALL})")
    binary = next(
        (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    driver_path = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if Path(p).is_file()), None
    )
    if binary is None or driver_path is None:
        pytest.skip(
            f"no headless browser: chromium {binary or 'missing'}, chromedriver {driver_path or 'missing'} ({_BROWSER_INSTALL})"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,2000",
    ):
        opts.add_argument(a)
    try:
        driver = webdriver.Chrome(options=opts, service=Service(driver_path))
    except Exception as e:  # e.g. a chromedriver whose version does not match the browser
        pytest.skip(f"headless Chromium did not start ({type(e).__name__}: {str(e)[:300]})")
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, cond, timeout: float = 30, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(cond, message=what)


def _fmt(x: float | None, d: int) -> str:
    return "—" if x is None else f"{x:.{d}f}"


def test_dashboard_renders_the_apis_numbers_and_the_playground_round_trips(server, browser):
    from selenium.webdriver.common.by import By

    snap = _snapshot(server.url)  # the page reads this snapshot (the monitor thread sleeps for an hour)
    model = httpx.get(server.url + "/v1/models").json()["data"][0]
    d = browser
    d.get(server.url + "/dashboard")
    _wait(
        d, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "1", what="page load"
    )
    text = lambda id_: d.find_element(By.ID, id_).text  # noqa: E731
    assert text("model-name") == MODEL_NAME and text("model-version") == model["version"]
    assert float(d.find_element(By.ID, "generated").get_attribute("data-t")) == snap["generated_at"]
    assert text("m-predictions") == str(snap["traffic"]["predictions"]) == "30"
    assert text("m-requests") == str(snap["traffic"]["requests"])
    acc = snap["live_accuracy"]
    assert text("m-accuracy") == _fmt(acc["accuracy"], 3) == "0.625"
    assert text("m-labelled") == str(acc["labelled"]) == "8"
    assert text("m-ci") == f"{acc['low']:.3f}–{acc['high']:.3f}"
    assert text("m-coverage") == f"{100 * acc['coverage']:.1f}%"
    assert text("m-p99") == _fmt(snap["latency_ms"]["p99"], 1)
    assert text("drift-status") == snap["drift"]["status"].replace("_", " ")
    alert = d.find_element(By.CSS_SELECTOR, '[data-alert="live_accuracy"]')
    assert alert.get_attribute("data-active") == "true" and "ACTIVE" in alert.text
    assert f"local model {MODEL_NAME}" in text("registry")
    # recent feedback needs the key: the page asks for it, keeps it in this tab, then lists the feedback
    _wait(d, lambda d: d.find_element(By.ID, "key-box").is_displayed(), what="key prompt")
    d.find_element(By.ID, "key-input").send_keys(KEY)
    d.find_element(By.ID, "key-save").click()
    _wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#feedback-rows tr")) == 8, what="feedback rows")
    rows = d.find_elements(By.CSS_SELECTOR, "#feedback-rows tr")
    assert [r.get_attribute("data-prediction") for r in rows] == server.feedback_ids[::-1]
    assert d.execute_script("return sessionStorage.getItem('lmloop_api_key')") == KEY
    assert KEY not in d.current_url and KEY not in d.page_source

    # playground: classify -> label and scores -> feedback button -> stored in the prediction log
    d.find_element(By.ID, "play-text").send_keys("what a wonderful little film")
    d.find_element(By.ID, "play-go").click()
    _wait(d, lambda d: d.find_element(By.ID, "play-label").text in LABELS, what="playground label")
    pid = d.find_element(By.ID, "play-out").get_attribute("data-prediction")
    assert pid and all(lab in text("play-scores") for lab in LABELS)
    predicted = text("play-label")
    truth = "negative" if predicted == "positive" else "positive"
    d.find_element(By.CSS_SELECTOR, f'.fb-btn[data-label="{truth}"]').click()
    _wait(
        d, lambda d: d.find_element(By.ID, "fb-status").get_attribute("data-done") == truth, what="feedback"
    )
    with open_store(server.store) as store:
        fb = store.get_feedback(pid)
        assert [f.label for f in fb] == [truth]
        assert store.get_prediction(pid).label == predicted
    _wait(
        d,
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, "#feedback-rows tr")[0].get_attribute("data-prediction") == pid
        ),
        what="the new feedback listed first",
    )
    # and the API agrees once the monitor looks again
    time.sleep(1.05)  # refresh is honoured at most once a second
    snap2 = _snapshot(server.url)
    assert snap2["traffic"]["predictions"] == 31 and snap2["live_accuracy"]["labelled"] == 9
    d.find_element(By.ID, "refresh").click()
    _wait(d, lambda d: text("m-predictions") == "31", what="refreshed numbers")
    assert text("m-labelled") == "9"

"""Monitoring (lmloop.mlops.monitor and `lmloop monitor`): a prediction log written through the real store
API with chosen times, then counts per window, latency percentiles, the accuracy and its Wilson interval
against hand-computed values, coverage, label shares, --since filtering, and the CLI's report and errors."""

from __future__ import annotations

import json
import math
import re
import uuid

import pytest

from lmloop.errors import ConfigError
from lmloop.mlops import monitor
from lmloop.mlops.predlog import FeedbackRecord, PredictionRecord, hash_text, new_prediction_id, open_store

H = 3600.0
T0 = 472_300 * H  # 2023-11-18 04:00 UTC: a whole hour, so window k is [T0 + k h, T0 + (k+1) h)


def _rec(t, label, *, model="m", version="1", score=0.8, latency=5.0, request_id=None) -> PredictionRecord:
    # PredictionRecord.new stamps "now"; built by hand, a record carries the time (and a ULID of it) we choose
    return PredictionRecord(
        id=new_prediction_id(t),
        created_at=t,
        model=model,
        version=version,
        text=None,
        text_hash=hash_text(f"{t} {label}"),
        label=label,
        score=score,
        scores={label: score},
        latency_ms=latency,
        request_id=request_id,
    )


def _fill(store) -> None:
    """m/1: window 0 (4 predictions in 3 requests, 2 labelled, 1 right), window 1 empty, window 2 (10
    predictions, 8 labelled, 6 right); m/2: 2 predictions in window 2; other/1: 1 prediction in window 0."""
    w0 = [
        _rec(T0 + 10, "pos", score=0.9, latency=10.0, request_id="a"),
        _rec(T0 + 10.001, "pos", score=0.8, latency=10.0, request_id="a"),  # same request: counted once
        _rec(T0 + 20, "neg", score=0.6, latency=30.0, request_id="b"),
        _rec(T0 + 30, "pos", score=0.7, latency=20.0),  # no request id: its own request
    ]
    w2 = [
        _rec(
            T0 + 2 * H + i,
            "pos" if i < 6 else "neg",
            score=0.55 + 0.04 * i,
            latency=i + 1.0,
            request_id=f"r{i}",
        )
        for i in range(10)
    ]
    v2 = [_rec(T0 + 2 * H + 100 + i, "neg", version="2", request_id=f"v2-{i}") for i in range(2)]
    other = [_rec(T0 + 40, "pos", model="other")]
    store.add_predictions(w0 + w2 + v2 + other)
    fb = [
        (w0[0], "neg"),  # superseded below: the latest feedback counts
        (w0[0], "pos"),  # right
        (w0[2], "pos"),  # wrong (predicted neg)
        *[(w2[i], "pos") for i in range(5)],  # 5 right
        (w2[6], "neg"),  # right
        (w2[7], "pos"),  # wrong
        (w2[5], "neg"),  # wrong -> 6 of 8 right
        (v2[0], "neg"),
    ]
    for k, (p, label) in enumerate(fb):
        store.add_feedback(FeedbackRecord(p.id, label, created_at=p.created_at + 60 + k))


@pytest.fixture
def log_path(tmp_path):
    path = tmp_path / "predictions.db"
    with open_store(f"sqlite:///{path}") as store:
        _fill(store)
    return path


def _version(summary, model="m", version="1"):
    (v,) = [v for v in summary.versions if (v.model, v.version) == (model, version)]
    return v


# ---------------------------------------------------------------------------------------------- statistics
def test_wilson_interval_matches_hand_computed_values():
    # 6/8: p = 0.75, z^2/n = 0.4802; centre 0.6689, half-width 0.2596
    lo, hi = monitor.wilson_interval(6, 8)
    assert lo == pytest.approx(0.40927, abs=1e-4) and hi == pytest.approx(0.92853, abs=1e-4)
    assert monitor.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert monitor.wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)
    assert monitor.wilson_interval(0, 0) == (0.0, 1.0)


def test_macro_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    y = ["a"] * 7 + ["b"] * 5 + ["c"] * 3 + ["d"]
    p = ["a"] * 5 + ["b", "c"] + ["b"] * 3 + ["a", "a"] + ["c", "a", "c"] + ["a"]
    conf: dict = {}
    for t, q in zip(y, p, strict=True):
        conf.setdefault(t, {}).setdefault(q, 0)
        conf[t][q] += 1
    assert monitor.macro_f1(conf) == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    assert monitor.macro_f1({}) is None


def test_quantiles_exact_then_bucketed():
    import numpy as np

    rng = np.random.default_rng(0)
    xs = rng.lognormal(3.0, 1.0, 5000)
    exact, bucketed = monitor._Quantiles(), monitor._Quantiles(cap=100)
    for x in xs:
        exact.add(float(x))
        bucketed.add(float(x))
    e, b = exact.result(), bucketed.result()
    assert e.exact and not b.exact and e.n == b.n == 5000
    for q, got_e, got_b in ((50, e.p50, b.p50), (90, e.p90, b.p90), (99, e.p99, b.p99)):
        want = float(np.percentile(xs, q))
        assert got_e == pytest.approx(want, rel=1e-9)
        assert got_b == pytest.approx(want, rel=0.01)  # 0.5% buckets, plus the rank's interpolation
    assert b.max == e.max == pytest.approx(xs.max())


@pytest.mark.parametrize(
    "text, want",
    [
        ("24h", T0 - 24 * H),
        ("7d", T0 - 7 * 24 * H),
        ("30m", T0 - 1800),
        ("now", T0),
        ("2023-11-18T04:00:00Z", T0),
        ("2023-11-18T05:00:00+01:00", T0),
        ("2023-11-18 04:00", T0),  # no zone: UTC
        ("2023-11-18", T0 - 4 * H),
        (T0 + 1, T0 + 1),
    ],
)
def test_parse_time(text, want):
    assert monitor.parse_time(text, now=T0) == pytest.approx(want)


@pytest.mark.parametrize("bad", ["3x", "yesterday", "24 hours", "-1h", "2023-13-01"])
def test_parse_time_rejects_with_a_clear_message(bad):
    with pytest.raises(ConfigError, match=r"--since .*expected an ISO time .* 24h, 7d"):
        monitor.parse_time(bad, now=T0)


def test_parse_duration():
    assert monitor.parse_duration("15m") == 900 and monitor.parse_duration("1d") == 86400
    for bad in ("0h", "h", "1y", "-5m"):
        with pytest.raises(ConfigError, match="--window"):
            monitor.parse_duration(bad)


# ---------------------------------------------------------------------------------------------- summarize
def test_counts_latency_labels_and_gaps_per_window(log_path):
    s = monitor.summarize(log_path, window="1h", now=T0 + 3 * H)
    assert [(v.model, v.version) for v in s.versions] == [("m", "1"), ("other", "1"), ("m", "2")]
    v = _version(s)
    assert [w.start for w in v.windows] == [T0, T0 + H, T0 + 2 * H]  # the empty hour is kept, as zeros
    w0, w1, w2 = (w.stats for w in v.windows)
    assert (w0.predictions, w0.requests) == (4, 3)
    assert (w1.predictions, w1.requests, w1.latency, w1.accuracy) == (0, 0, None, None)
    assert (w2.predictions, w2.requests) == (10, 10)
    # latency over requests, each once: window 0 has 10 (request a, 2 texts), 30, 20
    assert (w0.latency.p50, w0.latency.mean, w0.latency.max, w0.latency.n) == (20.0, 20.0, 30.0, 3)
    # 1..10 ms: numpy's linear percentiles
    assert (w2.latency.p50, w2.latency.p90, w2.latency.p99) == pytest.approx((5.5, 9.1, 9.91))
    assert w0.labels == {"neg": 1, "pos": 3} and w2.labels == {"neg": 4, "pos": 6}
    assert w0.score_mean == pytest.approx(0.75)
    assert w0.score_hist[monitor.SCORE_BINS * 9 // 10] == 1 and sum(w0.score_hist) == 4
    assert v.total.predictions == 14 and v.total.requests == 13
    assert v.total.labels == {"neg": 5, "pos": 9}
    assert s.total.predictions == 17
    assert s.drift is None


def test_live_accuracy_wilson_and_coverage(log_path):
    s = monitor.summarize(log_path, window="1h", now=T0 + 3 * H)
    v = _version(s)
    w0, _, w2 = (w.stats for w in v.windows)
    # window 0: the latest feedback of w0[0] is "pos" (right); w0[2] was wrong
    assert (w0.labelled, w0.correct, w0.accuracy, w0.coverage) == (2, 1, 0.5, 0.5)
    assert (w2.labelled, w2.correct, w2.accuracy, w2.coverage) == (8, 6, 0.75, 0.8)
    assert (w2.accuracy_low, w2.accuracy_high) == pytest.approx((0.40927, 0.92853), abs=1e-4)
    assert w2.confusion == {"neg": {"neg": 1, "pos": 1}, "pos": {"neg": 1, "pos": 5}}
    assert w2.macro_f1 is None  # 8 < MIN_LABELS_F1
    t = v.total
    assert (t.labelled, t.correct, t.coverage) == (10, 7, pytest.approx(10 / 14))
    assert (t.accuracy_low, t.accuracy_high) == pytest.approx(monitor.wilson_interval(7, 10))
    v2 = _version(s, version="2").total
    assert (v2.labelled, v2.accuracy, v2.coverage) == (1, 1.0, 0.5)


def test_macro_f1_appears_with_enough_labels(tmp_path):
    with open_store(tmp_path / "p.db") as store:
        recs = [_rec(T0 + i, "pos" if i % 3 else "neg") for i in range(monitor.MIN_LABELS_F1)]
        store.add_predictions(recs)
        for i, r in enumerate(recs):
            store.add_feedback(FeedbackRecord(r.id, "pos" if i % 2 else "neg"))
        s = monitor.summarize(store, window="1d")
    t = s.versions[0].total
    assert t.labelled == monitor.MIN_LABELS_F1
    assert t.macro_f1 == pytest.approx(monitor.macro_f1(t.confusion)) and t.macro_f1 is not None


def test_since_until_and_model_filters(log_path):
    s = monitor.summarize(log_path, since=T0 + 2 * H, window="1h")
    assert {(v.model, v.version) for v in s.versions} == {("m", "1"), ("m", "2")}
    assert [w.start for w in _version(s).windows] == [T0 + 2 * H]
    # relative: 90 minutes before "now" = T0 + 3h is T0 + 1.5h
    s = monitor.summarize(log_path, since="90m", window="1h", now=T0 + 3 * H)
    assert s.since == T0 + 1.5 * H and s.total.predictions == 12
    s = monitor.summarize(log_path, until="2023-11-18T05:00Z", window="1h")
    assert s.total.predictions == 5 and s.until == T0 + H
    s = monitor.summarize(log_path, model="other", window="1h")
    assert [(v.model, v.version) for v in s.versions] == [("other", "1")]
    with pytest.raises(ConfigError, match="must be before --until"):
        monitor.summarize(log_path, since=T0 + H, until=T0)
    with pytest.raises(ConfigError, match="larger --window"):
        monitor.summarize(log_path, window="0.1s")  # 2 h of log in 0.1 s windows


def test_missing_sqlite_log_is_an_error_not_an_empty_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "predictions.db"))):
        monitor.summarize(None)  # the serve default
    assert not (tmp_path / "predictions.db").exists()


def test_empty_range_and_json(log_path):
    s = monitor.summarize(log_path, since=T0 + 10 * H, until=T0 + 11 * H)
    assert s.versions == [] and s.total.predictions == 0
    assert "no predictions in this range" in monitor.format_summary(s)
    d = json.loads(json.dumps(monitor.summarize(log_path).to_dict(), allow_nan=False))
    assert d["total"]["predictions"] == 17 and d["drift"] is None


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_report_writes_a_self_contained_html(cli, log_path, tmp_path):
    out = tmp_path / "r" / "monitor.html"
    code, stdout, err = cli("monitor", "report", "--store", log_path, "--window", "1h", "--out", out)
    assert code == 0, err
    assert f"report: {out}" in stdout and "m/1" in stdout
    html = out.read_text()
    for section in ("summary", "traffic", "latency", "labels", "confidence", "accuracy", "drift", "windows"):
        assert f'<section id="{section}">' in html, section
    assert html.count("data:image/png;base64,") == 5
    assert not re.search(r"""(src|href)=["']?https?:""", html)  # self-contained
    assert "Not computed yet" in html  # the drift placeholder
    assert "0.750 [0.409, 0.929]" in html  # window 2's live accuracy and interval


def test_cli_summary_table_and_json(cli, log_path):
    code, out, err = cli("monitor", "summary", "--store", f"sqlite:///{log_path}", "--window", "1h")
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.startswith("m/1 ") and " 14 " in line for line in lines)
    assert any("2023-11-18 06:00Z" in line and "0.750 [0.409, 0.929]" in line for line in lines)
    code, out, err = cli("monitor", "summary", "--store", log_path, "--json", "--model", "m")
    assert code == 0, err
    d = json.loads(out)
    assert [v["version"] for v in d["versions"]] == ["1", "2"] and d["total"]["labelled"] == 11


def test_cli_bad_since_exits_2_with_a_clear_message(cli, log_path, tmp_path):
    out = tmp_path / "never.html"
    code, stdout, err = cli("monitor", "report", "--store", log_path, "--since", "3x", "--out", out)
    assert code == 2 and not out.exists()
    assert "lmloop monitor: error: --since '3x': expected an ISO time" in err and "Traceback" not in err
    code, _, err = cli("monitor", "summary", "--store", log_path, "--window", "soon")
    assert code == 2 and "--window 'soon'" in err


def test_cli_help_teaches(cli, capsys):
    with pytest.raises(SystemExit) as ei:
        cli("monitor", "report", "--help")
    assert ei.value.code == 0
    text = capsys.readouterr().out
    assert "lmloop monitor report --since 7d --window 1d --out monitor.html" in text
    assert "Wilson 95%" in text and "$LMLOOP_HOME/predictions.db" in text


# ---------------------------------------------------------------------------------------------- PostgreSQL
def test_postgres_gives_the_same_summary(postgres_url, log_path):
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        with open_store(f"{postgres_url}?options=-csearch_path%3D{schema}") as store:
            _fill(store)
            pg = monitor.summarize(store, window="1h", now=T0).to_dict()
        lite = monitor.summarize(log_path, window="1h", now=T0).to_dict()
        pg.pop("store"), lite.pop("store")
        assert pg == lite
        assert not math.isnan(pg["total"]["score_mean"])
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")

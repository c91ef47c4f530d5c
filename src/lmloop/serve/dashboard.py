"""``GET /dashboard``: one self-contained page (inline CSS and JS, hand-drawn SVG; nothing from a CDN)
over the server's own JSON endpoints, plus the two read endpoints it needs:

    GET /v1/monitor            the latest monitoring snapshot (:class:`lmloop.serve.monitoring.Monitor`):
                               model, traffic, latency, live accuracy with its interval, drift, alerts,
                               registry versions and aliases; ``?refresh=1`` computes a fresh one
    GET /v1/feedback/recent    ``?limit=N`` (1..200, default 20) the latest feedback with its predictions;
                               the texts are there when the log keeps them, so it needs the API key like
                               the write endpoints

The page asks for the key only when an endpoint answers 401, and keeps it in ``sessionStorage`` (this tab
only; never in a cookie, a URL or the page). It shows the served model and version, the registry's
versions and aliases, live metrics, drift, active alerts, recent feedback, and a playground: a text ->
``POST /v1/classify`` -> label and scores -> one button per label -> ``POST /v1/feedback`` with the
returned prediction id.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import Depends, FastAPI
from fastapi.responses import Response

MAX_RECENT = 200


def add_routes(app: FastAPI, monitor, store, require_key, served, json_response, api_error) -> None:
    """Mount /dashboard, /v1/monitor and /v1/feedback/recent on ``app``. ``served()`` is the live model;
    ``require_key`` the server's key dependency; ``json_response`` / ``api_error`` its JSON helpers."""
    from lmloop.serve.monitoring import recent_feedback

    last_refresh = {"t": 0.0}

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard():
        return Response(
            PAGE,
            media_type="text/html; charset=utf-8",
            headers={
                # inline script and style only; requests go to this server alone
                "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-store",
            },
        )

    @app.get("/v1/monitor")
    async def monitor_snapshot(refresh: bool = False):
        """The latest monitoring snapshot (aggregates only, no texts): what /dashboard shows.
        ``refresh=true`` computes a fresh one (at most once a second)."""
        now = time.monotonic()
        force = refresh and now - last_refresh["t"] >= 1.0
        if force:
            last_refresh["t"] = now
        snap = await asyncio.to_thread(monitor.snapshot, force)
        return json_response(snap)

    @app.get("/v1/feedback/recent", dependencies=[Depends(require_key)])
    async def feedback_recent(limit: int = 20):
        """The latest feedback (newest first) with the predictions it labels. Needs the API key when one
        is set: the texts are included where the prediction log keeps them."""
        if not 1 <= limit <= MAX_RECENT:
            raise api_error(422, "invalid_request", f"limit must be in [1, {MAX_RECENT}], got {limit}")
        rows = await asyncio.to_thread(recent_feedback, store, limit, served().name)
        return json_response({"data": rows})


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmloop dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
:root{--fg:#1d2330;--mut:#6b7280;--bd:#e3e6ec;--bg:#f6f7f9;--ok:#0f7b3f;--bad:#b42318;--acc:#2f5bd3}
*{box-sizing:border-box}body{margin:0;font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{padding:14px 22px;background:#fff;border-bottom:1px solid var(--bd);display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}header .v{font-family:ui-monospace,monospace;color:var(--mut)}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:14px;padding:14px 22px}
section{background:#fff;border:1px solid var(--bd);border-radius:8px;padding:12px 14px}
section h2{font-size:13px;text-transform:uppercase;letter-spacing:.04em;color:var(--mut);margin:0 0 8px}
.big{font-size:26px;font-weight:600}.mut{color:var(--mut)}.kv{display:grid;grid-template-columns:auto 1fr;gap:2px 12px}
.kv dt{color:var(--mut)}.kv dd{margin:0;font-variant-numeric:tabular-nums}
table{border-collapse:collapse;width:100%;font-size:13px}td,th{padding:3px 6px;border-bottom:1px solid var(--bd);text-align:left}
th{color:var(--mut);font-weight:500}.mono{font-family:ui-monospace,monospace;font-size:12px}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;background:#eef1f6}
.pill.ok{background:#e3f4ea;color:var(--ok)}.pill.bad{background:#fde8e6;color:var(--bad)}
textarea{width:100%;min-height:70px;font:inherit;padding:6px;border:1px solid var(--bd);border-radius:6px}
button{font:inherit;padding:5px 12px;border:1px solid var(--acc);background:var(--acc);color:#fff;border-radius:6px;cursor:pointer}
button.sec{background:#fff;color:var(--acc)}input{font:inherit;padding:4px 6px;border:1px solid var(--bd);border-radius:6px}
.wide{grid-column:1/-1}svg{display:block;width:100%;height:90px}.err{color:var(--bad)}
#key-box{display:none;background:#fff8e5;border-bottom:1px solid #f1d48a;padding:8px 22px}
</style></head>
<body>
<header><h1 id="model-name">…</h1><span class="v" id="model-version"></span><span class="mut" id="model-backend"></span>
<span class="mut">window <span id="window"></span> · updated <span id="generated"></span></span>
<button class="sec" id="refresh">refresh</button></header>
<div id="key-box">This needs the server's API key (kept in this tab only):
<input type="password" id="key-input" autocomplete="off" placeholder="API key"> <button id="key-save">use key</button>
<span class="err" id="key-msg"></span></div>
<main>
<section><h2>Traffic</h2><div class="big" id="m-predictions">—</div><div class="mut">predictions in the window
(<span id="m-requests">—</span> requests)</div><div id="m-labels" class="mut"></div><svg id="chart-traffic" viewBox="0 0 300 90" preserveAspectRatio="none"></svg></section>
<section><h2>Latency (request, ms)</h2><dl class="kv"><dt>p50</dt><dd id="m-p50">—</dd><dt>p90</dt><dd id="m-p90">—</dd>
<dt>p99</dt><dd id="m-p99">—</dd><dt>errors / refused</dt><dd id="m-rates">—</dd></dl></section>
<section><h2>Live accuracy (served version)</h2><div class="big" id="m-accuracy">—</div>
<div class="mut">95% CI <span id="m-ci">—</span> · <span id="m-labelled">0</span> labelled · coverage <span id="m-coverage">—</span></div>
<svg id="chart-accuracy" viewBox="0 0 300 90" preserveAspectRatio="none"></svg></section>
<section><h2>Drift</h2><div><span class="pill" id="drift-status">—</span></div><dl class="kv"><dt>p-value</dt><dd id="drift-p">—</dd>
<dt>MMD²</dt><dd id="drift-mmd">—</dd></dl><div class="mut" id="drift-detail"></div></section>
<section><h2>Alerts</h2><div id="alerts" class="mut">none configured</div></section>
<section><h2>Models</h2><div id="registry"></div></section>
<section class="wide"><h2>Playground</h2><textarea id="play-text" placeholder="type a text to classify"></textarea>
<div style="margin:6px 0"><button id="play-go">classify</button> <span class="err" id="play-err"></span></div>
<div id="play-out" style="display:none">label <b id="play-label"></b> <span class="mono mut" id="play-id"></span>
<div id="play-scores" class="mono"></div><div style="margin-top:6px">the true label is:
<span id="fb-buttons"></span> <span id="fb-status"></span></div></div></section>
<section class="wide"><h2>Recent feedback</h2><div id="feedback-msg" class="mut"></div>
<table><thead><tr><th>time</th><th>prediction</th><th>predicted</th><th>true</th><th>version</th><th>text</th></tr></thead>
<tbody id="feedback-rows"></tbody></table></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const KEY = "lmloop_api_key";
let pending = null;  // what to retry once a key is given
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}
const fix = (x, d) => (x === null || x === undefined) ? "—" : Number(x).toFixed(d);
const pct = (x) => (x === null || x === undefined) ? "—" : (100 * x).toFixed(1) + "%";
const when = (t) => t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z" : "—";
function setText(id, v) { $(id).textContent = v; }
async function api(path, opts) {
  opts = opts || {};
  const headers = Object.assign({}, opts.headers || {});
  const key = sessionStorage.getItem(KEY);
  if (key) headers["X-API-Key"] = key;
  const r = await fetch(path, Object.assign({}, opts, {headers}));
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (r.status === 401) { const err = new Error("needs the API key"); err.status = 401; throw err; }
  if (!r.ok) { const err = new Error((body && body.error && body.error.message) || ("HTTP " + r.status)); err.status = r.status; throw err; }
  return body;
}
function askKey(retry, msg) {
  pending = retry; $("key-box").style.display = "block"; setText("key-msg", msg || ""); $("key-input").focus();
}
$("key-save").onclick = () => {
  const v = $("key-input").value.trim();
  if (!v) return;
  sessionStorage.setItem(KEY, v); $("key-input").value = ""; $("key-box").style.display = "none";
  const p = pending; pending = null; if (p) p();
};
function spark(svg, values, band) {
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg", W = 300, H = 90, n = values.length;
  if (!n) return;
  const max = Math.max(1e-9, ...values.filter((v) => v !== null), ...(band ? [1] : []));
  const x = (i) => n === 1 ? W / 2 : 4 + i * (W - 8) / (n - 1), y = (v) => H - 4 - (H - 8) * v / max;
  const mk = (tag, a) => { const e = document.createElementNS(ns, tag); for (const k in a) e.setAttribute(k, a[k]); svg.append(e); return e; };
  if (band) {
    const pts = band.map((b, i) => b ? [x(i), y(b[1])] : null).filter(Boolean)
      .concat(band.map((b, i) => b ? [x(i), y(b[0])] : null).filter(Boolean).reverse());
    if (pts.length) mk("polygon", {points: pts.map((p) => p.join(",")).join(" "), fill: "#dbe4fb"});
  }
  const segs = values.map((v, i) => v === null ? null : x(i) + "," + y(v)).filter(Boolean);
  if (band && segs.length === 1) { const [cx, cy] = segs[0].split(","); mk("circle", {cx, cy, r: 4, fill: "#2f5bd3"}); }
  else if (band) mk("polyline", {points: segs.join(" "), fill: "none", stroke: "#2f5bd3", "stroke-width": 2});
  else values.forEach((v, i) => { if (v) mk("rect", {x: x(i) - 8, y: y(v), width: 16, height: H - 4 - y(v), fill: "#2f5bd3"}); });
}
function renderModel(m) {
  const d = m.data[0];
  setText("model-name", d.id); setText("model-version", d.version); setText("model-backend", "backend " + d.backend);
  window.LABELS = d.labels;
}
function renderMonitor(s) {
  setText("window", s.window); setText("generated", when(s.generated_at));
  $("generated").dataset.t = String(s.generated_at);
  setText("m-predictions", String(s.traffic.predictions)); setText("m-requests", String(s.traffic.requests));
  setText("m-labels", Object.entries(s.traffic.labels).map(([k, v]) => k + " " + v).join(" · "));
  const l = s.latency_ms || {};
  setText("m-p50", fix(l.p50, 1)); setText("m-p90", fix(l.p90, 1)); setText("m-p99", fix(l.p99, 1));
  const q = s.requests; setText("m-rates", q.errors + " / " + q.refused + " of " + q.total);
  const a = s.live_accuracy;
  setText("m-accuracy", fix(a.accuracy, 3)); setText("m-labelled", String(a.labelled)); setText("m-coverage", pct(a.coverage));
  setText("m-ci", a.accuracy === null ? "—" : fix(a.low, 3) + "–" + fix(a.high, 3));
  spark($("chart-traffic"), s.series.map((w) => w.predictions));
  spark($("chart-accuracy"), s.series.map((w) => w.accuracy), s.series.map((w) => w.accuracy === null ? null : [w.low, w.high]));
  const dr = s.drift; const st = $("drift-status");
  st.textContent = dr.status.replace("_", " "); st.className = "pill " + (dr.status === "ok" ? "ok" : dr.status === "drifted" ? "bad" : "");
  setText("drift-p", dr.p_value === null ? "—" : Number(dr.p_value).toPrecision(3));
  setText("drift-mmd", dr.mmd === null || dr.mmd === undefined ? "—" : Number(dr.mmd).toPrecision(3));
  setText("drift-detail", dr.detail || "");
  const box = $("alerts"); box.replaceChildren();
  if (!s.alerts || !s.alerts.length) box.append("none configured (lmloop serve --alerts FILE)");
  for (const al of s.alerts || []) {
    box.append(el("div", {"class": "alert", "data-alert": al.name, "data-active": String(al.active)},
      el("span", {"class": "pill " + (al.active ? "bad" : "ok")}, al.active ? "ACTIVE" : "ok"), " ",
      el("b", {}, al.name), " ", el("span", {"class": "mut"}, al.message)));
  }
  const reg = $("registry"); reg.replaceChildren();
  if (s.registry && s.registry.versions) {
    reg.append(el("div", {"class": "mut"}, "following " + s.registry.uri));
    const t = el("table", {id: "registry-table"}, el("tr", {}, el("th", {}, "version"), el("th", {}, "aliases"), el("th", {}, "test acc."), el("th", {}, "created")));
    for (const v of s.registry.versions.slice().reverse())
      t.append(el("tr", {"data-version": String(v.version)}, el("td", {}, "v" + v.version), el("td", {}, v.aliases.join(", ")),
        el("td", {}, fix(v.test_accuracy, 3)), el("td", {"class": "mono"}, (v.created || "").slice(0, 19))));
    reg.append(t);
    for (const a2 of (s.registry.audit || []).slice().reverse())
      reg.append(el("div", {"class": "mut"}, (a2.time || "").slice(0, 19) + " " + a2.action + " " + a2.alias + ": v" + a2.from + " → v" + a2.to + " (" + a2.reason + ")"));
  } else if (s.registry && s.registry.error) {
    reg.append(el("div", {"class": "err"}, "registry: " + s.registry.error));
  } else {
    reg.append(el("div", {}, "local model " + (s.model.directory || s.model.name) + " (not from the registry)"));
  }
  const vt = el("table", {id: "versions-table"}, el("tr", {}, el("th", {}, "served version"), el("th", {}, "predictions"), el("th", {}, "accuracy"), el("th", {}, "labelled")));
  for (const v of s.versions) vt.append(el("tr", {}, el("td", {"class": "mono"}, v.version), el("td", {}, String(v.predictions)), el("td", {}, fix(v.accuracy, 3)), el("td", {}, String(v.labelled))));
  reg.append(vt);
}
async function loadFeedback() {
  try {
    const r = await api("/v1/feedback/recent?limit=20");
    setText("feedback-msg", r.data.length ? "" : "no feedback yet");
    const rows = $("feedback-rows"); rows.replaceChildren();
    for (const f of r.data)
      rows.append(el("tr", {"data-prediction": f.prediction_id}, el("td", {"class": "mono"}, when(f.created_at)),
        el("td", {"class": "mono"}, f.prediction_id), el("td", {}, f.predicted), el("td", {}, f.label + (f.correct ? " ✓" : " ✗")),
        el("td", {"class": "mono"}, f.version), el("td", {}, f.text === null ? "(not logged)" : f.text)));
  } catch (e) {
    if (e.status === 401) { setText("feedback-msg", "recent feedback needs the API key"); askKey(loadFeedback); }
    else setText("feedback-msg", "error: " + e.message);
  }
}
async function load(refresh) {
  try {
    renderModel(await api("/v1/models"));
    renderMonitor(await api("/v1/monitor" + (refresh ? "?refresh=1" : "")));
    document.body.dataset.loaded = "1";
  } catch (e) { setText("generated", "error: " + e.message); }
  await loadFeedback();
}
async function classify() {
  setText("play-err", ""); setText("fb-status", "");
  const text = $("play-text").value;
  if (!text.trim()) { setText("play-err", "type a text first"); return; }
  try {
    const r = await api("/v1/classify", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({inputs: [text]})});
    const p = r.predictions[0];
    $("play-out").style.display = "block"; setText("play-label", p.label); setText("play-id", p.id + " · " + r.version);
    $("play-out").dataset.prediction = p.id;
    setText("play-scores", Object.entries(p.scores).map(([k, v]) => k + " " + v.toFixed(3)).join("   "));
    const btns = $("fb-buttons"); btns.replaceChildren();
    for (const lab of Object.keys(p.scores)) {
      const b = el("button", {"class": "sec fb-btn", "data-label": lab}, lab);
      b.onclick = () => feedback(p.id, lab); btns.append(b, " ");
    }
  } catch (e) {
    if (e.status === 401) askKey(classify, "classify needs the key on this server");
    else setText("play-err", e.message);
  }
}
async function feedback(id, label) {
  try {
    await api("/v1/feedback", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({prediction_id: id, label})});
    setText("fb-status", "recorded: " + label); $("fb-status").dataset.done = label;
    loadFeedback();
  } catch (e) {
    if (e.status === 401) askKey(() => feedback(id, label), "feedback needs the API key");
    else setText("fb-status", "error: " + e.message);
  }
}
$("play-go").onclick = classify;
$("refresh").onclick = () => load(true);
load(false);
setInterval(() => load(false), 15000);
</script></body></html>
"""

"""Served throughput and latency under concurrent load: `lmloop serve` vs the offline predictor and a
naive server, one run, loopback only.

Contenders (same fine-tuned model, same texts: the vader-sentiment test split, cycled):

* ``lmloop serve`` -- a real server process (uvicorn, micro-batching, prediction log to SQLite), on the
  backend its calibration chose (``auto``).
* offline -- the same predictor and backend in-process, ``predict_proba`` over the texts in batches of
  64 (no HTTP): the ceiling a server can approach.
* naive server -- what a tutorial builds: FastAPI + uvicorn, a sync endpoint that tokenises the request
  and runs one fp32 PyTorch forward per request (``model(**enc).logits``); no batching across requests.

Load: ``--clients`` (default 64) closed-loop clients on asyncio with hand-written HTTP/1.1 keep-alive
requests (a light generator, so the client steals as little CPU from the server as possible), one text
per request, bounded by ``--duration`` seconds and ``--max-requests`` per phase. Phases alternate
(offline, lmloop, naive, then again in reverse) and figures are the median over ``--rounds``.

Prints items/s, the ratios served/offline (target >= 0.8) and served/naive (target >= 5), and a latency
table (p50/p90/p99/max; target p99 <= 3x p50); saves a plot to ``--plot``.

  python benchmarks/serve_load.py --model runs/sentiment
  python benchmarks/serve_load.py --train-quick --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, path: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import urllib.request

    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server on port {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"server on port {port} not ready after {timeout} s")


def get_json(port: int, path: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


# ------------------------------------------------------------------------------------------ load client
async def _one_client(
    port: int, texts: list[str], start: int, stop_at: float, budget: list, out: list
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = start
    try:
        while time.perf_counter() < stop_at and budget[0] > 0:
            budget[0] -= 1
            body = json.dumps({"inputs": [texts[i % len(texts)]]}).encode()
            i += 1
            head = (
                f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            t0 = time.perf_counter()
            writer.write(head + body)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                k, _, v = line.decode("latin-1").partition(":")
                if k.lower() == "content-length":
                    length = int(v)
            await reader.readexactly(length)
            out.append((time.perf_counter() - t0, status))
    finally:
        writer.close()


async def _load(port: int, texts: list[str], clients: int, duration: float, max_requests: int) -> dict:
    # 1 s warm-up (connections, first batches), not counted
    warm: list = []
    await asyncio.gather(
        *(_one_client(port, texts, c * 7, time.perf_counter() + 1.0, [10**9], warm) for c in range(clients))
    )
    out: list = []
    budget = [max_requests]
    t0 = time.perf_counter()
    await asyncio.gather(
        *(_one_client(port, texts, c * 13, t0 + duration, budget, out) for c in range(clients))
    )
    wall = time.perf_counter() - t0
    lat = np.array([x for x, s in out if s == 200])
    bad = sum(1 for _, s in out if s != 200)
    return {
        "items_per_s": len(lat) / wall,
        "requests": len(out),
        "errors": bad,
        "p50_ms": float(np.percentile(lat, 50) * 1000),
        "p90_ms": float(np.percentile(lat, 90) * 1000),
        "p99_ms": float(np.percentile(lat, 99) * 1000),
        "max_ms": float(lat.max() * 1000),
        "latencies": lat.tolist(),
    }


def load(port: int, texts: list[str], clients: int, duration: float, max_requests: int) -> dict:
    try:
        import uvloop

        return uvloop.run(_load(port, texts, clients, duration, max_requests))
    except ImportError:
        return asyncio.run(_load(port, texts, clients, duration, max_requests))


# ------------------------------------------------------------------------------------------ naive server
def naive_server(model: str, port: int) -> None:
    """A tutorial-style server: one forward per request, no batching across requests."""
    import torch
    import uvicorn
    from fastapi import Body, FastAPI

    from lmloop.models import load_classifier

    tok, m = load_classifier(model)
    m.eval()
    labels = [m.config.id2label[i] for i in range(m.config.num_labels)]
    app = FastAPI()

    @app.post("/v1/classify")
    def classify(payload: dict = Body(...)):  # noqa: B008
        enc = tok(payload["inputs"], padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode():
            probs = m(**enc).logits.softmax(-1)
        return {
            "predictions": [
                {"label": labels[int(p.argmax())], "scores": dict(zip(labels, p.tolist(), strict=True))}
                for p in probs
            ]
        }

    @app.get("/health")
    def health():
        return {"ok": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def offline(predictor, texts: list[str], n: int) -> float:
    batch = [texts[i % len(texts)] for i in range(n)]
    t = time.perf_counter()
    predictor.predict_proba(batch)
    return n / (time.perf_counter() - t)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("lmloop serve", "naive server"):
        lat = np.sort(np.array(results[name]["latencies"]) * 1000)
        ax1.plot(lat, np.linspace(0, 1, len(lat)), label=name)
    ax1.set_xscale("log")
    ax1.set_xlabel("latency (ms, log)")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("latency CDF, 64 concurrent clients")
    ax1.legend()
    names = ["offline", "lmloop serve", "naive server"]
    vals = [results[n]["items_per_s"] for n in names]
    ax2.bar(names, vals, color=["#999", "#2a7", "#c44"])
    ax2.set_ylabel("items/s")
    ax2.set_title("throughput (median of rounds)")
    for i, v in enumerate(vals):
        ax2.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="fine-tuned model directory (default runs/sentiment)")
    ap.add_argument("--train-quick", action="store_true", help="train a small model first (~1-2 min)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per load phase")
    ap.add_argument("--max-requests", type=int, default=20000, help="per load phase")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "out" / "serve_load.png"))
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.naive_server:
        naive_server(a.model, a.port)
        return 0

    from lmloop.data import load_data
    from lmloop.infer import Predictor

    tmp = Path(tempfile.mkdtemp(prefix="lmloop-bench-serve-"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inference import pick_model

    model_dir = pick_model(a.model, a.train_quick, tmp)
    texts = list(load_data("vader-sentiment").test["text"])

    # the server calibrates (if needed) before /ready; do it here first so both see the same choice
    pred = Predictor.from_ref(str(model_dir), backend="auto")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LMLOOP_API_KEY", None)
    p1, p2 = free_port(), free_port()
    lm = subprocess.Popen(
        [sys.executable, "-m", "lmloop", "serve", "--model", str(model_dir), "--port", str(p1),
         "--store", f"sqlite:///{tmp / 'predictions.db'}", "--max-wait-ms", str(a.max_wait_ms)],
        env=env,
    )  # fmt: skip
    naive = subprocess.Popen(
        [sys.executable, __file__, "--naive-server", "--model", str(model_dir), "--port", str(p2)], env=env
    )
    try:
        wait_ready(p1, "/ready", lm)
        wait_ready(p2, "/health", naive)
        backend = get_json(p1, "/v1/models")["data"][0]["backend"]
        print(
            f"model {model_dir} | backend {backend} | {a.clients} clients x 1 text/request | "
            f"{a.duration:g} s per phase | {a.rounds} rounds",
            flush=True,
        )
        runs: dict[str, list] = {"offline": [], "lmloop serve": [], "naive server": []}
        for r in range(a.rounds):
            order = ["offline", "lmloop serve", "naive server"]
            for name in order if r % 2 == 0 else order[::-1]:
                if name == "offline":
                    n = max(512, int(runs["offline"][-1] * a.duration) if runs["offline"] else 1933)
                    v = offline(pred, texts, n)
                    runs[name].append(v)
                    print(f"  round {r + 1}: {name:13s} {v:8.1f} items/s", flush=True)
                else:
                    res = load(
                        p1 if name == "lmloop serve" else p2, texts, a.clients, a.duration, a.max_requests
                    )
                    runs[name].append(res)
                    print(
                        f"  round {r + 1}: {name:13s} {res['items_per_s']:8.1f} items/s  p50 {res['p50_ms']:.0f} ms  "
                        f"p99 {res['p99_ms']:.0f} ms  errors {res['errors']}",
                        flush=True,
                    )
    finally:
        for proc in (lm, naive):
            proc.send_signal(signal.SIGTERM)
        for proc in (lm, naive):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    from lmloop.mlops.predlog import open_store

    with open_store(f"sqlite:///{tmp / 'predictions.db'}") as store:
        logged = store.counts()["predictions"]

    def med(name: str) -> dict:
        rs = runs[name]
        best = sorted(rs, key=lambda x: x["items_per_s"])[len(rs) // 2]
        return {**best, "items_per_s": statistics.median(x["items_per_s"] for x in rs)}

    results = {"offline": {"items_per_s": statistics.median(runs["offline"])}}
    results["lmloop serve"], results["naive server"] = med("lmloop serve"), med("naive server")
    s, o, n = (results[k]["items_per_s"] for k in ("lmloop serve", "offline", "naive server"))
    ls = results["lmloop serve"]
    served_total = sum(x["requests"] - x["errors"] for x in runs["lmloop serve"])
    print()
    print(
        f"{'contender':14s} {'items/s':>9s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} {'errors':>7s}"
    )
    print(f"{'offline':14s} {o:9.1f}")
    for k in ("lmloop serve", "naive server"):
        r = results[k]
        print(
            f"{k:14s} {r['items_per_s']:9.1f} {r['p50_ms']:8.1f} {r['p90_ms']:8.1f} {r['p99_ms']:8.1f} "
            f"{r['max_ms']:8.1f} {r['errors']:7d}"
        )
    print(
        f"\nserved / offline: {s / o:.2f}x [target >= 0.8: {'met' if s / o >= 0.8 else 'NOT met'}]"
        f"\nserved / naive server: {s / n:.2f}x [target >= 5: {'met' if s / n >= 5 else 'NOT met'}]"
        f"\np99 / p50 (lmloop): {ls['p99_ms'] / ls['p50_ms']:.2f} [target <= 3: "
        f"{'met' if ls['p99_ms'] <= 3 * ls['p50_ms'] else 'NOT met'}]"
        f"\nprediction log: {logged} records for {served_total} answered requests (+ warm-up)"
    )
    plot(results, Path(a.plot))
    print(f"plot: {a.plot}")
    if a.json:
        slim = {k: {kk: vv for kk, vv in v.items() if kk != "latencies"} for k, v in results.items()}
        Path(a.json).write_text(json.dumps({"backend": backend, "results": slim}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The embedded store is a real MLflow store: ``mlflow server`` (what ``mlflow ui`` runs) started on it
lists the run lmloop recorded, with its final metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lmloop.netutil import free_port


def _get(url: str, data: dict | None = None) -> dict:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_mlflow_server_shows_the_run(tmp_path, tiny_model_dir, toy_csv, mlflow_uri):
    from lmloop.cli import main

    out = tmp_path / "out"
    argv = ["finetune", "--data", str(toy_csv), "--model", str(tiny_model_dir), "--max-steps", "3",
            "--precision", "fp32", "--experiment", "ui-check", "--name", "ui-run", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            mlflow_uri,
            "--workers",
            "1",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("mlflow server did not come up within 90 s")
                time.sleep(0.5)
        exp = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui-check")["experiment"]
        runs = _get(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        assert [r["info"]["run_name"] for r in runs] == ["ui-run"]
        assert runs[0]["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
        expected = json.loads((out / "metrics.json").read_text())["test"]["accuracy"]
        assert metrics["test.accuracy"] == pytest.approx(expected)
        with urllib.request.urlopen(f"{base}/", timeout=10) as r:  # the UI page itself is served
            assert b"<html" in r.read(2000).lower()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

"""Scale-out, tested on one machine: an ``mlflow server`` on PostgreSQL, two ``lmloop serve`` replicas.

The production layout in miniature, every part a real process on loopback: PostgreSQL (the session's
``postgres_url`` server) holds both MLflow's tracking + registry database and the shared prediction log;
``mlflow server --workers 1`` serves tracking, the registry and (proxied) artifacts from a local directory;
two ``lmloop serve`` replicas, each with its own ``$LMLOOP_HOME`` as if on its own machine, follow
``models:/NAME@champion``. The test fine-tunes and registers two versions through the server, promotes v1
and then v2 with the ``lmloop registry`` CLI while clients storm both replicas, and checks: both replicas
swap, no request fails on either, the shared log attributes every prediction to the version that answered
it, feedback for replica A's prediction is accepted by replica B, and the audit log lists both promotions.
Not tested here: a real load balancer, several machines, a remote artifact store (S3/GCS).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from lmloop.mlops.predlog import open_store
from lmloop.netutil import free_port

NAME = "scaled"
KEY = "sk-scale-out-test"
START_TIMEOUT = 120  # s: a replica imports torch + transformers and downloads v1 on a busy 2-core machine


def _wait(url: str, proc: subprocess.Popen, log: Path, what: str) -> None:
    end = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > end:
            pytest.fail(f"{what} not up after {START_TIMEOUT} s:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen, group: bool = False) -> int | None:
    def send(sig: int) -> None:
        if group:  # the whole process group: mlflow server forks its worker
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)

    if proc.poll() is None:
        send(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


@pytest.fixture
def stack(postgres_url, tmp_path, monkeypatch):
    """A fresh MLflow database and prediction-log schema in the session's PostgreSQL, and ``mlflow server``
    on them (artifacts proxied into a local directory); yields a dict of URLs, paths and the env."""
    import psycopg

    db, schema = f"mlflow_{uuid.uuid4().hex[:8]}", f"predlog_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
        conn.execute(f"CREATE SCHEMA {schema}")
    base, _ = postgres_url.rsplit("/", 1)
    pg_mlflow = f"{base}/{db}"  # for our own checks (psycopg)
    # SQLAlchemy's plain postgresql:// means psycopg2; psycopg 3 is the driver lmloop already needs
    backend = pg_mlflow.replace("postgresql://", "postgresql+psycopg://", 1)
    artifacts = tmp_path / "mlartifacts"
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    argv = [str(mlflow), "server", "--backend-store-uri", backend, "--artifacts-destination", str(artifacts),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    log = tmp_path / "mlflow-server.log"
    # lmloop uses none of the server's background jobs (GenAI scoring, trace archival): without them the
    # server starts and stops seconds faster and leaves the 2 CPUs to the test
    server_env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(log, "wb") as out:  # its own process group: the server forks a worker
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=server_env, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{uri}/health", proc, log, "mlflow server")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # in-process finetune / registry use the server
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        env.update(MLFLOW_TRACKING_URI=uri, LMLOOP_API_KEY=KEY)
        yield {
            "uri": uri,
            "pg_mlflow": pg_mlflow,
            "store": f"{postgres_url}?options=-csearch_path%3D{schema}",
            "artifacts": artifacts,
            "log": log,
            "env": env,
        }
    finally:
        _stop(proc, group=True)
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


class Replica:
    """One ``lmloop serve --model models:/NAME@champion`` process with its own $LMLOOP_HOME."""

    def __init__(self, name: str, root: Path, stack: dict):
        self.name, self.home, self.port = name, root / name / "home", free_port()
        self.url, self.log = f"http://127.0.0.1:{self.port}", root / name / "serve.log"
        self.home.mkdir(parents=True)
        argv = [sys.executable, "-m", "lmloop", "serve", "--model", f"models:/{NAME}@champion", "--backend",
                "torch", "--follow-interval", "0.5", "--monitor-interval", "0", "--port", str(self.port),
                "--store", stack["store"]]  # fmt: skip
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=dict(stack["env"], LMLOOP_HOME=str(self.home))
            )

    def version(self) -> str:
        return httpx.get(self.url + "/ready", timeout=10).json()["version"]


def _lmloop(stack: dict, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "lmloop", *args], env=stack["env"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, f"lmloop {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.mark.slow
def test_two_replicas_on_postgres_follow_an_mlflow_server(stack, tmp_path, tiny_model_dir, toy_csv, cli):
    import psycopg
    from mlflow.tracking import MlflowClient

    from lmloop.cli import main

    # -- tracking + registry through the server: two fine-tunes, each registered by --register
    outs = []
    for seed in (1, 2):
        out = tmp_path / f"v{seed}"
        argv = ["finetune", "--data", str(toy_csv), "--model", str(tiny_model_dir), "--max-steps", "4",
                "--seed", str(seed), "--precision", "fp32", "--experiment", "scale-out", "--register", NAME,
                "--quiet", "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        outs.append(out)
    client = MlflowClient(stack["uri"])
    for out in outs:  # the run, its final metrics and its artifacts are on the server
        run = client.get_run(json.loads((out / "lmloop.json").read_text())["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
        expected = json.loads((out / "metrics.json").read_text())["test"]["accuracy"]
        assert run.data.metrics["test.accuracy"] == pytest.approx(expected)
    assert list(stack["artifacts"].rglob("model.safetensors")), "artifacts did not reach the server's store"
    code, _, err = cli("registry", "promote", NAME, "1", "--reason", "first", "--actor", "ci-one")
    assert code == 0, err

    # -- two replicas, started together, each downloading v1 into its own home
    replicas = [Replica(n, tmp_path, stack) for n in ("a", "b")]
    try:
        for r in replicas:
            _wait(r.url + "/ready", r.proc, r.log, f"replica {r.name}")
        assert [r.version() for r in replicas] == ["v1", "v1"]

        stop = threading.Event()
        clients = [(r, i) for r in replicas for i in range(2)]
        results: list[list[tuple]] = [[] for _ in clients]  # per client: (sent, received, status, body)

        def storm(k: int) -> None:
            replica, i = clients[k]
            with httpx.Client(base_url=replica.url, timeout=30) as c:
                n = 0
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        resp = c.post(
                            "/v1/classify", json={"inputs": [f"{replica.name}{i} text {n}", "great"]}
                        )
                        results[k].append((sent, time.monotonic(), resp.status_code, resp.json()))
                    except Exception as e:  # a dropped connection is a failed request too
                        results[k].append((sent, time.monotonic(), -1, repr(e)))
                    n += 1

        threads = [threading.Thread(target=storm, args=(k,)) for k in range(len(clients))]
        for t in threads:
            t.start()
        swapped: dict[str, float] = {}
        try:
            time.sleep(1.0)
            before_promote = time.monotonic()
            # an operator's separate process moves the alias, as on another machine
            _lmloop(stack, "registry", "promote", NAME, "2", "--reason", "second", "--actor", "ci-two")
            end = time.monotonic() + 60
            while len(swapped) < len(replicas):
                for r in replicas:
                    if r.name not in swapped and r.version() == "v2":
                        swapped[r.name] = time.monotonic()
                assert time.monotonic() < end, f"swapped only {swapped} within 60 s"
                time.sleep(0.05)
            time.sleep(1.0)  # keep the storm going on v2
        finally:
            stop.set()
            for t in threads:
                t.join(60)

        # -- no failed request on either replica; each client saw v1, then v2, never back
        for (replica, _), rs in zip(clients, results, strict=True):
            failed = [x for x in rs if x[2] != 200]
            assert not failed, (replica.name, failed[:5])
            seq = [x[3]["version"] for x in rs]
            assert seq == sorted(seq) and set(seq) == {"v1", "v2"}, (replica.name, seq)
            for sent, received, _, body in rs:
                assert body["model"] == NAME
                if received < before_promote:
                    assert body["version"] == "v1"
                if sent > swapped[replica.name]:
                    assert body["version"] == "v2"
        for r in replicas:
            m = httpx.get(r.url + "/v1/models", timeout=10).json()["data"][0]
            assert m["registry"]["version"] == 2 and m["registry"]["swaps"] == 1, (r.name, m)
            # each replica downloaded both versions into its own home ("its own machine")
            assert sorted(p.name for p in (r.home / "registry" / NAME).iterdir() if p.is_dir()) == ["1", "2"]

        # -- the shared prediction log: every answer from both replicas, under the version that gave it
        served = {
            p["id"]: body["version"] for rs in results for _, _, _, body in rs for p in body["predictions"]
        }
        by_replica = {r.name: set() for r in replicas}
        for (replica, _), rs in zip(clients, results, strict=True):
            by_replica[replica.name] |= {p["id"] for _, _, _, body in rs for p in body["predictions"]}
        with open_store(stack["store"]) as store:
            deadline = time.monotonic() + 30
            while True:  # each replica's log writer commits within ~100 ms
                logged = {p.id: (p.model, p.version) for p in store.iter_predictions(model=NAME)}
                if set(served) <= set(logged) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert all(ids and ids <= set(logged) for ids in by_replica.values())
            wrong = [(i, v, logged[i]) for i, v in served.items() if logged[i] != (NAME, v)]
            assert not wrong, wrong[:5]

            # -- feedback through B for what A has just served (B waits for A's commit, <= 1 s)
            a, b = replicas
            for src, dst in ((a, b), (b, a)):
                pred = httpx.post(src.url + "/v1/classify", json={"inputs": ["wonderful"]}, timeout=30)
                pred = pred.json()["predictions"][0]
                fb = {"prediction_id": pred["id"], "label": pred["label"]}
                r = httpx.post(dst.url + "/v1/feedback", json=fb, headers={"X-API-Key": KEY}, timeout=30)
                assert r.status_code == 200 and r.json()["predicted"] == pred["label"], r.text
                assert [f.label for f in store.get_feedback(pred["id"])] == [pred["label"]]
                assert store.get_prediction(pred["id"]).version == "v2"
        assert [_stop(r.proc) for r in replicas] == [0, 0]  # SIGTERM drains: exit 0
    finally:
        for r in replicas:
            _stop(r.proc)

    # -- the audit log, through the server, and MLflow's own tables in PostgreSQL
    code, out, err = cli("registry", "audit", NAME, "--json")
    assert code == 0, err
    audit = json.loads(out)
    assert [(x["action"], x["from_version"], x["to_version"], x["actor"]) for x in audit] == [
        ("promote", None, 1, "ci-one"),
        ("promote", 1, 2, "ci-two"),
    ]
    with psycopg.connect(stack["pg_mlflow"]) as conn:
        versions = conn.execute("SELECT version, source FROM model_versions WHERE name = %s", (NAME,))
        versions = sorted(versions.fetchall())
        alias = conn.execute("SELECT version FROM registered_model_aliases WHERE name = %s", (NAME,))
        alias = alias.fetchall()
    assert [v for v, _ in versions] == [1, 2] and all(s.startswith("mlflow-artifacts:") for _, s in versions)
    assert alias == [(2,)]

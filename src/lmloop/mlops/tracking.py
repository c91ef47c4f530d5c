"""Experiment tracking on MLflow.

The store is chosen by URI, as MLflow does it: ``$MLFLOW_TRACKING_URI`` when set (an MLflow server,
PostgreSQL, ...), else an embedded SQLite file ``$LMLOOP_HOME/mlflow.db`` (MLflow 3's ``file:`` store
is in maintenance mode and refuses new work). ``mlflow ui --backend-store-uri <that uri>`` shows the runs.
Only rank 0 of a distributed job tracks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def default_uri() -> str:
    from lmloop.assets import home

    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """One MLflow run: ``params``, step metrics, final metrics, tags and artifact files."""

    def __init__(self, *, uri: str | None = None, experiment: str = "lmloop", enabled: bool = True):
        self.enabled = enabled and int(os.environ.get("RANK", "0")) == 0
        self.uri = uri or default_uri()
        self.experiment = experiment
        self.run_id: str | None = None
        self._client = None

    def start(self, run_name: str, *, params: dict | None = None, tags: dict | None = None) -> None:
        if not self.enabled:
            return
        import logging

        # schema migrations on first use are noise on the user's terminal
        for name in ("alembic", "mlflow.store.db.utils", "mlflow.store.db"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is None:
            artifact_location = None
            if self.uri.startswith("sqlite:///"):
                # keep artifacts beside the database, not in whatever directory the user ran from
                artifact_location = (
                    (Path(self.uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
                )
            exp_id = self._client.create_experiment(self.experiment, artifact_location=artifact_location)
        else:
            exp_id = exp.experiment_id
        run = self._client.create_run(exp_id, run_name=run_name, tags=tags or {})
        self.run_id = run.info.run_id
        if params:
            self.log_params(params)

    def resume(self, run_id: str) -> bool:
        """Reopen an earlier run (after ``--resume``); False when it cannot be found in this store."""
        if not self.enabled:
            return False
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        try:
            self._client.get_run(run_id)
            self._client.update_run(run_id, status="RUNNING")
        except MlflowException:
            return False
        self.run_id = run_id
        return True

    def log_params(self, params: dict) -> None:
        if not self._active():
            return
        from mlflow.entities import Param

        flat = _flatten(params)
        items = [Param(k[:250], str(v)[:6000]) for k, v in flat.items()]
        for s in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._client.log_batch(self.run_id, params=items[s : s + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if not self._active():
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(k[:250], float(v), ts, step or 0)
            for k, v in _flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
        ]
        for s in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[s : s + 1000])

    def set_tags(self, tags: dict) -> None:
        if not self._active():
            return
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self._active():
            return
        p = Path(path)
        if p.is_dir():
            self._client.log_artifacts(self.run_id, str(p), artifact_path)
        elif p.is_file():
            self._client.log_artifact(self.run_id, str(p), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self._active():
            self._client.set_terminated(self.run_id, status=status)
        self.run_id = None

    def _active(self) -> bool:
        return self.enabled and self.run_id is not None


def get_run(run_id: str, uri: str | None = None):
    """Fetch a run (for tests and ``lmloop runs``)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or default_uri()).get_run(run_id)

"""Model registry on MLflow's Model Registry: versions, aliases (never the deprecated stages), an audit log.

The registry lives in the same store as tracking (:func:`lmloop.mlops.tracking.default_uri`): the embedded
SQLite file, or whatever ``$MLFLOW_TRACKING_URI`` names (an ``mlflow server``, PostgreSQL). Nothing is kept
in local files, so several machines that share a server share one registry, one alias map and one audit log.

- A **version** is a fine-tuned model directory logged as artifacts of an MLflow run: the training run
  recorded in its ``lmloop.json`` when that run is in this store, else a small ``register`` run. Its tags
  carry what lineage needs: test/validation metrics, the sha256 of every data split, the base model, the
  parent version, the recipe, the lmloop version and a content hash of the directory (registering the same
  directory twice returns the existing version). ``lmloop.feedback.*`` tags hold the feedback records a
  version was trained on, when the caller passes them (the retraining loop will).
- An **alias** (``champion``, ``challenger``, ...) points at one version. Every change goes through
  :meth:`Registry.promote` or :meth:`Registry.rollback`, and each appends one audit record: who, when,
  which alias, from which version to which, why, and the gate results that allowed it.
- The **audit log** is a set of registered-model tags ``lmloop.audit.<utc-ms>-<random>`` holding compact
  JSON (<= 5000 characters: MLflow's SQL column for registered-model tag values). Keys sort in time
  order; the random suffix means two promotions from two machines in the same millisecond never overwrite
  each other's record (a counter read-then-written would).
- ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` resolve to a local directory, downloaded once into
  ``$LMLOOP_HOME/registry/NAME/VERSION`` (checked against the content hash), so every verb that takes a
  model reference takes a registry URI (the hook is in :func:`lmloop.assets.resolve_model`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmloop.errors import LmloopError

TAG = "lmloop."
AUDIT_PREFIX = "lmloop.audit."
AUDIT_MAX_CHARS = 5000  # registered_model_tags.value is VARCHAR(5000) in MLflow's SQL schema
MARKER = ".lmloop-registry.json"  # written last into a downloaded version: its presence means complete
REGISTER_EXPERIMENT = "lmloop-registry"
# files a model directory gains after training (backend measurements, evaluations): not part of its identity
VOLATILE = {"backends.json", "eval", "checkpoints", MARKER}
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "model.onnx")
# the scalar metrics copied to version tags (and compared by diff); per-domain accuracy is added too
METRIC_KEYS = ("accuracy", "macro_f1", "ece", "nll", "brier", "n", "loss", "perplexity")
_URI = re.compile(r"^models:/(?P<name>[^@/]+(?:/[^@/]+)*?)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+|latest))$")


class RegistryError(LmloopError):
    """A registry request that cannot be met: unknown model/version/alias, bad directory, no history."""


# ------------------------------------------------------------------------------------------------ entities


@dataclass
class ModelVersion:
    """One registered version and its lineage (everything read back from MLflow tags)."""

    name: str
    version: int
    source: str
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)  # "test.accuracy" -> 0.91
    data_fingerprints: dict[str, str] = field(default_factory=dict)  # split -> sha256
    parent: int | None = None
    aliases: list[str] = field(default_factory=list)
    created: str = ""  # UTC ISO 8601
    base_model: str = ""
    labels: list[str] = field(default_factory=list)
    content_sha256: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # the recipe, flattened
    feedback: dict[str, Any] = field(default_factory=dict)  # fingerprint / n / ids when trained on feedback
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    existing: bool = False  # set by register(): this directory was registered before

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass
class AliasChange:
    """One audit record: an alias moved (``promote`` or ``rollback``)."""

    seq: int  # 1-based position in this model's log (by time)
    time: str  # UTC ISO 8601
    actor: str  # user@host, or whoever the caller names (a CI job, the retraining loop)
    action: str  # "promote" | "rollback"
    alias: str
    from_version: int | None
    to_version: int
    reason: str
    gates: dict[str, Any] | None = None


@dataclass
class VersionDiff:
    """What changed from version ``a`` to version ``b``."""

    name: str
    a: int
    b: int
    metrics: dict[str, dict[str, float | None]]  # key -> {"a", "b", "delta"}
    changed: dict[str, dict[str, Any]]  # "data.train", "base_model", "params.train.lr", ... -> {"a", "b"}


# ------------------------------------------------------------------------------------------------ helpers


def _now_iso(ms: int | None = None) -> str:
    t = datetime.fromtimestamp((ms if ms is not None else time.time() * 1000) / 1000, tz=timezone.utc)
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def default_actor() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = os.environ.get("USER") or "unknown"
    return f"{user}@{socket.gethostname()}"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _model_files(model_dir: Path) -> list[Path]:
    """The files that make up a model directory, sorted, without the volatile ones."""
    files = []
    for p in sorted(model_dir.rglob("*")):
        rel = p.relative_to(model_dir)
        if not p.is_file() or rel.parts[0] in VOLATILE or any(s.startswith(".") for s in rel.parts):
            continue
        files.append(p)
    return files


def content_sha256(model_dir: str | os.PathLike) -> str:
    """sha256 over (relative path, sha256 of the file) of every non-volatile file: the version's identity."""
    from lmloop.assets import sha256_file

    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for p in _model_files(model_dir):
        h.update(f"{p.relative_to(model_dir).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """A Hugging Face model directory (config.json and weights), or a RegistryError naming what is missing."""
    p = Path(model_dir).expanduser()
    if not p.is_dir():
        raise RegistryError(f"model directory {p} does not exist")
    if not (p / "config.json").is_file():
        raise RegistryError(f"{p} is not a model directory: config.json is missing")
    if not any((p / w).is_file() for w in WEIGHTS):
        raise RegistryError(f"{p} is not a model directory: no weights ({' / '.join(WEIGHTS)})")
    return p


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RegistryError(f"{path}: not valid JSON ({e})") from None


def _scalar_metrics(metrics: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for split in ("test", "validation"):
        m = metrics.get(split) or {}
        for k in METRIC_KEYS:
            v = m.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                out[f"{split}.{k}"] = float(v)
        for dom, dm in (m.get("per_domain") or {}).items():
            if isinstance(dm.get("accuracy"), (int, float)):
                out[f"{split}.domain.{dom}.accuracy"] = float(dm["accuracy"])
    return out


def parse_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/VERSION`` -> (NAME, None, VERSION)."""
    m = _URI.match(uri.strip())
    if not m:
        raise RegistryError(
            f"'{uri}' is not a registry URI: expected models:/NAME@ALIAS (e.g. models:/sentiment@champion) "
            "or models:/NAME/VERSION (e.g. models:/sentiment/3)"
        )
    return m["name"], m["alias"], m["version"]


def _fit_audit(rec: dict) -> str:
    """Compact JSON within AUDIT_MAX_CHARS: long gate results are summarised, never the record dropped."""
    text = json.dumps(rec, separators=(",", ":"), default=str)
    if len(text) <= AUDIT_MAX_CHARS:
        return text
    rec = dict(rec, why=rec["why"][:1000])
    if rec.get("gates"):
        rec["gates"] = {
            str(k)[:60]: v if isinstance(v, (bool, int, float)) or v is None else str(v)[:60]
            for k, v in rec["gates"].items()
        }
        rec["gates_truncated"] = True
    text = json.dumps(rec, separators=(",", ":"), default=str)
    if len(text) > AUDIT_MAX_CHARS:
        rec["gates"] = {"n": len(rec.get("gates") or {}), "truncated": True}
        text = json.dumps(rec, separators=(",", ":"), default=str)
    return text


# ------------------------------------------------------------------------------------------------ registry


class Registry:
    """The model registry behind ``lmloop registry``: one MLflow store, tracking and registry alike."""

    def __init__(self, uri: str | None = None, *, say=None):
        from lmloop.mlops.tracking import default_uri

        self.uri = uri or default_uri()
        self._say = say or (lambda m: print(f"[lmloop registry] {m}", file=sys.stderr, flush=True))
        self._c = None

    @property
    def client(self):
        if self._c is None:
            import logging

            # schema migrations on first use are noise on the user's terminal
            # (and "waiting for model version to finish creation", which a SQL or REST store never needs)
            for name in (
                "alembic",
                "mlflow.store.db.utils",
                "mlflow.store.db",
                "mlflow.store.model_registry",
            ):
                logging.getLogger(name).setLevel(logging.WARNING)
            from mlflow.tracking import MlflowClient

            self._c = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._c

    # -- reading ------------------------------------------------------------------------------------

    def _mlflow(self, what: str, fn, *args, **kwargs):
        """Call the client; MLflow's 'does not exist' and bad-parameter errors become RegistryErrors."""
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                raise RegistryError(f"{what}: {e.message}") from None
            raise

    def _model(self, name: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        known = sorted(m.name for m in self.client.search_registered_models())
        raise RegistryError(
            f"no registered model '{name}' in {self.uri}"
            + (
                f"; known: {', '.join(known)}"
                if known
                else "; the registry is empty (lmloop registry register)"
            )
        )

    def _search_versions(self, name: str | None) -> list:
        flt = "" if name is None else f"name = '{name}'"
        out, token = [], None
        while True:
            page = self.client.search_model_versions(flt, max_results=1000, page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    def _entity(self, mv, aliases: list[str] | None = None) -> ModelVersion:
        t = dict(mv.tags or {})
        metrics = {
            k[len(TAG + "metric.") :]: float(v)
            for k, v in t.items()
            if k.startswith(TAG + "metric.") and re.fullmatch(r"-?[\d.e+\-]+|nan|inf", v)
        }
        data = {k[len(TAG + "data.") :]: v for k, v in t.items() if k.startswith(TAG + "data.")}
        feedback = {k[len(TAG + "feedback.") :]: v for k, v in t.items() if k.startswith(TAG + "feedback.")}
        return ModelVersion(
            name=mv.name,
            version=int(mv.version),
            source=mv.source,
            run_id=mv.run_id or None,
            metrics=metrics,
            data_fingerprints=data,
            parent=int(t[TAG + "parent"]) if t.get(TAG + "parent") else None,
            aliases=sorted(aliases if aliases is not None else (getattr(mv, "aliases", None) or [])),
            created=_now_iso(mv.creation_timestamp),
            base_model=t.get(TAG + "base_model", ""),
            labels=json.loads(t.get(TAG + "labels", "[]")),
            content_sha256=t.get(TAG + "content_sha256", ""),
            params=json.loads(t.get(TAG + "recipe", "{}")),
            feedback=feedback,
            description=mv.description or "",
            tags=t,
        )

    def _alias_map(self, name: str) -> dict[str, int]:
        return {a: int(v) for a, v in (self._model(name).aliases or {}).items()}

    def _versions_with_aliases(self, name: str) -> list[ModelVersion]:
        by_version: dict[int, list[str]] = {}
        for a, v in self._alias_map(name).items():
            by_version.setdefault(v, []).append(a)
        vs = [self._entity(mv, by_version.get(int(mv.version), [])) for mv in self._search_versions(name)]
        return sorted(vs, key=lambda v: v.version)

    def list(self, name: str | None = None, *, data: str | None = None) -> list[ModelVersion]:
        """Every version (of ``name``, or of every model), oldest first; ``data`` keeps only versions
        trained on a split with that fingerprint (a prefix is enough): lineage from data to models."""
        names = [name] if name else sorted(m.name for m in self.client.search_registered_models())
        out = [v for n in names for v in self._versions_with_aliases(n)]
        if data:
            out = [v for v in out if any(fp.startswith(data) for fp in v.data_fingerprints.values())]
        return out

    def show(self, name: str, ref: str | int | None = None) -> ModelVersion:
        """One version by number (``3``, ``v3``) or alias (``champion``); default: the champion if set,
        else the newest version."""
        aliases = self._alias_map(name)
        if ref is None:
            if "champion" in aliases:
                ref = aliases["champion"]
            else:
                versions = self._search_versions(name)
                if not versions:
                    raise RegistryError(f"registered model '{name}' has no versions yet")
                ref = max(int(mv.version) for mv in versions)
        version = self._version_number(name, ref, aliases)
        mv = self._mlflow(f"{name} version {version}", self.client.get_model_version, name, str(version))
        return self._entity(mv, [a for a, v in aliases.items() if v == version])

    def _version_number(self, name: str, ref: str | int, aliases: dict[str, int] | None = None) -> int:
        s = str(ref).strip()
        if re.fullmatch(r"[vV]?\d+", s):
            return int(s.lstrip("vV"))
        aliases = self._alias_map(name) if aliases is None else aliases
        if s == "latest":
            versions = [int(mv.version) for mv in self._search_versions(name)]
            if versions:
                return max(versions)
        if s not in aliases:
            have = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "none set"
            raise RegistryError(f"model '{name}' has no version or alias '{s}' (aliases: {have})")
        return aliases[s]

    def audit(self, name: str) -> list[AliasChange]:
        """Every alias change of ``name``, oldest first."""
        model = self._model(name)
        tags = model.tags or {}
        recs = []
        for key in sorted(k for k in tags if k.startswith(AUDIT_PREFIX)):
            try:
                recs.append(json.loads(tags[key]))
            except ValueError:
                continue  # not ours
        out = []
        for i, r in enumerate(recs):
            if r.get("pending"):
                # killed between writing the record and confirming it: did the alias move? The next record
                # for that alias starts where this one would have left it; with none, the alias says
                nxt = next((x for x in recs[i + 1 :] if x.get("alias") == r.get("alias")), None)
                now = nxt.get("from") if nxt else (model.aliases or {}).get(r.get("alias", ""))
                if str(now) != str(r.get("to")):
                    continue  # the move never happened
            out.append(
                AliasChange(
                    seq=len(out) + 1,
                    time=r.get("t", ""),
                    actor=r.get("by", ""),
                    action=r.get("op", ""),
                    alias=r.get("alias", ""),
                    from_version=r.get("from"),
                    to_version=r.get("to"),
                    reason=r.get("why", ""),
                    gates=r.get("gates"),
                )
            )
        return out

    def diff(self, name: str, a: str | int, b: str | int) -> VersionDiff:
        """Metric deltas (b - a) and the lineage that changed: data splits, base model, labels, recipe."""
        va, vb = self.show(name, a), self.show(name, b)
        metrics = {}
        for k in sorted(set(va.metrics) | set(vb.metrics)):
            x, y = va.metrics.get(k), vb.metrics.get(k)
            metrics[k] = {"a": x, "b": y, "delta": None if x is None or y is None else y - x}
        changed: dict[str, dict[str, Any]] = {}

        def cmp(key: str, x, y) -> None:
            if x != y:
                changed[key] = {"a": x, "b": y}

        for split in sorted(set(va.data_fingerprints) | set(vb.data_fingerprints)):
            cmp(f"data.{split}", va.data_fingerprints.get(split), vb.data_fingerprints.get(split))
        cmp("base_model", va.base_model or None, vb.base_model or None)
        cmp("labels", va.labels, vb.labels)
        cmp("parent", va.parent, vb.parent)
        cmp("run_id", va.run_id, vb.run_id)
        for k in sorted(set(va.params) | set(vb.params)):
            if k != "out":  # the output folder differs for every run and says nothing about the model
                cmp(f"params.{k}", va.params.get(k), vb.params.get(k))
        return VersionDiff(name=name, a=va.version, b=vb.version, metrics=metrics, changed=changed)

    # -- writing ------------------------------------------------------------------------------------

    def register(
        self,
        model_dir: str | os.PathLike,
        name: str,
        *,
        run_id: str | None = None,
        parent: str | int | None = None,
        reason: str = "",
        feedback: dict | None = None,
    ) -> ModelVersion:
        """Register a fine-tuned model directory as a new version of ``name``; returns it.

        The directory's files are logged as artifacts of its MLflow run (``run_id``, else the training
        run in its ``lmloop.json`` when this store has it; that run's ``model/`` artifacts are reused when
        they match), else of a new ``register`` run. The same directory registered again under the same
        name returns the existing version (``existing=True``). ``feedback`` (``{"fingerprint": ..., "n":
        ..., "ids": [...]}``) records the feedback records the model was trained on.
        """
        from mlflow.exceptions import MlflowException

        d = check_model_dir(model_dir).resolve()
        if not name or not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", name):
            raise RegistryError(f"model name '{name}': use letters, digits, '.', '_' and '-'")
        meta = _read_json(d / "lmloop.json")
        metrics = _scalar_metrics(_read_json(d / "metrics.json"))
        if not meta:
            self._say(f"{d} has no lmloop.json: registering it as a plain Hugging Face directory")
        digest = content_sha256(d)

        try:
            self.client.get_registered_model(name)
            existing = self._search_versions(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            existing = []
        for mv in existing:
            if (mv.tags or {}).get(TAG + "content_sha256") == digest:
                v = self.show(name, int(mv.version))
                v.existing = True
                self._say(
                    f"{d} is already registered as {name} v{v.version} (same content); not adding a copy"
                )
                return v
        parent_v = self._version_number(name, parent) if parent is not None and existing else None
        if parent is not None and (parent_v is None or parent_v not in {int(mv.version) for mv in existing}):
            raise RegistryError(f"--parent {parent}: model '{name}' has no such version")

        run_id, artifact_path = self._log_model_files(d, name, run_id or meta.get("mlflow_run_id"), metrics)
        run = self.client.get_run(run_id)
        source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
        tags = self._version_tags(d, meta, metrics, digest, artifact_path, parent_v, feedback, reason)
        if not existing:
            try:
                self.client.create_registered_model(
                    name, description="registered by lmloop", tags={TAG + "created_by": default_actor()}
                )
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another machine created it just now
                    raise
        mv = self._mlflow(
            f"registering {d} as {name}",
            self.client.create_model_version,
            name,
            source,
            run_id,
            tags=tags,
            description=reason or None,
        )
        self._say(f"registered {d} as {name} v{mv.version} (run {run_id}, {source})")
        return self.show(name, int(mv.version))

    def _log_model_files(self, d: Path, name: str, run_id: str | None, metrics: dict) -> tuple[str, str]:
        """Put the model's files into a run's artifacts; returns (run_id, artifact path)."""
        from mlflow.exceptions import MlflowException

        files = _model_files(d)
        digest_dir = f"registry/{content_sha256(d)[:16]}"
        if run_id:
            try:
                self.client.get_run(run_id)
            except MlflowException:
                self._say(
                    f"run {run_id} (from {d / 'lmloop.json'}) is not in {self.uri}; opening a register run"
                )
                run_id = None
        if run_id:
            # finetune already logged the directory as model/: reuse it when it holds the same files
            logged = {f.path: f.file_size for f in self.client.list_artifacts(run_id, "model")}
            flat = all(len(p.relative_to(d).parts) == 1 for p in files)
            if flat and all(logged.get(f"model/{p.name}") == p.stat().st_size for p in files):
                return run_id, "model"
        else:
            from lmloop.mlops.tracking import Tracker

            tr = Tracker(uri=self.uri, experiment=REGISTER_EXPERIMENT)
            # against a server MLflow prints "View run at ..." to stdout: keep stdout for our output (--json)
            with contextlib.redirect_stdout(sys.stderr):
                tr.start(
                    f"register {name}",
                    tags={"lmloop.stage": "register", "lmloop.model_dir": str(d)},
                    params={"model_dir": str(d)},
                )
                tr.log_metrics(metrics)
                run_id = tr.run_id
                tr.end("FINISHED")  # (forgets run_id)
        for p in files:
            sub = p.parent.relative_to(d).as_posix()
            self.client.log_artifact(run_id, str(p), digest_dir if sub == "." else f"{digest_dir}/{sub}")
        return run_id, digest_dir

    def _version_tags(self, d, meta, metrics, digest, artifact_path, parent, feedback, reason) -> dict:
        from lmloop import __version__

        tags = {
            TAG + "content_sha256": digest,
            TAG + "artifact_path": artifact_path,
            TAG + "model_dir": str(d),
            TAG + "registered_by": default_actor(),
            TAG + "lmloop_version": meta.get("lmloop_version") or __version__,
            TAG + "base_model": str(meta.get("base_model") or ""),
            TAG + "labels": json.dumps(meta.get("labels") or []),
        }
        if reason:
            tags[TAG + "reason"] = reason
        if parent is not None:
            tags[TAG + "parent"] = str(parent)
        if meta.get("data_source"):
            tags[TAG + "data_source"] = str(meta["data_source"])
        if meta.get("mlflow_run_id"):
            tags[TAG + "train_run_id"] = meta["mlflow_run_id"]
        for split, fp in (meta.get("data_fingerprints") or {}).items():
            tags[f"{TAG}data.{split}"] = fp.get("sha256", "") if isinstance(fp, dict) else str(fp)
        for k, v in metrics.items():
            tags[f"{TAG}metric.{k}"] = repr(v)
        recipe = d / "recipe.yaml"
        if recipe.is_file():
            import yaml

            flat = _flatten(yaml.safe_load(recipe.read_text(encoding="utf-8")) or {})
            tags[TAG + "recipe"] = json.dumps(flat, separators=(",", ":"), default=str)
        # hook for the retraining loop: which feedback records went into this version
        fb = feedback if feedback is not None else meta.get("feedback")
        if fb:
            if fb.get("fingerprint"):
                tags[TAG + "feedback.fingerprint"] = str(fb["fingerprint"])
            from lmloop.mlops.lineage import MAX_TAG_CHARS, encode_ids

            ids = list(fb.get("ids") or [])
            tags[TAG + "feedback.n"] = str(fb.get("n", len(ids)))
            text = encode_ids(ids)  # ranges; beyond a tag's size the model dir's feedback_ids.json holds them
            if ids and len(text) <= MAX_TAG_CHARS:
                tags[TAG + "feedback.ids"] = text
        return tags

    def promote(
        self,
        name: str,
        version: str | int,
        alias: str = "champion",
        *,
        reason: str,
        gates: dict | None = None,
        actor: str | None = None,
    ) -> AliasChange | None:
        """Point ``alias`` at ``version`` and append an audit record; None when it already points there."""
        if not reason or not reason.strip():
            raise RegistryError("a promotion needs a reason (--reason TEXT): it goes into the audit log")
        self._check_alias(alias)
        aliases = self._alias_map(name)
        v = self._version_number(name, version, aliases)
        self._mlflow(f"{name} version {v}", self.client.get_model_version, name, str(v))
        current = aliases.get(alias)
        if current == v:
            return None
        return self._move(name, alias, current, v, "promote", reason, gates, actor)

    def rollback(
        self, name: str, alias: str = "champion", *, reason: str, actor: str | None = None
    ) -> AliasChange:
        """Move ``alias`` back to the version it pointed at before its last change (from the audit log).

        Repeated rollbacks walk further back: promote v1, v2, v3, then rollback -> v2, rollback -> v1.
        """
        if not reason or not reason.strip():
            raise RegistryError("a rollback needs a reason (--reason TEXT): it goes into the audit log")
        aliases = self._alias_map(name)
        history: list[int] = []  # the alias's versions, a stack: promote pushes, rollback pops
        for r in self.audit(name):
            if r.alias != alias:
                continue
            if r.action == "rollback" and history:
                history.pop()
            else:
                history.append(r.to_version)
        if len(history) < 2:
            now = f"it points at v{aliases[alias]}" if alias in aliases else "it is not set"
            raise RegistryError(
                f"cannot roll back {name}@{alias}: the audit log has no earlier version ({now}); "
                f"use `lmloop registry promote {name} VERSION --alias {alias}` instead"
            )
        target = history[-2]
        self._mlflow(
            f"rollback target {name} v{target} (deleted?)", self.client.get_model_version, name, str(target)
        )
        return self._move(name, alias, aliases.get(alias), target, "rollback", reason, None, actor)

    def _check_alias(self, alias: str) -> None:
        if (
            not re.fullmatch(r"[A-Za-z_][\w\-]*", alias or "")
            or alias.lower() == "latest"
            or re.fullmatch(r"[vV]\d+", alias)
        ):
            raise RegistryError(
                f"alias '{alias}': use a word such as champion or challenger ('latest' and v<N> are reserved)"
            )

    def _move(self, name, alias, frm, to, op, reason, gates, actor) -> AliasChange:
        ms = int(time.time() * 1000)
        rec = {"t": _now_iso(ms), "by": actor or default_actor(), "op": op, "alias": alias}
        rec.update({"from": frm, "to": to, "why": reason.strip(), "gates": gates or None})
        # write-ahead: the audit record exists (marked pending) before the alias moves, so a process killed
        # between the two steps leaves a record of the attempt, never an unaudited alias change
        key = f"{AUDIT_PREFIX}{ms:013d}-{secrets.token_hex(3)}"
        self._mlflow(f"{name} audit log", self.client.set_registered_model_tag, name, key,
                     _fit_audit({**rec, "pending": True}))  # fmt: skip
        try:
            self._mlflow(f"{name}@{alias}", self.client.set_registered_model_alias, name, alias, str(to))
        except BaseException:
            self.client.delete_registered_model_tag(name, key)  # it did not happen: no record
            raise
        try:
            self.client.set_registered_model_tag(name, key, _fit_audit(rec))
        except Exception:
            # the alias moved but its record could not be confirmed: put the alias back, then fail
            if frm is None:
                self.client.delete_registered_model_alias(name, alias)
            else:
                self.client.set_registered_model_alias(name, alias, str(frm))
            self.client.delete_registered_model_tag(name, key)
            raise
        seq = len(self.audit(name))
        return AliasChange(seq, rec["t"], rec["by"], op, alias, frm, to, rec["why"], rec["gates"])

    # -- resolving ----------------------------------------------------------------------------------

    def resolve(self, uri: str) -> Path:
        """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> a local model directory.

        Downloaded once into ``$LMLOOP_HOME/registry/NAME/VERSION`` (a temp dir renamed into place, so a
        half-downloaded version is never used) and checked against the version's content hash.
        """
        from lmloop.assets import _lock, home

        name, alias, version = parse_uri(uri)
        v = self.show(name, alias or version)
        target = home() / "registry" / name / str(v.version)
        if self._complete(target, v):
            return target
        with _lock(target.parent / f".{v.version}.lock"):
            if self._complete(target, v):  # another process finished while we waited
                return target
            staging = Path(tempfile.mkdtemp(prefix=f".{v.version}-", dir=target.parent))
            try:
                got = self._download(v, staging)
                if v.content_sha256 and content_sha256(got) != v.content_sha256:
                    raise RegistryError(
                        f"{uri}: the downloaded files do not match {name} v{v.version}'s content hash; "
                        "its artifacts were changed after registration"
                    )
                check_model_dir(got)
                marker = {
                    "name": name,
                    "version": v.version,
                    "uri": self.uri,
                    "content_sha256": v.content_sha256,
                }
                (got / MARKER).write_text(json.dumps(marker))
                if target.exists():
                    shutil.rmtree(target)
                os.replace(got, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return target

    @staticmethod
    def _complete(target: Path, v: ModelVersion) -> bool:
        marker = _read_json(target / MARKER) if (target / MARKER).is_file() else {}
        # the same name/version in another store is another model: the content hash tells them apart
        return bool(marker) and marker.get("content_sha256") == v.content_sha256

    def _download(self, v: ModelVersion, staging: Path) -> Path:
        if not sys.stderr.isatty():  # a per-file progress bar is noise in logs and pipes
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        path = v.tags.get(TAG + "artifact_path")
        if v.run_id and path:
            local = self.client.download_artifacts(v.run_id, path, str(staging))
        else:  # a version registered outside lmloop
            import mlflow.artifacts

            local = mlflow.artifacts.download_artifacts(
                artifact_uri=v.source, dst_path=str(staging), tracking_uri=self.uri
            )
        return Path(local)


def resolve(uri: str) -> Path:
    """``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` -> local directory (see :meth:`Registry.resolve`)."""
    return Registry(say=lambda m: None).resolve(uri)


def to_json(obj) -> str:
    """A registry entity (or a list of them) as indented JSON."""
    if isinstance(obj, list):
        return json.dumps([asdict(o) for o in obj], indent=2, default=str)
    return json.dumps(asdict(obj), indent=2, default=str)


# ------------------------------------------------------------------------------------------------ tables


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_versions(versions: list[ModelVersion]) -> str:
    """The table of ``lmloop registry list``."""
    if not versions:
        return "no registered models (lmloop registry register --model DIR --name NAME)"
    head = f"{'name':16s} {'ver':>4s} {'aliases':18s} {'test acc':>8s} {'macro-F1':>8s} {'ECE':>6s} "
    head += f"{'train data':16s} {'parent':>6s}  created"
    rows = [head]
    for v in versions:
        m = v.metrics
        rows.append(
            f"{v.name[:16]:16s} {v.version:>4d} {','.join(v.aliases)[:18]:18s} "
            f"{_num(m.get('test.accuracy')):>8s} {_num(m.get('test.macro_f1')):>8s} {_num(m.get('test.ece'), 3):>6s} "
            f"{v.data_fingerprints.get('train', '-')[:16]:16s} {v.parent or '-':>6}  {v.created}"
        )
    return "\n".join(rows)


def format_version(v: ModelVersion) -> str:
    """The page of ``lmloop registry show``: lineage first, then metrics."""
    lines = [
        f"{v.name} v{v.version}" + (f"   aliases: {', '.join(v.aliases)}" if v.aliases else ""),
        f"  created      {v.created}   by {v.tags.get(TAG + 'registered_by', '?')}",
        f"  uri          {v.uri}",
        f"  source       {v.source}",
        f"  run          {v.run_id or '-'}",
        f"  parent       {'v' + str(v.parent) if v.parent else '-'}",
        f"  base model   {v.base_model or '-'}",
        f"  labels       {', '.join(v.labels) or '-'}",
        f"  content      sha256:{v.content_sha256[:16]}",
    ]
    if v.description:
        lines.append(f"  reason       {v.description}")
    if v.tags.get(TAG + "data_source"):
        lines.append(f"  data source  {v.tags[TAG + 'data_source']}")
    for split, fp in v.data_fingerprints.items():
        lines.append(f"  data {split:11s} {fp}")
    if v.feedback:
        lines.append(
            f"  feedback     {v.feedback.get('n', '?')} records, fingerprint {v.feedback.get('fingerprint', '-')}"
        )
    if v.metrics:
        lines.append("  metrics")
        for k, x in v.metrics.items():
            lines.append(f"    {k:32s} {x:.4f}" if not k.endswith(".n") else f"    {k:32s} {int(x)}")
    lines += _format_gates(v.tags)
    return "\n".join(lines)


def _format_gates(tags: dict[str, str]) -> list[str]:
    """The loop's gate results recorded on a version (tags lmloop.loop.gates / decision / reason)."""
    try:
        gates = json.loads(tags.get("lmloop.loop.gates") or "{}")
    except ValueError:
        return []
    if not isinstance(gates, dict) or not gates:
        return []
    decision, turn = tags.get("lmloop.loop.decision", "?"), tags.get("lmloop.loop.turn", "?")
    out = [f"  gates        {decision} by loop turn {turn}"]
    for name, g in gates.items():
        g = g if isinstance(g, dict) else {"passed": g}  # versions registered before values were recorded
        nums = f"{_num(g.get('value'))} vs {_num(g.get('threshold'))}" if "value" in g else ""
        out.append(f"    {name:24s} {'PASS' if g.get('passed') else 'FAIL'}  {nums}")
    if tags.get("lmloop.loop.reason"):
        out.append(f"    reason: {tags['lmloop.loop.reason']}")
    return out


def format_audit(records: list[AliasChange]) -> str:
    """The table of ``lmloop registry audit``."""
    if not records:
        return "no alias changes yet"
    rows = [
        f"{'#':>3s}  {'time (UTC)':20s} {'action':8s} {'alias':10s} {'from':>4s} -> {'to':<4s} {'by':22s} reason"
    ]
    for r in records:
        frm = "-" if r.from_version is None else f"v{r.from_version}"
        gates = ""
        if r.gates:
            gates = "  gates: " + ", ".join(f"{k}={v}" for k, v in r.gates.items())
        rows.append(
            f"{r.seq:>3d}  {r.time:20s} {r.action:8s} {r.alias:10s} {frm:>4s} -> {'v' + str(r.to_version):<4s} "
            f"{r.actor[:22]:22s} {r.reason}{gates}"
        )
    return "\n".join(rows)


def format_diff(d: VersionDiff) -> str:
    """The page of ``lmloop registry diff``: headline and changed metrics, then what changed in the lineage."""
    headline = ("test.accuracy", "test.macro_f1", "test.ece", "validation.accuracy")
    shown = {
        k: m for k, m in d.metrics.items() if k in headline or (m["delta"] or 0) != 0 or m["delta"] is None
    }
    head = f"  {'metric':32s} {'v' + str(d.a):>9s} {'v' + str(d.b):>9s} {'delta':>9s}"
    lines = [f"{d.name}: v{d.a} -> v{d.b}", head]
    for k, m in shown.items():
        digits = 0 if k.endswith(".n") else 4
        delta = "-" if m["delta"] is None else f"{m['delta']:+.{digits}f}"
        lines.append(f"  {k:32s} {_num(m['a'], digits):>9s} {_num(m['b'], digits):>9s} {delta:>9s}")
    if len(shown) < len(d.metrics):
        lines.append(f"  ({len(d.metrics) - len(shown)} more metrics unchanged; --json lists all)")
    if d.changed:
        lines.append("  changed")
        for k, c in d.changed.items():
            lines.append(f"    {k:30s} {str(c['a'])[:40]} -> {str(c['b'])[:40]}")
    else:
        lines.append("  same data, base model and recipe")
    return "\n".join(lines)

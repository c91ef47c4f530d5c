"""``lmloop demo``: the whole loop on a real domain shift, from packaged data and models, in one command.

Phases (each timed and printed as it runs; ``recipes/domain-shift.yaml`` holds every setting):

a. **data**: the recipe's data (built-in ``vader-sentiment``) is cut by domain. Champion data = the source
   domains' (movies) train/validation/test splits; the test split is the loop's frozen *golden* set.
   Production traffic = the shift domains' (Amazon, tweets) *training-split* texts, shuffled, so no
   evaluation text is ever replayed or fed back; before it, a pre-shift baseline of held-out movie texts.
   Evaluation = every domain's test split, reported per domain.
b. **champion**: fine-tuned on the source domains (it writes its drift reference), registered, promoted to
   ``models:/NAME@champion``.
c. **serve**: ``lmloop serve --model models:/NAME@champion --follow-interval 2`` as a subprocess, with its
   own prediction log.
d./e. **replay + monitor**: the baseline, then the production stream in slices, over HTTP with delayed true
   labels as feedback (:mod:`lmloop.mlops.replay`); after each slice the drift of the slice's logged
   traffic against the champion's reference (:func:`lmloop.mlops.drift.detect`) and its live accuracy
   from feedback (:func:`lmloop.mlops.monitor.summarize`).
f. **loop**: one :func:`lmloop.mlops.loop.run_turn`, started by its own triggers (drift, feedback count,
   accuracy drop), never forced unless none fires (then it says so): challenger on source data +
   feedback, gates, registration, promotion.
g. **swap**: ``POST /v1/admin/reload`` and poll ``/ready`` until the new version serves; a few requests
   must come back from it.
h. **evaluate**: champion, new champion and (full mode) an *oracle* trained on source + shift domains from
   the start with the same recipe, on every domain's test split; the targets: shift-domain accuracy within
   ``demo.oracle_gap`` of the oracle, source-domain accuracy down at most ``demo.source_drop``.
i. **report**: ``OUT/demo.json`` and a self-contained ``OUT/demo.html``.

The server is stopped with SIGTERM at the end, on errors and on Ctrl-C. ``quick=True`` runs the same
phases on small slices with few steps and looser gates (:data:`QUICK`): a smoke test of the machinery
(promotion, swap), not of accuracy.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from lmloop.config import DemoConfig, Recipe
from lmloop.demo_report import fmt_float, write_demo_html
from lmloop.errors import LmloopError
from lmloop.fsutil import atomic_write_text
from lmloop.netutil import free_port

# --quick: the same phases on a few hundred rows. Looser gates: at ~30 optimizer steps MiniLM is near
# chance on 100-row test sets, where one text is a point; this mode checks the machinery, not accuracy.
QUICK: dict[str, Any] = {
    "demo.train_limit": 400,
    "demo.eval_limit": 100,
    "demo.stream_limit": 240,
    "demo.baseline": 40,
    "demo.slices": 2,
    "demo.rate": 80,
    "demo.feedback_fraction": 0.8,
    "demo.feedback_delay": "0.2",
    "demo.oracle": False,
    "model.max_length": 64,
    "train.batch_size": 16,
    "train.lr": 1e-4,
    "train.evals_per_epoch": 1,
    "drift.max_texts": 200,
    "loop.triggers.min_feedback": 50,
    "loop.gates.min_holdout": 10,
    "loop.gates.max_regression": 0.05,
    "loop.gates.min_improvement": -0.05,
    "loop.gates.max_ece": 0.25,
}
READY_TIMEOUT_S = 300
SWAP_TIMEOUT_S = 300


def _say(msg: str) -> None:
    print(f"[lmloop demo] {msg}", file=sys.stderr, flush=True)


class _Phases:
    """Times each phase and prints its start and end: ``with phases("b", "fine-tune the champion"):``."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, key: str, what: str):
        start = time.perf_counter()
        _say(f"({key}) {what} ... [{self.elapsed()}]")
        try:
            yield
        finally:
            self.seconds[f"{key} {what}"] = round(time.perf_counter() - start, 1)
            _say(f"({key}) {what}: {time.perf_counter() - start:.1f} s [{self.elapsed()}]")

    def elapsed(self) -> str:
        s = int(time.perf_counter() - self.t0)
        return f"{s // 60:d}:{s % 60:02d} elapsed"


# ---------------------------------------------------------------------------------------------- (a) data
def build_domain_data(prepared, cfg: DemoConfig, *, seed: int = 42) -> dict[str, pd.DataFrame]:
    """Cut prepared data (with a ``domain`` column) into the demo's frames, each with text/label/domain.

    ``champion_train`` / ``champion_validation`` / ``golden_test``: the source domains' splits.
    ``baseline``: source-domain validation texts replayed before the shift. ``stream``: the shift domains'
    *training* texts, shuffled (no validation or test text is ever replayed). ``after_swap``: held-out
    shift-domain validation texts replayed after the swap. ``eval_test``: the test split
    of every source and shift domain. ``oracle_train`` / ``oracle_validation``: source + shift domains.
    Limits (``train_limit``, ``eval_limit`` per domain, ``stream_limit``) take seeded samples."""
    for name, df in prepared.splits().items():
        if "domain" not in df.columns:
            raise LmloopError(f"lmloop demo needs data with domains: the {name} split has no domain column")
    known = set(prepared.train["domain"])
    missing = [d for d in [*cfg.source_domains, *cfg.shift_domains] if d not in known]
    if missing:
        raise LmloopError(f"demo domains {missing} are not in the data (it has {sorted(known)})")
    cols = ["text", "label", "domain"]

    def pick(df: pd.DataFrame, domains: list[str], limit: int | None = None, per_domain: bool = False):
        out = df[df["domain"].isin(domains)][cols]
        if limit is not None and per_domain:
            parts = [
                g.sample(min(limit, len(g)), random_state=seed) for _, g in out.groupby("domain", sort=False)
            ]
            out = pd.concat(parts) if parts else out
        elif limit is not None and len(out) > limit:
            out = out.sample(limit, random_state=seed)
        return out.reset_index(drop=True)

    src, shift, both = (
        list(cfg.source_domains),
        list(cfg.shift_domains),
        [*cfg.source_domains, *cfg.shift_domains],
    )
    eval_test = pick(prepared.test, both, cfg.eval_limit, per_domain=True)
    champion_validation = pick(prepared.validation, src, cfg.eval_limit)
    # the baseline comes from the validation rows the champion's validation did not take, when there are any
    rest = prepared.validation[prepared.validation["domain"].isin(src)]
    unused = rest[~rest["text"].isin(set(champion_validation["text"]))]
    base_pool = unused if len(unused) >= cfg.baseline else rest
    baseline = (
        base_pool[cols].sample(min(cfg.baseline, len(base_pool)), random_state=seed).reset_index(drop=True)
    )
    stream = pick(prepared.train, shift).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    if cfg.stream_limit is not None:
        stream = stream.iloc[: cfg.stream_limit].reset_index(drop=True)
    return {
        "champion_train": pick(prepared.train, src, cfg.train_limit),
        "champion_validation": champion_validation,
        "golden_test": eval_test[eval_test["domain"].isin(src)].reset_index(drop=True),
        "baseline": baseline,
        "stream": stream,
        "eval_test": eval_test,
        # after the swap: held-out shift-domain texts (validation split), never trained on nor fed back before
        "after_swap": pick(prepared.validation, shift, min(cfg.eval_limit or 200, 200), per_domain=True),
        "oracle_train": pick(prepared.train, both),
        "oracle_validation": pick(prepared.validation, both, cfg.eval_limit, per_domain=True),
    }


def _write_csvs(frames: dict[str, pd.DataFrame], root: Path) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, df in frames.items():
        p = root / f"{name}.csv"
        df.to_csv(p, index=False)
        paths[name] = str(p)
    return paths


def _finetune_recipe(recipe: Recipe, name: str, out: Path, train: str, validation: str, test: str) -> Recipe:
    r = copy.deepcopy(recipe)
    r.name, r.out = name, str(out)
    r.data.path, r.data.format, r.data.limit = None, "csv", None
    r.data.train, r.data.validation, r.data.test = train, validation, test
    r.data.text_column, r.data.label_column, r.data.domain_column = "text", "label", "domain"
    r.tracking.register = None  # the demo registers (and promotes) itself
    return r


# ---------------------------------------------------------------------------------------------- (c) serve


class _Server:
    """``lmloop serve`` following ``models:/NAME@ALIAS`` in a subprocess; :meth:`stop` sends SIGTERM."""

    def __init__(self, uri: str, *, tracking_uri: str, store: str, log: Path, key: str, follow_s: float):
        self.port, self.key, self.log = free_port(), key, log
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        env.update(MLFLOW_TRACKING_URI=tracking_uri, LMLOOP_API_KEY=key)
        # backend torch: `auto` would calibrate every backend on each model it loads (minutes on 2 cores)
        argv = [sys.executable, "-m", "lmloop", "serve", "--model", uri, "--backend", "torch"]
        argv += ["--follow-interval", str(follow_s), "--port", str(self.port), "--store", store]
        self.argv = argv
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float) -> dict:
        import httpx

        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LmloopError(f"lmloop serve exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.TransportError):
                r = httpx.get(self.url + "/ready", timeout=5)
                if r.status_code == 200:
                    return r.json()
            if time.monotonic() > end:
                raise LmloopError(f"lmloop serve not ready after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.3)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # drains: in-flight requests finish, the log is committed
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode


# ---------------------------------------------------------------------------------------------- (d/e)
def _replay_slice(server: _Server, frame: pd.DataFrame, cfg: DemoConfig, seed: int, source: str) -> dict:
    from lmloop.mlops.replay import ReplayData, ReplayOptions, replay

    data = ReplayData(list(frame["text"]), list(frame["label"]), list(frame["domain"]), source)
    opts = ReplayOptions(
        url=server.url,
        rate=cfg.rate,
        concurrency=16,
        feedback_fraction=cfg.feedback_fraction,
        feedback_delay=cfg.feedback_delay,
        seed=seed,
        api_key=server.key,
        progress=sys.stderr.isatty(),
    )
    return replay(data, opts)


def _monitor_slice(store_url: str, reference, t0: float, t1: float, embedder) -> dict:
    """Drift of the traffic logged in [t0, t1) against ``reference``, and its live accuracy from feedback."""
    from lmloop.mlops.drift import detect
    from lmloop.mlops.monitor import summarize
    from lmloop.mlops.predlog import open_store

    with open_store(store_url) as store:
        preds = [p for p in store.iter_predictions(since=t0, until=t1) if p.text is not None]
    texts, labels = [p.text for p in preds], [p.label for p in preds]
    out: dict[str, Any] = {"n": len(texts), "versions": sorted({p.version for p in preds})}
    if texts:
        rep = detect(reference, texts, predicted_labels=labels, embedder=embedder)
        out["drift"] = _drift_summary(rep)
    live = summarize(store_url, since=t0, until=t1, window="1d").total
    out["live"] = {
        "labelled": live.labelled,
        "accuracy": live.accuracy,
        "low": live.accuracy_low,
        "high": live.accuracy_high,
    }
    return out


def _drift_summary(rep) -> dict:
    def get(name: str):
        try:
            return rep.test(name)
        except KeyError:
            return None

    mmd, chi = get("embedding.mmd"), get("prediction.chi2")
    text = rep.group("text")
    text_p = [t.p_value for t in text if t.p_value is not None]
    return {
        "drifted": rep.drifted,
        "alpha": rep.alpha,
        "mmd2": mmd.statistic if mmd else None,
        "mmd_p": mmd.p_value if mmd else None,
        "mmd_threshold": mmd.threshold if mmd else None,
        "chi2_p": chi.p_value if chi else None,
        "psi": (chi.extra or {}).get("psi") if chi else None,
        "text_drifted": [t.name for t in text if t.drifted],
        "text_min_p": min(text_p) if text_p else None,
        "alarms": [t.name for t in rep.tests if t.drifted],
    }


# ---------------------------------------------------------------------------------------------- (g) swap
def _wait_for_version(server: _Server, version: int, timeout: float) -> dict:
    import httpx

    want = f"v{version}"
    start, end = time.monotonic(), time.monotonic() + timeout
    reload_status = None
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with contextlib.suppress(httpx.HTTPError):  # the follower polls anyway: reload only speeds it up
            reload_status = c.post("/v1/admin/reload", headers={"X-API-Key": server.key}).status_code
        while True:
            served = c.get("/ready").json().get("version")
            if served == want:
                break
            if server.proc.poll() is not None:
                raise LmloopError(f"lmloop serve exited with {server.proc.returncode}:\n{server.tail()}")
            if time.monotonic() > end:
                raise LmloopError(f"the server still serves {served}, not {want}, after {timeout:.0f} s")
            time.sleep(0.5)
        seconds = time.monotonic() - start
        probes = ["a wonderful, moving film", "this blender broke after a week", "meh. worst day ever :("]
        answers = [c.post("/v1/classify", json={"inputs": [t]}).json() for t in probes]
        models = c.get("/v1/models").json()["data"][0]
    versions = [a.get("version") for a in answers]
    return {
        "version": want,
        "seconds": round(seconds, 1),
        "reload_status": reload_status,
        "probe_versions": versions,
        "served_new_version": all(v == want for v in versions),
        "probes": [
            {"text": t, "label": a["predictions"][0]["label"]} for t, a in zip(probes, answers, strict=True)
        ],
        "models": {k: models.get(k) for k in ("id", "version", "backend", "registry")},
    }


# ---------------------------------------------------------------------------------------------- (h)
def _score_domains(model_dir: str | Path, eval_test: pd.DataFrame, cfg: DemoConfig) -> dict:
    from lmloop.mlops.loop import score

    frames = {d: g.reset_index(drop=True) for d, g in eval_test.groupby("domain", sort=False)}
    frames["shift (pooled)"] = eval_test[eval_test["domain"].isin(cfg.shift_domains)].reset_index(drop=True)
    out = score(model_dir, frames)
    return {k: {"n": v["n"], "accuracy": v["accuracy"], "ece": v.get("ece")} for k, v in out.items() if v}


def _targets(acc: dict, cfg: DemoConfig) -> dict:
    champ, new, oracle = acc["champion"], acc["after"], acc.get("oracle")
    out: dict[str, Any] = {}
    for d in cfg.source_domains:
        drop = champ[d]["accuracy"] - new[d]["accuracy"]
        out[f"{d}: drop <= {cfg.source_drop:.0%}"] = {"value": -drop, "met": drop <= cfg.source_drop + 1e-9}
    for d in [*cfg.shift_domains, "shift (pooled)"]:
        if oracle is None:
            out[f"{d}: within {cfg.oracle_gap:.0%} of oracle"] = {"value": None, "met": None}
            continue
        gap = oracle[d]["accuracy"] - new[d]["accuracy"]
        out[f"{d}: within {cfg.oracle_gap:.0%} of oracle"] = {
            "value": -gap,
            "met": gap <= cfg.oracle_gap + 1e-9,
        }
    return out


# ---------------------------------------------------------------------------------------------- the demo
def run_demo(
    recipe_path: str | Path = "recipes/domain-shift.yaml",
    *,
    quick: bool = False,
    out: str | Path | None = None,
    keep: bool = False,
    overrides: dict | None = None,
) -> dict:
    """Run phases (a)-(i) (module docstring); returns what ``OUT/demo.json`` holds. Raises LmloopError
    when a phase cannot complete; the server is stopped whatever happens."""
    from lmloop.config import load_recipe

    sets = {**(QUICK if quick else {}), **(overrides or {})}
    recipe = load_recipe(recipe_path, sets)
    cfg = recipe.demo
    name = recipe.loop.model_name or recipe.tracking.register or recipe.name
    out = Path(out or recipe.out).resolve()
    if out.exists() and any(out.iterdir()):
        if not ((out / "demo.json").is_file() or (out / "mlflow.db").is_file() or (out / "data").is_dir()):
            raise LmloopError(f"{out} exists and is not a demo directory; choose another --out")
        shutil.rmtree(out)  # an earlier demo: start clean (its registry is its own MLflow store)
    out.mkdir(parents=True)
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    store_url = f"sqlite:///{out / 'predictions.db'}"
    recipe.tracking.uri = tracking_uri
    phases = _Phases()
    result: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "recipe": str(recipe_path),
        "overrides": sets,
        "out": str(out),
        "model_name": name,
        "tracking_uri": tracking_uri,
        "prediction_log": store_url,
        "promoted": False,
        "swapped": False,
    }
    _say(f"{'quick' if quick else 'full'} demo of {recipe_path} -> {out}")
    server: _Server | None = None
    old_term = None
    if hasattr(signal, "SIGTERM") and _main_thread():

        def on_term(signum, frame):  # SIGTERM to the demo: unwind like Ctrl-C, so the server is stopped
            raise KeyboardInterrupt

        old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        # (a) ----------------------------------------------------------------------------------------
        with phases("a", "data"):
            from lmloop.finetune import load_recipe_data

            prepared = load_recipe_data(recipe)
            frames = build_domain_data(prepared, cfg, seed=recipe.data.seed)
            paths = _write_csvs(frames, out / "data")
            counts = {k: len(v) for k, v in frames.items()}
            result["data"] = {
                "source": prepared.source,
                "fingerprint": prepared.fingerprint,
                "rows": counts,
                "stream_domains": frames["stream"]["domain"].value_counts().to_dict(),
                "files": paths,
            }
            _say(
                f"champion train {counts['champion_train']} ({'+'.join(cfg.source_domains)}), golden test "
                f"{counts['golden_test']}; production stream {counts['stream']} "
                f"({', '.join(f'{d} {n}' for d, n in result['data']['stream_domains'].items())}); "
                f"baseline {counts['baseline']}"
            )

        # (b) ----------------------------------------------------------------------------------------
        with phases("b", "fine-tune the champion"):
            from lmloop.finetune import run_recipe
            from lmloop.mlops.registry import Registry

            champ_recipe = _finetune_recipe(
                recipe, f"{recipe.name}-champion", out / "champion",
                paths["champion_train"], paths["champion_validation"], paths["golden_test"],
            )  # fmt: skip
            m = run_recipe(
                champ_recipe, force=True, progress=sys.stderr.isatty(), recipe_path=str(recipe_path)
            )
            reg = Registry(tracking_uri, say=_say)
            v1 = reg.register(out / "champion", name, reason=f"lmloop demo: champion on {cfg.source_domains}")
            reg.promote(name, v1.version, recipe.loop.alias, reason="lmloop demo: first champion")
            result["champion"] = {
                "version": v1.version,
                "path": str(out / "champion"),
                "golden_accuracy": m["test"]["accuracy"],
                "train": m["train"],
            }
            _say(f"champion {name} v{v1.version}: golden test accuracy {m['test']['accuracy']:.4f}")

        # (c) ----------------------------------------------------------------------------------------
        with phases("c", "start the server"):
            key = secrets.token_hex(16)
            server = _Server(
                f"models:/{name}@{recipe.loop.alias}", tracking_uri=tracking_uri, store=store_url,
                log=out / "server.log", key=key, follow_s=2,
            )  # fmt: skip
            ready = server.wait_ready(READY_TIMEOUT_S)
            result["server"] = {
                "url": server.url,
                "argv": server.argv,
                "version_at_start": ready.get("version"),
            }
            _say(f"serving {ready.get('version')} at {server.url} (log {server.log})")

        # (d/e) --------------------------------------------------------------------------------------
        from lmloop.mlops.drift import Reference, cached_embedder

        reference = Reference.load(out / "champion" / "drift_reference.npz")
        embedder = cached_embedder(reference.embedder) if reference.embedder else None
        timeline: list[dict] = []
        with phases("d", "replay production traffic, monitor drift and live accuracy"):
            parts = []
            if len(frames["baseline"]):
                parts.append(("baseline (" + "+".join(cfg.source_domains) + ")", frames["baseline"]))
            stream = frames["stream"]
            k = min(cfg.slices, max(len(stream), 1))
            for i in range(k):
                part = stream.iloc[i * len(stream) // k : (i + 1) * len(stream) // k]
                parts.append((f"production {i + 1}/{k}", part))
            for i, (label, part) in enumerate(parts):
                t0 = time.time()
                s = _replay_slice(server, part, cfg, seed=i, source=label)
                time.sleep(0.5)  # the server commits its prediction log every 100 ms
                t1 = time.time()
                mon = _monitor_slice(store_url, reference, t0, t1, embedder)
                doms = part["domain"].value_counts().to_dict()
                row = {
                    "slice": label,
                    "domains": doms,
                    "sent": s["requests"]["sent"],
                    "errors": s["requests"]["errors"],
                    "feedback": s["feedback"]["ok"],
                    "rate": s.get("achieved_rate"),
                    "client_accuracy": s["accuracy"]["accuracy"],
                    "t": round(time.perf_counter() - phases.t0, 1),
                    **mon,
                }
                timeline.append(row)
                d, lv = mon.get("drift") or {}, mon["live"]
                _say(
                    f"{label}: {row['sent']} requests ({row['errors']} errors), {row['feedback']} feedback; "
                    f"drift {'YES' if d.get('drifted') else 'no'} (MMD p={fmt_float(d.get('mmd_p'))}, "
                    f"alarms {', '.join(d.get('alarms') or []) or 'none'}); live accuracy {fmt_float(lv['accuracy'])} "
                    f"[{fmt_float(lv['low'])}, {fmt_float(lv['high'])}] on {lv['labelled']} labels"
                )
        result["timeline"] = timeline

        # (f) ----------------------------------------------------------------------------------------
        with phases("f", "loop turn (triggers -> challenger -> gates -> promotion)"):
            from lmloop.mlops.loop import format_turn, run_turn

            loop_recipe = copy.deepcopy(champ_recipe)
            loop_recipe.loop.prediction_log = store_url
            loop_recipe.loop.dir = str(out / "loop")
            loop_recipe.loop.model_name = name
            turn = run_turn(loop_recipe, progress=sys.stderr.isatty(), say=_say)
            forced = None
            if turn.decision == "no-trigger":
                # only when the signals legitimately stay quiet (e.g. a tiny stream): say so, then go by hand
                forced = f"no trigger fired ({json.dumps(turn.trigger_checks, default=str)}); started by hand"
                _say(forced)
                turn = run_turn(loop_recipe, force_trigger=True, progress=sys.stderr.isatty(), say=_say)
            print(format_turn(turn), file=sys.stderr, flush=True)
            result["turn"] = {**turn.to_dict(), "forced": forced}
            result["promoted"] = turn.decision == "promoted"

        # (g) ----------------------------------------------------------------------------------------
        new_version = turn.registry.get("after")
        if result["promoted"]:
            with phases("g", "wait for the server to swap"):
                swap = _wait_for_version(server, new_version, SWAP_TIMEOUT_S)
                result["swap"] = swap
                result["swapped"] = swap["served_new_version"]
                _say(
                    f"server swapped to {swap['version']} in {swap['seconds']} s; probes answered by {swap['probe_versions']}"
                )
                # the traffic after the swap, against the new champion's own reference
                new_ref_path = Path(turn.challenger["path"]) / "drift_reference.npz"
                if new_ref_path.is_file():
                    last = frames["after_swap"]
                    t0 = time.time()
                    s = _replay_slice(server, last, cfg, seed=99, source="after the swap")
                    time.sleep(0.5)
                    new_ref = Reference.load(new_ref_path)
                    emb = cached_embedder(new_ref.embedder) if new_ref.embedder else None
                    mon = _monitor_slice(store_url, new_ref, t0, time.time(), emb)
                    timeline.append({
                        "slice": "after the swap (vs new reference)", "domains": last["domain"].value_counts().to_dict(),
                        "sent": s["requests"]["sent"], "errors": s["requests"]["errors"], "feedback": s["feedback"]["ok"],
                        "rate": s.get("achieved_rate"), "client_accuracy": s["accuracy"]["accuracy"],
                        "t": round(time.perf_counter() - phases.t0, 1), **mon,
                    })  # fmt: skip
        else:
            _say(f"not promoted: {turn.reason}")

        # (h) ----------------------------------------------------------------------------------------
        with phases("h", "evaluate on every domain's test split"):
            eval_test = frames["eval_test"]
            acc = {"champion": _score_domains(out / "champion", eval_test, cfg)}
            acc["after"] = (
                _score_domains(turn.challenger["path"], eval_test, cfg)
                if result["promoted"]
                else acc["champion"]
            )
            if cfg.oracle:
                oracle_recipe = _finetune_recipe(
                    recipe, f"{recipe.name}-oracle", out / "oracle",
                    paths["oracle_train"], paths["oracle_validation"], paths["eval_test"],
                )  # fmt: skip
                oracle_recipe.tracking.enabled = False
                oracle_recipe.drift.reference = False
                _say(
                    f"oracle: {len(frames['oracle_train'])} rows of {cfg.source_domains + cfg.shift_domains}, same recipe"
                )
                t = time.perf_counter()
                run_recipe(oracle_recipe, force=True, progress=sys.stderr.isatty())
                phases.seconds["h' oracle fine-tune"] = round(time.perf_counter() - t, 1)
                acc["oracle"] = _score_domains(out / "oracle", eval_test, cfg)
            result["accuracy"] = acc
            result["targets"] = _targets(acc, cfg)
            for d in acc["champion"]:
                o = acc.get("oracle", {}).get(d, {}).get("accuracy")
                _say(
                    f"{d:16s} champion {fmt_float(acc['champion'][d]['accuracy'])}  after {fmt_float(acc['after'][d]['accuracy'])}  oracle {fmt_float(o)}"
                )

        # lineage -------------------------------------------------------------------------------------
        result["lineage"] = _lineage(reg, name)
    except KeyboardInterrupt:
        result["interrupted"] = True
        _say("interrupted: stopping the server")
        raise
    finally:
        if server is not None:
            code = server.stop()
            result.setdefault("server", {})["exit_code"] = code
            _say(f"server stopped (exit {code})")
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        # (i) ----------------------------------------------------------------------------------------
        result["timings_s"] = {**phases.seconds, "total": round(time.perf_counter() - phases.t0, 1)}
        atomic_write_text(out / "demo.json", json.dumps(result, indent=2, default=str))
        try:
            write_demo_html(result, out / "demo.html")
        except Exception as e:  # the report must not hide the phase's own error
            _say(f"could not write demo.html: {e!r}")
        if not keep:
            _cleanup(out, name)
    _say(f"report -> {out / 'demo.html'}, {out / 'demo.json'} ({phases.elapsed()})")
    return result


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _lineage(reg, name: str) -> dict:
    versions = []
    for v in sorted(reg.list(name), key=lambda v: v.version):
        versions.append({
            "version": v.version, "aliases": v.aliases, "parent": v.parent, "created": v.created,
            "base_model": v.base_model, "data_fingerprints": {k: str(x)[:16] for k, x in v.data_fingerprints.items()},
            "feedback": {k: v.feedback.get(k) for k in ("fingerprint", "n")} if v.feedback else None,
            "test_accuracy": v.metrics.get("test.accuracy"), "content_sha256": v.content_sha256[:16],
            "run_id": v.run_id, "description": v.description,
        })  # fmt: skip
    audit = [asdict(a) for a in reg.audit(name)]
    return {"versions": versions, "audit": audit}


def _cleanup(out: Path, name: str) -> None:
    """Without --keep: drop the weights (models, MLflow artifacts, the registry's local copies); the data,
    reports, logs, stores and demo.json/html stay."""
    from lmloop.assets import home

    for p in [out / "champion", out / "oracle", out / "mlartifacts"]:
        shutil.rmtree(p, ignore_errors=True)
    for p in (out / "loop").glob("turns/*/challenger"):
        shutil.rmtree(p, ignore_errors=True)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    for d in (home() / "registry" / name).glob("*"):
        marker = d / ".lmloop-registry.json"
        with contextlib.suppress(OSError, ValueError):
            if json.loads(marker.read_text()).get("uri") == uri:
                shutil.rmtree(d, ignore_errors=True)

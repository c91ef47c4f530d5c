"""``lmloop serve``: load the model, open the prediction log, run uvicorn until SIGTERM/SIGINT.

Shutdown is graceful: uvicorn stops accepting, waits for in-flight requests (up to ``drain_s``), then the
app's lifespan drains the batch queue and commits the prediction log.

A ``models:/NAME@ALIAS`` model is followed (see :mod:`lmloop.serve.follow`): the server reports NAME and
``vN`` and hot-swaps to the alias's new version when it moves (``--no-follow`` pins the startup version).

A causal LM (its config's ``architectures`` end in ``ForCausalLM``, or ``--task generate``) is served with
the OpenAI-compatible API instead (:mod:`lmloop.serve.openai_api`): /v1/completions, /v1/chat/completions.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from lmloop.errors import ConfigError
from lmloop.serve.app import ServeSettings, create_app, model_version
from lmloop.serve.follow import AliasFollower, Served, warm

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    store_url: str | None = None,
    backend: str = "auto",
    settings: ServeSettings | None = None,
    allow_no_key: bool = False,
    drain_s: float = 30.0,
    access_log: bool = False,
    shadow: str | None = None,
    say=print,
) -> None:
    from lmloop.assets import resolve_model
    from lmloop.infer import Predictor
    from lmloop.mlops.predlog import open_store

    settings = settings or ServeSettings()
    api_key = api_key or os.environ.get("LMLOOP_API_KEY") or None
    if not api_key and not _is_loopback(host) and not allow_no_key:
        raise ConfigError(
            f"refusing to listen on {host} without an API key: anyone who can reach it could write feedback. "
            "Set LMLOOP_API_KEY (or --api-key), or pass --allow-no-key if a proxy in front authenticates"
        )
    settings.api_key = api_key
    alias = _alias(model)
    if alias and settings.follow and settings.model_version:
        raise ConfigError(
            f"--model-version cannot be combined with following {model}: every version it moves to reports "
            "its own (vN); pass --no-follow to pin one version under a name of your choosing"
        )
    path = Path(resolve_model(model))
    name, version = _reported(model, path)
    settings.model_name = settings.model_name or name
    settings.model_version = settings.model_version or version
    if is_causal_lm(path, settings.task):
        if shadow or backend not in ("auto", "torch"):
            raise ConfigError(
                f"{model} is a causal LM, served with the OpenAI-compatible API on torch: --shadow and "
                f"--backend {backend} are for classifiers"
            )
        return _serve_generate(model, path, host, port, settings, store_url, drain_s, access_log, say)

    def load(p: Path) -> object:
        # the same backend rules at startup and at every swap (auto: measured once per version)
        return Predictor.from_ref(str(p), backend=backend, batch_size=settings.batch_size)

    def follower_for(uri: str, at: Path, name: str) -> AliasFollower:
        reg_name, reg_alias = _alias(uri)

        def load_version(p: Path, version: int) -> Served:
            pred = load(p)
            warm(pred, p)
            return Served(pred, name, f"v{version}", version, p)

        return AliasFollower(
            reg_name,
            reg_alias,
            int(at.name),
            load=load_version,
            install=None,
            interval_s=settings.follow_interval_s,
        )

    follower = follower_for(model, path, settings.model_name) if alias else None
    shadow_served = shadow_follower = None
    if shadow:
        spath = Path(resolve_model(shadow))
        sname, sversion = _reported(shadow, spath)
        reg_version = int(spath.name) if shadow.startswith("models:/") else None
        shadow_served = Served(load(spath), sname, sversion, reg_version)
        if _alias(shadow):
            shadow_follower = follower_for(shadow, spath, sname)
    store = open_store(store_url)
    predictor = load(path)
    if shadow_served is not None and sorted(shadow_served.labels) != sorted(predictor.labels):
        raise ConfigError(
            f"--shadow {shadow}: its labels {sorted(shadow_served.labels)} differ from the served model's "
            f"{sorted(predictor.labels)}, so agreement would mean nothing"
        )
    app = create_app(
        predictor,
        store,
        settings,
        follower=follower,
        shadow=shadow_served,
        shadow_follower=shadow_follower,
        model_dir=path,
    )
    following = ""
    if follower is not None:
        following = (
            f"  following {model} every {settings.follow_interval_s:g} s"
            if settings.follow
            else f"  pinned to {model} -> {settings.model_version} (--no-follow; POST /v1/admin/reload checks)"
        )
    if shadow_served is not None:
        following += f"  shadow {shadow_served.name} {shadow_served.version}"
    if settings.monitor_interval_s > 0:
        from lmloop.serve.monitoring import ALERTS

        rules = settings.alerts
        watched = [n for n, k in ALERTS.items() if rules is not None and getattr(rules, k) is not None]
        following += f"  monitor every {settings.monitor_interval_s:g} s"
        following += f" (alerts: {', '.join(watched)})" if watched else ""
    say(
        f"serving {settings.model_name} ({settings.model_version}, backend {predictor.backend_name}) on "
        f"http://{host}:{port}  store {store.url}  auth {'on (' + settings.auth_scope + ')' if api_key else 'off'}"
        f"  batching <= {settings.max_batch} texts / {settings.max_wait_ms:g} ms{following}"
    )
    sys.stdout.flush()
    try:
        _run(app, host, port, settings, drain_s, access_log)
    finally:
        store.close()


def is_causal_lm(path: Path, task: str = "auto") -> bool:
    """Whether to serve ``path`` for generation: ``task`` "generate" / "classify" decides; "auto" reads
    config.json (``architectures`` ending in ForCausalLM or LMHeadModel)."""
    if task in ("generate", "classify"):
        return task == "generate"
    if task != "auto":
        raise ConfigError(f"--task {task!r}: expected auto, classify or generate")
    import json

    try:
        archs = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False  # no readable config.json: the classifier path reports what it expects
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _serve_generate(model, path, host, port, settings, store_url, drain_s, access_log, say) -> None:
    """Serve a causal LM with the OpenAI-compatible API (see :mod:`lmloop.serve.openai_api`)."""
    from lmloop.infer.generate import Generator
    from lmloop.mlops.predlog import open_store
    from lmloop.serve.openai_api import create_openai_app

    if settings.max_tokens < 1:
        raise ConfigError(f"--max-tokens {settings.max_tokens}: must be >= 1")
    generator = Generator.load(str(path))
    store = open_store(store_url)
    pinned = "  (registry alias pinned at startup: hot-swap is for classifiers)" if _alias(model) else ""
    app = create_openai_app(generator, store, settings, aliases=(str(model),))
    say(
        f"serving {settings.model_name} ({settings.model_version}, causal LM, context "
        f"{generator.context_length}) with the OpenAI API on http://{host}:{port}/v1  store {store.url}  "
        f"auth {'on (' + settings.auth_scope + ')' if settings.api_key else 'off'}  "
        f"{'continuous' if settings.gen_continuous else 'static'} batching <= "
        f"{settings.gen_max_batch} requests / {settings.gen_max_wait_ms:g} ms  max_tokens <= "
        f"{settings.max_tokens}{pinned}"
    )
    sys.stdout.flush()
    try:
        _run(app, host, port, settings, drain_s, access_log)
    finally:
        store.close()


def _run(app, host: str, port: int, settings: ServeSettings, drain_s: float, access_log: bool) -> None:
    """uvicorn until SIGTERM/SIGINT, with a graceful drain; a requested stop exits 0."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        # uvicorn logs access lines at INFO: under "warning" --access-log would print nothing
        log_level="info" if access_log else "warning",
        access_log=access_log,
        timeout_graceful_shutdown=drain_s,
        # far above what the bounded queue admits: overload is answered by our JSON 429, not uvicorn's 503
        limit_concurrency=max(4096, 4 * settings.max_queue),
        server_header=False,
        lifespan="on",
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # uvicorn re-raises a caught SIGTERM/SIGINT once shut down, so a graceful stop would end as
            # "killed by SIGTERM" (143) or as a KeyboardInterrupt (130); a requested stop is a clean exit 0
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    Server(config).run()


def _alias(ref: str | None) -> tuple[str, str] | None:
    """(NAME, ALIAS) for a ``models:/NAME@ALIAS`` reference, else None (a pinned version, a directory)."""
    if not ref or not str(ref).startswith("models:/"):
        return None
    from lmloop.mlops.registry import parse_uri

    name, alias, _ = parse_uri(str(ref))
    return (name, alias) if alias else None


def _reported(ref: str, path: Path) -> tuple[str, str]:
    """(name, version) reported for a model: a registry URI (downloaded into registry/NAME/VERSION) is
    NAME and vVERSION, the same name across the versions an alias moves through; a directory is its
    folder name and the sha256 of its weights."""
    if str(ref).startswith("models:/"):
        from lmloop.mlops.registry import parse_uri

        return parse_uri(str(ref))[0], f"v{path.name}"
    return path.name, model_version(path)

"""``lmloop serve``: load the model, open the prediction log, run uvicorn until SIGTERM/SIGINT.

Shutdown is graceful: uvicorn stops accepting, waits for in-flight requests (up to ``drain_s``), then the
app's lifespan drains the batch queue and commits the prediction log.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from lmloop.errors import ConfigError
from lmloop.serve.app import ServeSettings, create_app, model_version

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
    say=print,
) -> None:
    import uvicorn

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
    path = Path(resolve_model(model))
    settings.api_key = api_key
    if not settings.model_name:
        # a registry URI downloads into registry/NAME/VERSION: report NAME-vVERSION, not the bare number
        registry = str(model).startswith("models:/")
        settings.model_name = f"{path.parent.name}-v{path.name}" if registry else path.name
    if not settings.model_version:
        settings.model_version = model_version(path)
    store = open_store(store_url)
    predictor = Predictor.from_ref(str(path), backend=backend, batch_size=settings.batch_size)
    app = create_app(predictor, store, settings)
    say(
        f"serving {settings.model_name} ({settings.model_version}, backend {predictor.backend_name}) on "
        f"http://{host}:{port}  store {store.url}  auth {'on (' + settings.auth_scope + ')' if api_key else 'off'}"
        f"  batching <= {settings.max_batch} texts / {settings.max_wait_ms:g} ms"
    )
    sys.stdout.flush()
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

    try:
        Server(config).run()
    finally:
        store.close()

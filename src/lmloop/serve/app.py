"""The HTTP server: a thin adapter, decode -> (micro-batched) predict -> record -> encode.

Endpoints (see :func:`create_app`)::

    POST /v1/classify   {"inputs": ["text", ...]} -> {"model", "version", "predictions": [{"id", "label",
                        "score", "scores"}]}; every prediction is recorded in the prediction log
    POST /v1/feedback   {"prediction_id", "label", "comment"?} -> the stored feedback (durable when answered)
    GET  /v1/models     the served model: name, version, labels, backend and how it was chosen; the
                        registry alias followed and the shadow model's agreement, when there are
    POST /v1/admin/reload  (API key) look at the followed registry alias now; swap if it moved
    GET  /health        alive;  GET /ready: model loaded and warmed, not shutting down
    GET  /metrics       Prometheus text;  GET /docs, /openapi.json
    GET  /v1/monitor    live monitoring snapshot and alerts;  GET /v1/feedback/recent (API key);
                        GET /dashboard: the page over them (see lmloop.serve.dashboard, .monitoring)

Errors are JSON ``{"error": {"code": ..., "message": ...}}`` with the right 4xx: 400 malformed JSON,
401 missing/wrong API key, 404 unknown prediction id, 413 body or input too large, 422 wrong types /
empty list / unknown label, 429 queue full (Retry-After), 503 shutting down, 504 timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmloop.serve.batcher import LogWriter, MicroBatcher, QueueFull, ShuttingDown
from lmloop.serve.follow import AliasFollower, Served, Shadow


@dataclass
class ServeSettings:
    """Server knobs; every one is a ``lmloop serve`` flag."""

    max_batch: int = 128  # texts merged from concurrent requests into one batch
    batch_size: int = 32  # most texts per forward pass: a batch is cut by length (plan_batches)
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue: int = 2048  # texts waiting for inference before new requests get 429
    timeout_s: float = 30.0  # per request, queue wait included -> 504
    max_body_bytes: int = 1_000_000  # -> 413
    max_inputs: int = 256  # texts per request -> 413
    max_text_chars: int = 20_000  # characters per text -> 413 (the model reads max_length tokens anyway)
    log_text: str = "full"  # "full": the text goes to the prediction log; "hash": only its sha256
    api_key: str | None = None
    auth_scope: str = "writes"  # "writes": key on /v1/feedback; "all": on /v1/classify too
    model_name: str = ""  # "" -> the model folder's name
    model_version: str = ""  # "" -> sha256 of the weights
    max_log_backlog: int = 200_000  # prediction records not yet committed before classify gets 503
    follow: bool = True  # a models:/NAME@ALIAS model: poll the alias and hot-swap when it moves
    follow_interval_s: float = 10.0  # seconds between registry polls
    shadow_max_queue: int = 2048  # texts waiting for the shadow model before more are dropped
    monitor_interval_s: float = 30.0  # seconds between monitoring ticks and alert checks (0: on demand)
    alerts: Any = None  # lmloop.config.AlertsConfig (--alerts FILE); None: no thresholds watched
    # causal LMs (the OpenAI-compatible API, lmloop.serve.openai_api)
    task: str = "auto"  # "auto": a config whose architectures end in ForCausalLM is served for generation
    max_tokens: int = 512  # most tokens a request may ask for (max_tokens) -> 400 beyond
    gen_max_batch: int = 16  # concurrent requests decoded together as one batch
    gen_max_wait_ms: float = 20.0  # how long the first request of a batch waits for company
    gen_continuous: bool = True  # new requests join the running batch between decode steps


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def check_api_key(headers, key: bytes | None) -> None:
    """Raise a 401 :class:`ApiError` unless ``headers`` carry ``key`` (X-API-Key or Authorization: Bearer);
    ``key`` None: no key is set, anything passes. Shared by the classification and OpenAI apps."""
    if key is None:
        return
    got = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if got is None and auth.lower().startswith("bearer "):
        got = auth[7:].strip()
    # constant-time comparison (on digests, so the length does not leak either)
    if got is None or not hmac.compare_digest(
        hashlib.sha256(got.encode()).digest(), hashlib.sha256(key).digest()
    ):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong API key: send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>'",
            {"WWW-Authenticate": "Bearer"},
        )


def _dumps(obj: Any) -> bytes:
    import orjson

    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def _json(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_dumps(obj), status_code=status, media_type="application/json", headers=headers)


def _error(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    return _json({"error": {"code": code, "message": message}}, status, headers)


# ---------------------------------------------------------------------------------------------- schemas
class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    inputs: list[str] = Field(min_length=1, description="texts to classify (1..max_inputs)")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prediction_id: str = Field(min_length=1, max_length=64)
    label: str = Field(min_length=1, max_length=200)
    comment: str | None = Field(default=None, max_length=4000)


def _body_schema(model: type[BaseModel]) -> dict:
    # bodies are parsed by _parse (any content type, JSON errors as 400); the docs still show the schema
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


async def _parse(request: Request, model: type[BaseModel]):
    return _decode(await request.body(), model)


def _decode(body: bytes, model: type[BaseModel]):
    """Decode a JSON body whatever its Content-Type (curl -d sends form-encoded) and validate it."""
    import orjson
    from pydantic import ValidationError

    if not body.strip():
        raise ApiError(
            400, "malformed_json", f"empty request body; expected a JSON object like {_EXAMPLES[model]}"
        )
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, "malformed_json", f"the request body is not valid JSON: {e}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        parts = []
        for err in e.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
            parts.append(f"{loc}: {err.get('msg')}")
        raise ApiError(
            422, "invalid_request", "; ".join(parts) + f" (expected e.g. {_EXAMPLES[model]})"
        ) from None


_EXAMPLES = {
    ClassifyRequest: '{"inputs": ["text one", "text two"]}',
    FeedbackRequest: '{"prediction_id": "<id from /v1/classify>", "label": "<one of the model\'s labels>"}',
}


# ---------------------------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus series on a private registry (several apps in one process stay separate)."""

    def __init__(self, settings: ServeSettings, backend: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.latency = Histogram(
            "lmloop_request_seconds", "Request latency", ["endpoint"], buckets=lat, registry=r
        )
        self.requests = Counter(
            "lmloop_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
        self.batch_size = Histogram("lmloop_batch_size", "Texts per forward pass", buckets=sizes, registry=r)
        self.batch_seconds = Histogram("lmloop_batch_seconds", "Forward pass time", buckets=lat, registry=r)
        self.queue_depth = Gauge("lmloop_queue_depth", "Texts waiting for inference", registry=r)
        self.predictions = Counter("lmloop_predictions", "Predictions by label", ["label"], registry=r)
        self.feedback = Counter("lmloop_feedback", "Feedback by outcome", ["outcome"], registry=r)
        self.log_backlog = Gauge("lmloop_predlog_backlog", "Prediction records not yet committed", registry=r)
        self.log_failures = Counter(
            "lmloop_predlog_write_failures", "Failed prediction-log writes", registry=r
        )
        self.model_info = Gauge(
            "lmloop_model_info",
            "The served model (one series: the live one)",
            ["model", "version", "backend"],
            registry=r,
        )
        self.model_info.labels(settings.model_name, settings.model_version, backend).set(1)
        self._info = (settings.model_name, settings.model_version, backend)
        self.registry_version = Gauge(
            "lmloop_model_registry_version",
            "Registry version being served (0: not from the registry)",
            registry=r,
        )
        self.swaps = Counter("lmloop_model_swaps", "Hot swaps to a new registry version", registry=r)
        self.swap_failures = Counter(
            "lmloop_model_swap_failures",
            "Alias moves not (yet) served, by reason: registry (unreadable), load (retried), labels (refused)",
            ["reason"],
            registry=r,
        )
        self.shadow_predictions = Counter(
            "lmloop_shadow_predictions",
            "Texts scored by the shadow model, by agreement",
            ["agree"],
            registry=r,
        )
        conf = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
        self.shadow_confidence = Histogram(
            "lmloop_shadow_confidence", "The shadow model's top probability", buckets=conf, registry=r
        )
        self.shadow_dropped = Counter(
            "lmloop_shadow_dropped", "Texts the shadow model skipped (its queue was full)", registry=r
        )
        self.shadow_info = Gauge(
            "lmloop_shadow_info", "The shadow model", ["model", "version", "backend"], registry=r
        )

    def set_model(self, served: Served) -> None:
        """Point lmloop_model_info at ``served`` (the old version's series goes: one live series)."""
        new = (served.name, served.version, served.backend)
        if new != self._info:
            with contextlib.suppress(KeyError):
                self.model_info.remove(*self._info)
            self.model_info.labels(*new).set(1)
            self._info = new
        self.registry_version.set(served.registry_version or 0)

    def set_shadow(self, served: Served) -> None:
        self.shadow_info.clear()
        self.shadow_info.labels(served.name, served.version, served.backend).set(1)


# --------------------------------------------------------------------------------------------- the app
@dataclass
class _State:
    ready: bool = False
    closing: bool = False
    batcher: MicroBatcher | None = None
    writer: LogWriter | None = None
    served: Served | None = None  # the live model (the inference thread swaps at a batch boundary)
    shadow: Shadow | None = None
    extra: dict = field(default_factory=dict)


def create_app(
    predictor,
    store,
    settings: ServeSettings,
    *,
    follower: AliasFollower | None = None,
    shadow: Served | None = None,
    shadow_follower: AliasFollower | None = None,
    model_dir: str | Path | None = None,
) -> FastAPI:
    """The FastAPI app serving ``predictor`` and recording to ``store`` (a :mod:`lmloop.mlops.predlog` store).

    ``follower`` (a registry alias being served): wired here to swap the live model; it polls when
    ``settings.follow``, and ``POST /v1/admin/reload`` runs it at once either way. ``shadow``: a model
    scoring the same texts off the request path (``shadow_follower`` keeps it on its own alias).
    ``model_dir``: the served model's directory (its drift reference is looked for there).
    """
    from lmloop.mlops.predlog import FeedbackRecord, PredictionRecord

    metrics = Metrics(settings, predictor.backend_name)
    state = _State()
    state.served = Served(
        predictor,
        settings.model_name,
        settings.model_version,
        follower.version if follower else None,
        Path(model_dir) if model_dir is not None else None,
    )
    metrics.set_model(state.served)
    from lmloop.serve.monitoring import Monitor

    monitor = Monitor(
        store,
        settings.alerts,
        interval_s=settings.monitor_interval_s,
        served=lambda: state.served,
        requests=metrics.requests,
        registry=metrics.registry,
        keep_texts=settings.log_text != "full",
        follower=follower,
    )
    key = settings.api_key.encode() if settings.api_key else None

    def install(served: Served) -> None:
        # called on the follower's thread, with ``served`` loaded and warmed: one assignment in the
        # batcher (read by the inference thread once per batch), then the reporting side
        state.batcher.swap(served.predictor.predict_proba, served)
        state.served = served
        metrics.set_model(served)
        metrics.swaps.inc()

    def same_labels(served: Served) -> str | None:
        old, new = sorted(state.served.labels), sorted(served.labels)
        if old != new:
            return (
                f"its labels {new} differ from the served model's {old} (clients and feedback rely on them)"
            )
        return None

    def counted(kind: str, detail: str) -> None:
        reason = {"registry_failed": "registry", "load_failed": "load", "refused": "labels"}.get(kind)
        if reason:
            metrics.swap_failures.labels(reason).inc()

    if follower is not None:
        follower.install, follower.accept, follower.on_event = install, same_labels, counted

    def install_shadow(served: Served) -> None:
        state.shadow.swap(served)
        metrics.set_shadow(served)

    def shadow_labels(served: Served) -> str | None:
        if sorted(served.labels) != sorted(state.served.labels):
            return (
                f"its labels {sorted(served.labels)} differ from the champion's {sorted(state.served.labels)}"
            )
        return None

    if shadow_follower is not None:
        shadow_follower.install, shadow_follower.accept = install_shadow, shadow_labels

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        def on_batch(n: int, seconds: float) -> None:
            metrics.batch_size.observe(n)
            metrics.batch_seconds.observe(seconds)

        state.batcher = MicroBatcher(
            predictor.predict_proba,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            on_batch=on_batch,
            tag=state.served,
        )
        # predictions are committed every 100 ms (one fsync per batch); feedback forces a commit at once
        state.writer = LogWriter(store, flush_ms=100, on_error=lambda e: metrics.log_failures.inc())
        metrics.queue_depth.set_function(lambda: state.batcher.depth if state.batcher else 0)
        metrics.log_backlog.set_function(lambda: state.writer.backlog if state.writer else 0)
        # warm-up: first-call allocations (and ORT's first run) are paid before /ready says yes
        await asyncio.to_thread(predictor.predict_proba, ["warm-up"] * min(8, settings.max_batch))
        if shadow is not None:
            await asyncio.to_thread(shadow.predictor.predict_proba, ["warm-up"] * 4)
            state.shadow = Shadow(
                shadow,
                max_texts=settings.shadow_max_queue,
                on_scored=on_shadow,
                on_dropped=lambda n: metrics.shadow_dropped.inc(n),
            )
            metrics.set_shadow(shadow)
        followers = [f for f in (follower, shadow_follower) if f is not None]
        if settings.follow:
            for f in followers:
                f.start()
        state.ready = True
        monitor.start()
        try:
            yield
        finally:
            # uvicorn has stopped accepting and waited for in-flight requests; drain and commit
            state.ready, state.closing = False, True
            await asyncio.to_thread(monitor.close)
            for f in followers:
                await asyncio.to_thread(f.close)
            await asyncio.to_thread(state.batcher.close)
            await asyncio.to_thread(state.writer.close)
            if state.shadow is not None:
                await asyncio.to_thread(state.shadow.close)

    def on_shadow(agree, confidence) -> None:
        n_agree = int(agree.sum())
        if n_agree:
            metrics.shadow_predictions.labels("yes").inc(n_agree)
        if len(agree) > n_agree:
            metrics.shadow_predictions.labels("no").inc(len(agree) - n_agree)
        for c in confidence.tolist():
            metrics.shadow_confidence.observe(c)

    app = FastAPI(
        title="lmloop server",
        version=settings.model_version,
        description=f"Classifier `{settings.model_name}` (labels: {', '.join(state.served.labels)}). "
        "Every prediction is recorded; attach true labels with /v1/feedback.",
        lifespan=lifespan,
    )
    app.state.lmloop = state

    async def require_key(request: Request) -> None:  # async: a sync dependency costs a thread hop
        check_key(request.headers)

    def check_key(headers) -> None:
        check_api_key(headers, key)

    async def require_key_for_all(request: Request) -> None:
        if settings.auth_scope == "all":
            await require_key(request)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error(e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        if any(err.get("type") == "json_invalid" for err in errs):
            err = next(err for err in errs if err.get("type") == "json_invalid")
            pos = (err.get("ctx") or {}).get("error", "")
            return _error(
                400, "malformed_json", f"the request body is not valid JSON ({pos})".replace(" ()", "")
            )
        parts = []
        for err in errs[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {err.get('msg')}")
        return _error(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, "http_error", str(e.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # pragma: no cover - a bug, reported as such
        return _error(500, "internal", f"internal error ({type(e).__name__}); see the server log")

    async def classify_core(body: bytes, headers) -> tuple[bytes, dict]:
        """The whole of /v1/classify after auth: decode -> batch -> record -> encode (raises ApiError)."""
        req = _decode(body, ClassifyRequest)
        if state.closing or state.batcher is None:
            raise ApiError(503, "shutting_down", "the server is shutting down; retry on another replica")
        t0 = time.perf_counter()
        texts = req.inputs
        if len(texts) > settings.max_inputs:
            raise ApiError(
                413, "too_many_inputs", f"{len(texts)} inputs; at most {settings.max_inputs} per request"
            )
        for i, t in enumerate(texts):
            if len(t) > settings.max_text_chars:
                raise ApiError(
                    413,
                    "input_too_long",
                    f"inputs[{i}] has {len(t)} characters; at most {settings.max_text_chars}",
                )
        if state.writer.backlog > settings.max_log_backlog:
            raise ApiError(
                503, "log_behind", "the prediction log is behind; retry shortly", {"Retry-After": "1"}
            )
        try:
            # ``served``: the model that actually ran this request's batch (a swap may have happened
            # since the request arrived); its labels, name and version go into the answer and the log
            probs, served = await asyncio.wait_for(state.batcher.submit_tagged(texts), settings.timeout_s)
        except QueueFull as e:
            raise ApiError(429, "busy", str(e), {"Retry-After": str(max(1, round(e.retry_after)))}) from None
        except ShuttingDown:
            raise ApiError(
                503, "shutting_down", "the server is shutting down; retry on another replica"
            ) from None
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {settings.timeout_s:g} s") from None
        latency_ms = (time.perf_counter() - t0) * 1000
        request_id = headers.get("x-request-id")
        preds, records = [], []
        keep = settings.log_text == "full"
        labels = served.labels
        for text, row in zip(texts, probs, strict=True):
            k = int(row.argmax())
            scores = {lab: float(p) for lab, p in zip(labels, row, strict=True)}
            rec = PredictionRecord.new(
                model=served.name,
                version=served.version,
                text=text,
                label=labels[k],
                score=float(row[k]),
                scores=scores,
                latency_ms=latency_ms,
                request_id=request_id,
                store_text=keep,
            )
            if request_id is None:  # no client id: the request is named after its first prediction
                request_id = rec.request_id = rec.id
            records.append(rec)
            preds.append({"id": rec.id, "label": rec.label, "score": rec.score, "scores": scores})
            metrics.predictions.labels(rec.label).inc()
        state.writer.add(records)
        monitor.observe(served.version, texts, [p["label"] for p in preds])
        if state.shadow is not None:  # scored later on the shadow's own thread; never waited for
            state.shadow.offer(texts, [p["label"] for p in preds])
        payload = {"model": served.name, "version": served.version, "predictions": preds}
        return _dumps(payload), {"X-Request-ID": request_id}

    @app.post(
        "/v1/classify",
        dependencies=[Depends(require_key_for_all)],
        openapi_extra=_body_schema(ClassifyRequest),
    )
    async def classify(request: Request):
        """Classify texts. Each prediction gets a durable, unique id to attach feedback to."""
        # (served by FastClassify below; this route documents it and is the path when it is off)
        body, headers = await classify_core(await request.body(), request.headers)
        return Response(body, media_type="application/json", headers=headers)

    app.state.classify_core = classify_core
    app.state.check_key = check_key

    @app.post(
        "/v1/feedback", dependencies=[Depends(require_key)], openapi_extra=_body_schema(FeedbackRequest)
    )
    async def feedback(request: Request):
        """Attach the true label to a recorded prediction. Durable once answered."""
        req = await _parse(request, FeedbackRequest)
        labels = state.served.labels
        if req.label not in labels:
            raise ApiError(
                422, "unknown_label", f"label '{req.label}' is not one of the model's labels {labels}"
            )
        fb = FeedbackRecord(prediction_id=req.prediction_id, label=req.label, comment=req.comment)
        try:
            stored = await asyncio.to_thread(store.add_feedback, fb)
        except KeyError:
            # the prediction may still be in the log writer's batch: commit it, then look again
            await asyncio.to_thread(state.writer.flush)
            try:
                stored = await asyncio.to_thread(store.add_feedback, fb)
            except KeyError:
                # or another replica sharing the store served it a moment ago and commits it soon
                stored = await _await_other_replica(store, fb)
                if stored is None:
                    raise ApiError(
                        404, "unknown_prediction", f"no prediction with id '{req.prediction_id}'"
                    ) from None
        pred = await asyncio.to_thread(store.get_prediction, req.prediction_id)
        outcome = "correct" if pred is not None and pred.label == req.label else "incorrect"
        metrics.feedback.labels(outcome).inc()
        return _json(
            {
                "id": stored.id,
                "prediction_id": stored.prediction_id,
                "label": stored.label,
                "predicted": pred.label if pred else None,
                "created_at": stored.created_at,
            }
        )

    @app.get("/v1/models")
    async def models():
        """The served model and how its backend was chosen; the registry alias it follows and the
        shadow model's agreement with it, when there are."""
        served = state.served
        p = served.predictor
        cal = getattr(p, "calibration", None) or {}
        entry = {
            "id": served.name,
            "version": served.version,
            "labels": served.labels,
            "backend": served.backend,
            "max_length": getattr(p, "max_length", None),
            "backend_measurement": cal.get("results", {}).get(served.backend),
        }
        if follower is not None:
            entry["registry"] = follower.status()
        if state.shadow is not None:
            entry["shadow"] = state.shadow.summary()
            if shadow_follower is not None:
                entry["shadow"]["registry"] = shadow_follower.status()
        return _json({"data": [entry]})

    @app.post("/v1/admin/reload", dependencies=[Depends(require_key)])
    async def reload():
        """Look at the followed registry alias now (and the shadow's); load, warm and swap if it moved.
        Answers when done: what happened, and the version now served."""
        if follower is None and shadow_follower is None:
            raise ApiError(
                409,
                "not_following",
                "the server was not started on a registry alias (--model models:/NAME@ALIAS): nothing to reload",
            )
        out = {}
        if follower is not None:
            out["model"] = await asyncio.to_thread(follower.check, True)
        if shadow_follower is not None:
            out["shadow"] = await asyncio.to_thread(shadow_follower.check, True)
        out["version"] = state.served.version
        return _json(out)

    @app.get("/health")
    async def health():
        return _json({"status": "alive"})

    @app.get("/ready")
    async def ready():
        if state.ready and not state.closing:
            return _json({"status": "ready", "model": state.served.name, "version": state.served.version})
        return _error(
            503, "not_ready", "shutting down" if state.closing else "loading / warming up the model"
        )

    from lmloop.serve.dashboard import add_routes

    add_routes(app, monitor, store, require_key, lambda: state.served, _json, ApiError)
    app.state.monitor = monitor

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = {
        "/v1/classify",
        "/v1/feedback",
        "/v1/models",
        "/health",
        "/ready",
        "/metrics",
        "/v1/admin/reload",
        "/v1/monitor",
        "/v1/feedback/recent",
        "/dashboard",
    }
    # Observe outermost so 413s from BodyLimit are counted too
    return Observe(
        BodyLimit(FastClassify(app, settings.auth_scope == "all"), settings.max_body_bytes), metrics, routes
    )


async def _await_other_replica(store, fb, window_s: float = 5.0, patience_s: float = 1.0):
    """A prediction served by another replica sharing the store reaches it within that replica's log
    flush (~50 ms). When the id's ULID timestamp says it was issued in the last ``window_s`` seconds,
    look again for up to ``patience_s`` before answering 404."""
    from lmloop.mlops.predlog import ulid_time

    issued = ulid_time(fb.prediction_id)
    if issued is None or not (0 <= time.time() - issued <= window_s):
        return None
    end = time.monotonic() + patience_s
    while time.monotonic() < end:
        await asyncio.sleep(0.05)
        try:
            return await asyncio.to_thread(store.add_feedback, fb)
        except KeyError:
            continue
    return None


# ------------------------------------------------------------------------------------- ASGI middleware
class Observe:
    """Latency histogram and status counter for every request (unknown paths count as 'other')."""

    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    def __getattr__(self, name):  # expose the FastAPI app's attributes (state, routes, openapi) to callers
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in self.routes else "other"
        status = {"code": 0}
        t0 = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            status["code"] = status["code"] or 500
            raise
        finally:
            # no response and no error: the client went away first (nginx's 499), not a server error
            code = status["code"] or 499
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(endpoint, str(code)).inc()


class FastClassify:
    """POST /v1/classify straight from ASGI to ``classify_core``, skipping FastAPI's routing and
    dependency machinery: on a 2-core machine under 64 concurrent clients that machinery was ~40% of
    the server's per-request CPU, CPU the model then lacked. Same code, same errors; the FastAPI route
    still documents the endpoint (and serves it if this layer is removed)."""

    def __init__(self, app, auth_all: bool):
        self.app, self.auth_all = app, auth_all

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/classify" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        headers = _Headers(scope)
        state = self.app.state
        try:
            if self.auth_all:
                state.check_key(headers)
            body, extra = await state.classify_core(b"".join(chunks), headers)
            status = 200
        except ApiError as e:
            status, extra = e.status, e.headers
            body = _dumps({"error": {"code": e.code, "message": e.message}})
        out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        out += [(k.lower().encode(), str(v).encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": body})


class _Headers:
    """Case-insensitive ``get`` over an ASGI scope's raw headers (what classify_core needs)."""

    def __init__(self, scope):
        self._h = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}

    def get(self, name: str, default=None):
        return self._h.get(name.lower(), default)


class BodyLimit:
    """413 for bodies over ``max_bytes``: at once from Content-Length, else while reading (chunked)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        cl = headers.get(b"content-length")
        if cl is not None and cl.isdigit() and int(cl) > self.max_bytes:
            return await self._reject(send, int(cl))
        # no (or a small) Content-Length: read the body here, bounded, then replay it to the app
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._reject(send, size)
            chunks.append(body)
            if not msg.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send, size: int) -> None:
        msg = json.dumps(
            {
                "error": {
                    "code": "body_too_large",
                    "message": f"request body of {size} bytes is over the limit of {self.max_bytes} bytes "
                    "(lmloop serve --max-body-bytes)",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(msg)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": msg})


def model_version(model_dir: str | Path) -> str:
    """A stable version for a model directory: the first 12 hex of its weight file's sha256."""
    d = Path(model_dir)
    for name in ("model.safetensors", "model.onnx"):
        p = d / name
        if p.is_file():
            h = hashlib.sha256()
            with p.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            return "sha256:" + h.hexdigest()[:12]
    return "unknown"

"""The OpenAI-compatible API for causal LMs: what ``lmloop serve --model smollm2`` answers.

Endpoints (see :func:`create_openai_app`)::

    POST /v1/completions        {"model", "prompt", "max_tokens"?, "temperature"?, "top_p"?, "stop"?, "seed"?,
                                "stream"?} -> a text_completion (the prompt is read as plain text)
    POST /v1/chat/completions   {"model", "messages": [{"role", "content"}], ...} -> a chat.completion
                                (the model's chat template renders the messages)
    GET  /v1/models             the served model
    POST /v1/feedback           (API key) {"prediction_id": <a completion's id>, "label", "comment"?}
    GET  /health, /ready, /metrics (Prometheus), /docs

``"stream": true`` answers server-sent events (``data: {chunk}``, OpenAI's chunk objects) ending with
``data: [DONE]``; ``stream_options.include_usage`` adds a last chunk with the token counts. Every answer
carries ``usage`` (prompt_tokens, completion_tokens, total_tokens) and ``finish_reason`` ("stop": end of
sequence or a stop string; "length": max_tokens or the context window). ``n`` must be 1 and ``user`` is
ignored. Extensions outside OpenAI's API (``top_k``, ``repetition_penalty``) ride in the body, e.g. with
the openai client's ``extra_body``.

Requests from concurrent clients are decoded together (:mod:`lmloop.serve.genbatch`: continuous batching,
new requests join the running batch between decode steps) and each one is recorded in the prediction log
(kind "completion" / "chat"), so feedback works on a completion's id.
Errors are OpenAI's objects, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for
every bad request (400 bad JSON / fields / limits, 401 API key, 404 unknown model or id, 413 body too
large, 429 queue full); a 5xx means a bug or a shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from lmloop.serve.app import (
    ApiError,
    BodyLimit,
    FeedbackRequest,
    Metrics,
    Observe,
    ServeSettings,
    _await_other_replica,
    _body_schema,
    _dumps,
    check_api_key,
)
from lmloop.serve.batcher import LogWriter
from lmloop.serve.genbatch import GenJob, GenScheduler, QueueFull, ShuttingDown
from lmloop.serve.openai_schemas import (
    ChatRequest,
    CompletionRequest,
    OpenAIError,
    decode_request,
    error_body,
    from_api_error,
    prepare,
)

ROUTES = {
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/feedback",
    "/health",
    "/ready",
    "/metrics",
}
ID_PREFIX = {"completion": "cmpl-", "chat": "chatcmpl-"}


# --------------------------------------------------------------------------------------------- the app
class _BodyLimit(BodyLimit):
    """The classification app's body limit, answering with OpenAI's error object."""

    async def _reject(self, send, size: int) -> None:
        msg = error_body(
            413,
            f"request body of {size} bytes is over the limit of {self.max_bytes} bytes "
            "(lmloop serve --max-body-bytes)",
            code="body_too_large",
        )
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(msg)).encode())]
        await send(
            {"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]}
        )
        await send({"type": "http.response.body", "body": msg})


def _finish(reason: str) -> str:
    # an end-of-sequence token and a stop string are both "stop" in OpenAI's terms
    return "length" if reason == "length" else "stop"


def create_openai_app(generator: Any, store: Any, settings: ServeSettings, *, aliases: tuple[str, ...] = ()):
    """The ASGI app serving ``generator`` (a :class:`lmloop.infer.generate.Generator`) with OpenAI's API,
    recording every generation to ``store`` (a :mod:`lmloop.mlops.predlog` store). ``aliases``: other
    names the ``model`` field may use (e.g. the reference given on the command line)."""
    from prometheus_client import Counter, Histogram

    from lmloop.mlops.predlog import FeedbackRecord, PredictionRecord, new_prediction_id

    metrics = Metrics(settings, "torch")
    r = metrics.registry
    tokens = Counter("lmloop_generated_tokens", "Tokens generated", ["kind"], registry=r)
    prompt_tokens = Counter("lmloop_prompt_tokens", "Prompt tokens read", ["kind"], registry=r)
    finishes = Counter("lmloop_generations", "Generations by finish reason", ["finish_reason"], registry=r)
    ttft = Histogram(
        "lmloop_time_to_first_token_seconds",
        "From request to the first text piece (queue wait included)",
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        registry=r,
    )
    rows_per_step = Histogram(
        "lmloop_decode_rows",
        "Sequences decoded together per decode step (continuous batching: requests join and leave)",
        buckets=(1, 2, 4, 8, 16, 32, 64),
        registry=r,
    )
    key = settings.api_key.encode() if settings.api_key else None
    names = {settings.model_name, *aliases}
    st: dict[str, Any] = {"ready": False, "closing": False, "scheduler": None, "writer": None}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        def on_batch(rows: int, seconds: float, n_tokens: int) -> None:
            metrics.batch_size.observe(rows)
            metrics.batch_seconds.observe(seconds)

        st["writer"] = LogWriter(store, flush_ms=100, on_error=lambda e: metrics.log_failures.inc())
        # warm-up: the first forward pass allocates; paid before /ready says yes
        await asyncio.to_thread(
            generator.generate_batch,
            [generator.tokenizer("hi")["input_ids"] or [0]],
            [{"max_new_tokens": 2, "temperature": 0}],
        )
        st["scheduler"] = GenScheduler(
            generator,
            max_batch=settings.gen_max_batch,
            max_wait_ms=settings.gen_max_wait_ms,
            max_queue=settings.max_queue,
            queue_timeout_s=settings.timeout_s,
            continuous=settings.gen_continuous,
            on_batch=on_batch,
            on_step=rows_per_step.observe,
        )
        metrics.queue_depth.set_function(lambda: st["scheduler"].depth if st["scheduler"] else 0)
        metrics.log_backlog.set_function(lambda: st["writer"].backlog if st["writer"] else 0)
        st["ready"] = True
        try:
            yield
        finally:
            st["ready"], st["closing"] = False, True
            await asyncio.to_thread(st["scheduler"].close)
            await asyncio.to_thread(st["writer"].close)

    app = FastAPI(
        title="lmloop server (OpenAI-compatible)",
        version=settings.model_version,
        description=f"Causal LM `{settings.model_name}`: /v1/completions and /v1/chat/completions. "
        "Every generation is recorded; attach feedback to its id with /v1/feedback.",
        lifespan=lifespan,
    )

    def error_response(e: OpenAIError) -> Response:
        body = error_body(e.status, e.message, e.param, e.code, e.type)
        return Response(body, status_code=e.status, media_type="application/json", headers=e.headers)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, e: OpenAIError):
        return error_response(e)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(from_api_error(e))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # pragma: no cover - a bug, reported as such
        return error_response(OpenAIError(500, f"internal error ({type(e).__name__}); see the server log"))

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in err.get("loc", ())) or "request"
        return error_response(OpenAIError(400, f"{loc}: {err.get('msg', 'invalid')}", code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return error_response(OpenAIError(e.status_code, str(e.detail), code="http_error"))

    def auth(request: Request, write: bool) -> None:
        if write or settings.auth_scope == "all":
            check_api_key(request.headers, key)

    def model_entry() -> dict:
        return {
            "id": settings.model_name,
            "object": "model",
            "created": int(st.get("created", time.time())),
            "owned_by": "lmloop",
            "version": settings.model_version,
            "context_length": generator.context_length,
            "max_tokens": settings.max_tokens,
        }

    async def generate(request: Request, model: type[BaseModel]) -> Response:
        auth(request, write=False)
        req = decode_request(await request.body(), model)
        if req.model not in names:
            raise OpenAIError(
                404,
                f"The model '{req.model}' does not exist; this server serves '{settings.model_name}' "
                "(GET /v1/models)",
                "model",
                "model_not_found",
            )
        prep = prepare(req, generator, settings)
        if st["closing"] or st["scheduler"] is None:
            raise OpenAIError(
                503, "the server is shutting down; retry on another replica", type="server_error"
            )
        if st["writer"].backlog > settings.max_log_backlog:
            raise OpenAIError(
                503, "the prediction log is behind; retry shortly", headers={"Retry-After": "1"}
            )
        t0 = time.perf_counter()
        try:
            job = st["scheduler"].submit(prep.ids, prep.params)
        except QueueFull as e:
            raise OpenAIError(
                429,
                str(e),
                code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, round(e.retry_after)))},
            ) from None
        except ShuttingDown:
            raise OpenAIError(503, "the server is shutting down", type="server_error") from None
        rid = new_prediction_id()
        out_id = ID_PREFIX[prep.kind] + rid
        created = int(time.time())
        request_id = request.headers.get("x-request-id")
        headers = {"X-Request-ID": request_id or out_id}

        def record(res) -> dict:
            usage = {
                "prompt_tokens": res.prompt_tokens,
                "completion_tokens": res.tokens,
                "total_tokens": res.prompt_tokens + res.tokens,
            }
            rec = PredictionRecord.generation(
                id=rid,
                kind=prep.kind,
                model=settings.model_name,
                version=settings.model_version,
                prompt=prep.logged_prompt,
                completion=res.text,
                prompt_tokens=res.prompt_tokens,
                completion_tokens=res.tokens,
                finish_reason=_finish(res.finish_reason),
                latency_ms=(time.perf_counter() - t0) * 1000,
                request_id=request_id or out_id,
                store_text=settings.log_text == "full",
            )
            st["writer"].add([rec])
            tokens.labels(prep.kind).inc(res.tokens)
            prompt_tokens.labels(prep.kind).inc(res.prompt_tokens)
            finishes.labels(rec.finish_reason).inc()
            return usage

        def chunk(piece: str | None, finish: str | None, delta_role: bool = False) -> dict:
            if prep.kind == "chat":
                delta: dict = {"role": "assistant", "content": ""} if delta_role else {}
                if piece is not None:
                    delta["content"] = piece
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            return {
                "id": out_id,
                "object": obj,
                "created": created,
                "model": settings.model_name,
                "system_fingerprint": settings.model_version,
                "choices": [choice],
            }

        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _sse(job, chunk, record, include_usage, t0, ttft, prep.kind == "chat"),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            pieces = []
            async for piece in job.pieces():
                if not pieces:
                    ttft.observe(time.perf_counter() - t0)
                pieces.append(piece)
        except TimeoutError:
            raise OpenAIError(
                504, f"not started within {settings.timeout_s:g} s", type="server_error"
            ) from None
        except ShuttingDown:
            raise OpenAIError(503, "the server is shutting down", type="server_error") from None
        except asyncio.CancelledError:
            job.cancel()
            raise
        res = job.result
        usage = record(res)
        text = "".join(pieces)
        if prep.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": _finish(res.finish_reason),
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(res.finish_reason)}
            obj = "text_completion"
        body = {
            "id": out_id,
            "object": obj,
            "created": created,
            "model": settings.model_name,
            "system_fingerprint": settings.model_version,
            "choices": [choice],
            "usage": usage,
        }
        return Response(_dumps(body), media_type="application/json", headers=headers)

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request):
        """Complete a plain-text prompt (OpenAI's legacy completions API)."""
        return await generate(request, CompletionRequest)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatRequest))
    async def chat_completions(request: Request):
        """Answer a conversation, rendered with the model's chat template."""
        return await generate(request, ChatRequest)

    @app.get("/v1/models")
    async def models():
        """The served model (OpenAI's list format, with lmloop's version and limits)."""
        return Response(_dumps({"object": "list", "data": [model_entry()]}), media_type="application/json")

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in names:
            raise OpenAIError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
        return Response(_dumps(model_entry()), media_type="application/json")

    @app.post("/v1/feedback", openapi_extra=_body_schema(FeedbackRequest))
    async def feedback(request: Request):
        """Attach a judgement (any label, e.g. "good" / "bad", and a comment) to a recorded generation:
        ``prediction_id`` is the completion's ``id`` (with or without its cmpl- / chatcmpl- prefix)."""
        auth(request, write=True)
        req = decode_request(await request.body(), FeedbackRequest)
        pid = req.prediction_id
        for prefix in ID_PREFIX.values():
            pid = pid.removeprefix(prefix)
        fb = FeedbackRecord(prediction_id=pid, label=req.label, comment=req.comment)
        try:
            stored = await asyncio.to_thread(store.add_feedback, fb)
        except KeyError:
            await asyncio.to_thread(st["writer"].flush)  # it may still be in the log writer's batch
            try:
                stored = await asyncio.to_thread(store.add_feedback, fb)
            except KeyError:
                stored = await _await_other_replica(store, fb)
                if stored is None:
                    raise OpenAIError(
                        404, f"no generation with id '{req.prediction_id}'", "prediction_id", "not_found"
                    ) from None
        metrics.feedback.labels("recorded").inc()
        out = {
            "id": stored.id,
            "prediction_id": req.prediction_id,
            "label": stored.label,
            "created_at": stored.created_at,
        }
        return Response(_dumps(out), media_type="application/json")

    @app.get("/health")
    async def health():
        return Response(_dumps({"status": "alive"}), media_type="application/json")

    @app.get("/ready")
    async def ready():
        if st["ready"] and not st["closing"]:
            body = {"status": "ready", "model": settings.model_name, "version": settings.model_version}
            return Response(_dumps(body), media_type="application/json")
        msg = "shutting down" if st["closing"] else "loading / warming up the model"
        return error_response(OpenAIError(503, msg, code="not_ready", type="server_error"))

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    st["created"] = time.time()
    app.state.lmloop = st
    return Observe(_BodyLimit(app, settings.max_body_bytes), metrics, ROUTES)


async def _sse(
    job: GenJob, chunk, record, include_usage: bool, t0: float, ttft, chat: bool
) -> AsyncIterator[bytes]:
    """Server-sent events for one streamed request: a first chunk (chat: the assistant role), one chunk
    per text piece, a last chunk with the finish reason, the usage chunk if asked, then ``[DONE]``."""

    def event(obj: dict) -> bytes:
        return b"data: " + _dumps(obj) + b"\n\n"

    try:
        if chat:
            yield event(chunk(None, None, delta_role=True))
        first = True
        async for piece in job.pieces():
            if first:
                ttft.observe(time.perf_counter() - t0)
                first = False
            yield event(chunk(piece, None))
        res = job.result
        usage = record(res)
        yield event(chunk(None, _finish(res.finish_reason)))
        if include_usage:
            last = chunk(None, None)
            last["choices"], last["usage"] = [], usage
            yield event(last)
    except (asyncio.CancelledError, GeneratorExit):  # the client went away
        job.cancel()
        raise
    except Exception as e:  # headers are sent: the error travels as an event, then [DONE]
        if isinstance(e, ShuttingDown):
            msg = "the server is shutting down"
        elif isinstance(e, TimeoutError):
            msg = str(e)
        else:  # a model error: a bug, named without its details (they are in the server log)
            msg = f"internal error ({type(e).__name__}); see the server log"
            logging.getLogger("lmloop.serve").exception("generation failed")
        yield (
            b"data: " + error_body(503 if isinstance(e, (ShuttingDown, TimeoutError)) else 500, msg) + b"\n\n"
        )
    yield b"data: [DONE]\n\n"

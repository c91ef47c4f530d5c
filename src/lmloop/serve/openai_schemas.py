"""The OpenAI API's request side: pydantic schemas, OpenAI-style errors, and :func:`prepare`, which checks a
request against the model and the server's limits and turns it into prompt ids and sampling parameters.

The app that uses them is :mod:`lmloop.serve.openai_api`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmloop.serve.app import ApiError, ServeSettings, _dumps


# ---------------------------------------------------------------------------------------------- schemas
class _Sampling(BaseModel):
    """What both endpoints accept. Unknown fields are refused (a typo such as ``max_token`` would
    otherwise be silently ignored); OpenAI fields we do not implement are refused unless at their default."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)  # OpenAI's range; 0 = greedy
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    user: str | None = None  # accepted and ignored
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_k: int = Field(default=0, ge=0)  # extension (0 = off)
    repetition_penalty: float = Field(default=1.0, gt=0)  # extension (1 = off)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    response_format: dict[str, Any] | None = None
    tools: Any = None
    tool_choice: Any = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class OpenAIError(Exception):
    """An error answered as OpenAI's error object (a 4xx for a bad request; ``param`` names the field)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str
        | None = None,  # None: from the status (invalid_request_error, rate_limit_error, server_error)
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}


def error_body(status: int, message: str, param=None, code=None, type: str | None = None) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}`` as JSON bytes."""
    if type is None:
        type = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else None
        type = type or "invalid_request_error"
    return _dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def from_api_error(e: ApiError) -> OpenAIError:
    """The classifier app's :class:`ApiError` (the shared API-key check raises it) in OpenAI's shape."""
    code = "invalid_api_key" if e.status == 401 else e.code
    return OpenAIError(e.status, e.message, None, code, headers=e.headers)


def decode_request(body: bytes, model: type[BaseModel]) -> Any:
    """Parse a JSON body whatever its Content-Type (curl -d sends form-encoded) and validate it; errors are
    400s naming the field, unknown fields "Unrecognized request argument supplied" as OpenAI says it."""
    import orjson

    if not body.strip():
        raise OpenAIError(400, "empty request body; expected a JSON object", code="invalid_json")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise OpenAIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, f"expected a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ())]
        if err.get("type") == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {'.'.join(loc)}"
        else:
            msg = f"{'.'.join(loc) or 'body'}: {err.get('msg')}"
        # OpenAI's param is the top-level field (messages.[0].role -> messages)
        raise OpenAIError(400, msg, param=loc[0] if loc else None, code="invalid_value") from None


# ------------------------------------------------------------------------------------------ prompt side
@dataclass
class _Prepared:
    kind: str  # "completion" | "chat"
    ids: list[int]
    params: dict[str, Any]  # Generator.stream_batch row params
    logged_prompt: str  # what the prediction log keeps as the prompt


def _check_unsupported(req: _Sampling) -> None:
    if req.n != 1:
        raise OpenAIError(400, f"n={req.n}: this server returns one choice per request (n must be 1)", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise OpenAIError(
                400, f"{name} is not supported; use repetition_penalty (extension) instead", name
            )
    if req.logit_bias:
        raise OpenAIError(400, "logit_bias is not supported", "logit_bias")
    if req.logprobs not in (None, False, 0):
        raise OpenAIError(400, "logprobs are not supported", "logprobs")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise OpenAIError(400, "echo is not supported", "echo")
        if req.best_of not in (None, 1):
            raise OpenAIError(400, "best_of must be 1", "best_of")
        if req.suffix:
            raise OpenAIError(400, "suffix is not supported", "suffix")
    if isinstance(req, ChatRequest):
        if req.tools or req.tool_choice not in (None, "none"):
            raise OpenAIError(400, "tools are not supported by this server", "tools")
        if req.response_format not in (None, {"type": "text"}):
            raise OpenAIError(400, "only response_format {'type': 'text'} is supported", "response_format")


def _messages(req: ChatRequest) -> list[dict[str, str]]:
    if not req.messages:
        raise OpenAIError(400, "messages must hold at least one message", "messages", "invalid_value")
    out = []
    for i, m in enumerate(req.messages):
        role = _ROLES.get(m.role)
        if role is None:
            raise OpenAIError(
                400,
                f"messages[{i}].role is '{m.role}'; expected one of {sorted(_ROLES)}",
                "messages",
                "invalid_value",
            )
        content = m.content
        if isinstance(content, list):  # content parts: only text ones
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise OpenAIError(
                        400,
                        f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                        f"supported, got type {part.get('type')!r}",
                        "messages",
                        "invalid_value",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            raise OpenAIError(400, f"messages[{i}].content is missing", "messages", "invalid_value")
        out.append({"role": role, "content": content})
    return out


def prepare(req: CompletionRequest | ChatRequest, generator: Any, settings: ServeSettings) -> _Prepared:
    """Validate a request against the model and the limits: prompt ids and row params (raises
    :class:`OpenAIError` 400 naming the field)."""
    from lmloop.errors import ConfigError

    _check_unsupported(req)
    g = generator
    if isinstance(req, ChatRequest):
        kind, param = "chat", "messages"
        msgs = _messages(req)
        try:
            ids = g.prompt_ids(messages=msgs)
        except ConfigError as e:  # no chat template
            raise OpenAIError(400, f"{e}; send a plain prompt to /v1/completions", "messages") from None
        except Exception as e:  # the template itself refused (e.g. a role order it does not accept)
            raise OpenAIError(
                400, f"the chat template refused these messages: {e}", "messages", "invalid_value"
            ) from None
        logged = json.dumps(msgs, ensure_ascii=False)
        max_tokens = req.max_completion_tokens or req.max_tokens
    else:
        kind, param = "completion", "prompt"
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            ids = list(prompt)  # token ids
            vocab = len(g.tokenizer)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise OpenAIError(400, f"prompt token ids out of range [0, {vocab}): {bad[:5]}", "prompt")
            logged = g.tokenizer.decode(ids)
        else:
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise OpenAIError(
                        400,
                        f"one prompt per request (got a list of {len(prompt)})",
                        "prompt",
                        "invalid_value",
                    )
                prompt = prompt[0]
            ids = g.tokenizer(prompt)["input_ids"]
            logged = prompt
        max_tokens = req.max_tokens
    ctx = g.context_length
    if not ids:
        raise OpenAIError(400, f"the {param} is empty", param, "invalid_value")
    if len(ids) >= ctx:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {ctx} tokens; the {param} is {len(ids)} tokens. "
            "Please shorten it.",
            param,
            "context_length_exceeded",
        )
    if max_tokens is not None and max_tokens > settings.max_tokens:
        raise OpenAIError(
            400,
            f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens} "
            "(lmloop serve --max-tokens)",
            "max_tokens",
            "invalid_value",
        )
    if max_tokens is not None and len(ids) + max_tokens > ctx:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{len(ids) + max_tokens} tokens ({len(ids)} in the {param}, {max_tokens} in the completion). "
            f"Please reduce the length of the {param} or the completion.",
            param,
            "context_length_exceeded",
        )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise OpenAIError(400, "stop: up to 4 non-empty strings", "stop", "invalid_value")
    params = {
        "max_new_tokens": max_tokens or min(settings.max_tokens, ctx - len(ids)),
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "stop": stop,
        "seed": req.seed,
        "repetition_penalty": req.repetition_penalty,
    }
    return _Prepared(kind, ids, params, logged)

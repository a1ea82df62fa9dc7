"""The OpenAI-compatible wire format: request models (validated with pydantic) and the error contract.

Every client mistake becomes an :class:`APIError` with its HTTP status and an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}``: unknown model 404, malformed JSON or a bad parameter 400,
a prompt beyond the context 400, a missing or wrong key 401, a body over the size limit 413, overload 503 with
Retry-After, a server-side timeout 408. Pydantic's validation errors become 400 naming the field (never
FastAPI's 422). Pure code: no Ray, no torch.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """A request that cannot be served, with the status and body the client gets."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def __reduce__(self):  # raised in a replica, re-raised in the ingress: it crosses Ray pickled
        return _rebuild, (self.status, self.message, self.type, self.param, self.code, self.headers)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _rebuild(status, message, type, param, code, headers) -> APIError:
    return APIError(status, message, type=type, param=param, code=code, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist; GET /v1/models lists the served models",
                    param="model", code="model_not_found")


def unauthorized(message: str) -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


def overloaded(retry_after_s: int, message: str = "The server is busy; retry later") -> APIError:
    return APIError(503, message, type="server_overloaded", code="overloaded",
                    headers={"Retry-After": str(retry_after_s)})


def timed_out(seconds: float) -> APIError:
    return APIError(408, f"The request did not finish within the server's limit of {seconds:g} s",
                    type="timeout_error", code="timeout")


def from_validation_error(err: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field (``messages.0.role``)."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    msg = first["msg"]
    if first["type"] == "missing":
        msg = "is required"
    elif first["type"] == "extra_forbidden":
        msg = "is not a supported parameter"
    return bad_request(f"{param}: {msg}" if param else msg, param=param, code="invalid_parameter")


def parse_json(raw: bytes, max_bytes: int) -> dict[str, Any]:
    if len(raw) > max_bytes:
        raise APIError(413, f"request body of {len(raw)} bytes exceeds the limit of {max_bytes} bytes",
                       code="request_too_large")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


# ------------------------------------------------------------------------------------------ requests


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI's SDKs and lm-evaluation-harness send fields a server may not use;
    # fields that would change the output and are not implemented are refused below.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions: no end of sequence (stop token or stop string) before min_tokens tokens; ignore_eos:
    # the stop tokens never end a completion (it runs to max_tokens or a stop string)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v != 0:
            raise ValueError("penalties are not supported by this server; send 0 or leave it out")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content as text: OpenAI's list of parts is accepted when every part is text."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)

    def wanted_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def chat(self) -> list[dict[str, str]]:
        try:
            return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in self.messages]
        except ValueError as e:
            raise bad_request(str(e), param="messages") from None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        if isinstance(v, list) and isinstance(v[0], list) and any(not p for p in v):
            raise ValueError("token lists must not be empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported by this server")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        if v not in (None, 1):
            raise ValueError("best_of is not supported by this server (send 1 or leave it out)")
        return v

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        v = self.prompt
        if isinstance(v, str):
            return [v]
        if isinstance(v[0], int):
            return [list(v)]
        return list(v)


def check_limits(req: ChatCompletionRequest | CompletionRequest, limits, n_prompts: int = 1) -> None:
    """The config's per-request limits, each a 400 naming the parameter."""
    if req.n > limits.max_n:
        raise bad_request(f"n: {req.n} exceeds this server's limit of {limits.max_n}", param="n")
    if len(req.stop_list()) > limits.max_stop:
        raise bad_request(f"stop: at most {limits.max_stop} stop strings", param="stop")
    wanted = req.wanted_tokens(limits.default_max_tokens) if isinstance(req, ChatCompletionRequest) else req.max_tokens
    if req.min_tokens > wanted:
        raise bad_request(f"min_tokens: {req.min_tokens} exceeds max_tokens ({wanted})", param="min_tokens")
    if n_prompts > limits.max_prompts:
        raise bad_request(f"prompt: {n_prompts} prompts exceed this server's limit of {limits.max_prompts}",
                          param="prompt")
    if isinstance(req, ChatCompletionRequest):
        wanted, param = req.wanted_tokens(limits.default_max_tokens), (
            "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        k = (req.top_logprobs or 0) if req.logprobs else 0
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs: requires logprobs=true", param="top_logprobs")
        k_param = "top_logprobs"
    else:
        wanted, param, k, k_param = req.max_tokens, "max_tokens", req.logprobs or 0, "logprobs"
        if req.max_tokens == 0 and not req.echo:
            raise bad_request("max_tokens: 0 is only allowed with echo (prompt logprobs)", param="max_tokens")
        if req.stream and req.echo:
            raise bad_request("echo: not supported with stream", param="echo")
    if wanted > limits.max_tokens:
        raise bad_request(f"{param}: {wanted} exceeds this server's limit of {limits.max_tokens}", param=param)
    if k > limits.max_logprobs:
        raise bad_request(f"{k_param}: {k} exceeds this server's limit of {limits.max_logprobs}", param=k_param)

"""OpenAI-compatible request schemas and the error type of the HTTP API.

Field names, defaults and ranges follow OpenAI's completions / chat completions API
as vLLM's server accepts them. Models are strict (a JSON string is not an integer)
and ignore unknown fields, as OpenAI does; every rejection becomes a 4xx in OpenAI's
error schema ``{"error": {"message", "type", "param", "code"}}`` (see `OpenAIError`).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# Logprob alternatives per position; vLLM's default `max_logprobs` is 20 as well.
MAX_LOGPROBS = 20
# Choices per prompt; OpenAI allows up to 128, vLLM's server more. A CPU reference
# engine runs every choice as its own sequence, so the cap stays modest.
MAX_N = 16
_SEED_MIN = -(2**63)
_SEED_MAX = 2**63 - 1


class OpenAIError(Exception):
    """An error answered to the client in OpenAI's schema.

    Args:
        status: HTTP status (4xx for bad requests, 5xx only for server faults).
        message: human readable; names the violated constraint and the value seen.
        type: OpenAI error type (``invalid_request_error``, ``authentication_error``, ...).
        param: the request field at fault, or None.
        code: a short machine-readable code, or None.
        headers: extra response headers (``Retry-After`` on 429 / 503).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every 4xx / 5xx answer."""
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [(400, "Invalid request"), (401, "Missing or wrong API key"),
                         (404, "Unknown model"), (413, "Request body too large"),
                         (429, "Too many concurrent requests"), (503, "Server is draining")]
}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool | None = False


_NonEmptyIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = Union[
    str,
    Annotated[list[str], Field(min_length=1)],
    _NonEmptyIds,
    Annotated[list[_NonEmptyIds], Field(min_length=1)],
]
Stop = Union[str, Annotated[list[str], Field(max_length=16)], None]


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions."""
    model: str | None = Field(None, description="Served model name; defaults to the only model served.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 means greedy. Default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass. Default 1.")
    n: int | None = Field(None, ge=1, le=MAX_N, description="Choices per prompt. Default 1.")
    stop: Stop = Field(None, description="Up to 16 stop strings; the stop string is not returned.")
    seed: int | None = Field(None, ge=_SEED_MIN, le=_SEED_MAX,
                             description="Seed of the sampler; choice i of a request uses seed + i.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool | None = Field(False, description="vLLM extension: keep generating after EOS.")


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""
    prompt: Prompt = Field(description="Text, list of texts, token ids, or list of token id lists.")
    max_tokens: int | None = Field(
        None, ge=0, description="Default 16 (clamped to the context left). 0 only with echo (prompt scoring).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Alternatives returned per token (0: only the sampled token).")
    echo: bool | None = False
    # Accepted by OpenAI but not served here: a value other than null is refused by name.
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Default: the context left.")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool | None = True
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def validation_param(loc: tuple[Any, ...]) -> str | None:
    """The request field named by a pydantic / FastAPI error location.

    ``("body", "messages", 0, "role")`` -> ``"messages.0.role"``; union-branch tags such
    as ``"str"``, ``"list[int]"`` or ``"TextPart"`` are dropped, and a body that is not a
    JSON object names no field.
    """
    parts = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    kept = [str(p) for p in parts
            if isinstance(p, int) or (isinstance(p, str) and p and p not in _TYPE_TAGS
                                      and not any(c in p for c in "[-") and not p[0].isupper())]
    return ".".join(kept) or None

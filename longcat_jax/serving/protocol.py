"""The OpenAI request and response bodies of /v1/completions and /v1/chat/completions, as vLLM accepts them.

Requests accept and ignore fields they do not know (OpenAI adds fields often, and clients send them: vLLM does
the same), but reject wrong types and non-finite numbers at parse time so that nothing malformed reaches the
engine. Range checks of the sampling values (temperature >= 0, top_p in (0, 1], ...) are the engine's
`SamplingParams.checked`, so one rule serves every entry point; the API maps its `InvalidRequest` to a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

# A token id must be a JSON integer: lax mode would turn "5", 5.0 or true into 5 and hide client bugs.
TokenId = Annotated[int, Strict()]
# JSON numbers only (Python's json module also reads NaN and Infinity, which no sampler can use).
Finite = Annotated[float, Field(allow_inf_nan=False)]
# Seeds travel to the engine's random generator as 64-bit integers.
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]

ROLES = ("system", "user", "assistant", "tool", "developer")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingRequest(_Lenient):
    """The fields both endpoints share; defaults are OpenAI's (temperature 1, top_p 1, n 1)."""

    model: str | None = None  # None: the served model (vLLM)
    max_tokens: int | None = None  # None: whatever still fits the context (vLLM)
    temperature: Finite | None = None
    top_p: Finite | None = None
    top_k: int | None = None  # vLLM extension; 0 or -1 = off
    min_p: Finite | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: Seed | None = None
    presence_penalty: Finite | None = None
    frequency_penalty: Finite | None = None
    repetition_penalty: Finite | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: int | None = None  # the k most likely tokens at each step (0: only the chosen one)


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: str  # checked against ROLES by the API, so the error names the allowed roles
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name of max_tokens; wins when both are given
    logprobs: bool = False
    top_logprobs: int | None = None


# -------------------------------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class _ResponseHead(BaseModel):
    """The fields every completion response opens with; subclasses narrow `object` to their literal."""

    id: str
    object: str
    created: int
    model: str


class CompletionResponse(_ResponseHead):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_ResponseHead):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "longcat-jax"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}

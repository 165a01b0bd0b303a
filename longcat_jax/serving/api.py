"""The OpenAI-compatible HTTP API (vLLM-style) over the continuous-batching engine.

    app = build_app(engine, tokenizer, model_name="longcat")   # then uvicorn.run(app) or serve.py

Routes: POST /v1/completions, POST /v1/chat/completions (JSON, or server-sent events with `stream`),
GET /v1/models, GET /health, GET /metrics (Prometheus).

Each of the `n` choices of each prompt is one engine request (seeds seed+i, so choices differ but the same
request repeats). Every client mistake is a 4xx with OpenAI's body `{"error": {message, type, param, code}}`,
FastAPI's own 422 `{"detail"}` included, so OpenAI clients raise their typed errors; an unexpected exception
is a logged 500 of the same shape and the server goes on. A client that goes away (closed stream, or a closed
connection while waiting for a whole answer) aborts its engine requests so their KV pages return to the pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from longcat_jax.serving.async_bridge import OutputStream, client_gone
from longcat_jax.serving.engine import EngineStopped
from longcat_jax.serving.errors import ERROR_RESPONSES, ApiError, error_response, install_error_handlers
from longcat_jax.serving.http_gate import Gate
from longcat_jax.serving.metrics import ServerMetrics
from longcat_jax.serving.params import InvalidRequest, RequestOutput, SamplingParams, TokenLogprob
from longcat_jax.serving.protocol import (
    ROLES,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    Usage,
    error_body,
)

log = logging.getLogger(__name__)

_MIN_LOGPROB = -9999.0  # what vLLM reports for -inf: JSON has no infinities


# ---------------------------------------------------------------------------------------------- one request
@dataclasses.dataclass
class _Choice:
    """One engine request: one choice of one prompt, and what it has produced so far."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt_index: int
    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    submitted: float = 0.0
    first: float | None = None
    last: float = 0.0

    def add(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        if out.token_ids:
            self.first = self.first if self.first is not None else now
            self.last = now
        self.text.append(out.text)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        self.completion_tokens = out.completion_tokens
        if out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error


def _logprob(x: float) -> float:
    return _MIN_LOGPROB if math.isnan(x) else max(float(x), _MIN_LOGPROB)


def _usage(choices: list[_Choice]) -> Usage:
    """Prompt tokens once per prompt (not per choice, as vLLM counts), completion tokens of every choice."""
    prompts = {c.prompt_index: len(c.prompt_ids) for c in choices}
    prompt, completion = sum(prompts.values()), sum(c.completion_tokens for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _Server:
    """What the routes share: engine, tokenizer, metrics and the request-to-engine translation."""

    def __init__(self, engine, tokenizer, model_name: str, max_n: int):
        self.engine, self.tokenizer, self.model_name, self.max_n = engine, tokenizer, model_name, max_n
        self.vocab_size: int = engine.cfg.vocab_size
        self.max_model_len: int = engine.settings.max_model_len
        self.metrics = ServerMetrics(engine.stats)
        self.created = int(time.time())
        self.draining = False
        self.token_text: Callable[[int], str] = functools.lru_cache(maxsize=1 << 16)(
            lambda i: tokenizer.decode([i]))

    # ------------------------------------------------------------------------------------------ translation
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def check_n(self, n: int) -> None:
        if not 1 <= n <= self.max_n:
            raise InvalidRequest(f"n must be between 1 and {self.max_n}, got {n}", "n")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def sampling(self, body, prompt_ids: list[int], max_tokens: int | None, logprobs: int | None,
                 seed: int | None, param: str) -> SamplingParams:
        """The engine's SamplingParams, checked, with the context-length checks vLLM makes (the engine
        checks the prompt itself again, and its ids, on submit)."""
        room = self.max_model_len - len(prompt_ids)
        if room < 1 and prompt_ids:
            raise InvalidRequest(f"This model's maximum context length is {self.max_model_len} tokens; the "
                                 f"prompt has {len(prompt_ids)} tokens, which leaves no room to generate",
                                 param)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        params = SamplingParams(
            max_tokens=max(room, 1) if max_tokens is None else max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=0 if body.top_k in (None, -1) else body.top_k,
            min_p=body.min_p or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=seed, stop=stop, stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos, logprobs=logprobs,
        ).checked(self.vocab_size)
        if params.max_tokens > room:
            raise InvalidRequest(f"This model's maximum context length is {self.max_model_len} tokens; the "
                                 f"request asks for {len(prompt_ids)} prompt tokens plus max_tokens "
                                 f"{params.max_tokens}", "max_tokens")
        return params

    def choices(self, body, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None,
                prefix: str, param: str) -> list[_Choice]:
        self.check_n(body.n)
        out = []
        for p, ids in enumerate(prompts):
            for i in range(body.n):
                # Choice i samples with seed + i, as an unsigned 64-bit number (numpy's generators refuse < 0)
                seed = None if body.seed is None else (body.seed + i) % 2**64
                params = self.sampling(body, ids, max_tokens, logprobs, seed, param)
                out.append(_Choice(len(out), f"{prefix}-{len(out)}", ids, params, p))
        return out

    def submit(self, choices: list[_Choice]) -> OutputStream:
        """Submit every choice, or none: a refusal part-way aborts those already in."""
        if self.draining:
            raise EngineStopped("draining")
        stream, done = OutputStream(), []
        try:
            for c in choices:
                c.submitted = time.perf_counter()
                self.engine.submit(c.request_id, c.prompt_ids, c.params, stream.on_output)
                done.append(c)
        except BaseException:
            for c in done:
                self.engine.abort(c.request_id)
            stream.close()
            raise
        return stream

    def abort_unfinished(self, choices: list[_Choice]) -> None:
        """Abort the choices still running (the client left, or the response failed); idempotent."""
        for c in choices:
            if c.finish_reason is None:
                c.finish_reason = "abort"
                self.engine.abort(c.request_id)
                self.finished(c)

    def finished(self, c: _Choice) -> None:
        self.metrics.observe(c.submitted, c.first, c.last, c.completion_tokens, c.finish_reason or "abort")

    # ------------------------------------------------------------------------------------------------ flows
    async def collect(self, choices: list[_Choice], stream: OutputStream, request: Request) -> None:
        """Wait for every choice to finish; abort them all as soon as the client disconnects."""
        by_id = {c.request_id: c for c in choices}
        left = len(choices)
        gone = asyncio.ensure_future(client_gone(request.receive))
        try:
            while left:
                out = await stream.get(unless=gone)
                if out is None:
                    log.info("client went away; aborting %d engine request(s)", left)
                    return
                c = by_id[out.request_id]
                c.add(out)
                if out.finished:
                    left -= 1
                    self.finished(c)
        finally:
            gone.cancel()
            self.abort_unfinished(choices)
            stream.close()
        errors = [c.error or "engine error" for c in choices if c.finish_reason == "error"]
        if errors:
            raise ApiError(500, f"The engine failed on this request: {errors[0]}", "server_error",
                           code="engine_error")

    async def events(self, choices: list[_Choice], stream: OutputStream,
                     chunk: Callable[[_Choice, RequestOutput], dict | None],
                     head: list[dict], usage_chunk: Callable[[Usage], dict] | None) -> AsyncIterator[str]:
        """The SSE body: `head` chunks, one chunk per engine output, the usage chunk, then [DONE]."""
        by_id = {c.request_id: c for c in choices}
        left = len(choices)
        try:
            for h in head:
                yield _sse(h)
            while left:
                out = await stream.get()
                c = by_id[out.request_id]
                c.add(out)
                if out.finished:
                    left -= 1
                    self.finished(c)
                if out.finish_reason == "error":
                    yield _sse(error_body(f"The engine failed on this request: {out.error}", "server_error",
                                          code="engine_error"))
                    break
                data = chunk(c, out)
                if data is not None:
                    yield _sse(data)
            if usage_chunk is not None:
                yield _sse(usage_chunk(_usage(choices)))
            yield "data: [DONE]\n\n"
        finally:
            self.abort_unfinished(choices)
            stream.close()

    def streaming_response(self, choices: list[_Choice], body: AsyncIterator[str]) -> StreamingResponse:
        """The response aborts what is unfinished however it ends, even when the client leaves before the
        generator first runs (then its `finally` never does)."""
        server = self

        class _Stream(StreamingResponse):
            async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    server.abort_unfinished(choices)

        return _Stream(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # --------------------------------------------------------------------------------------------- logprobs
    def completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in lps:
            token = self.token_text(lp.token_id)
            top = {self.token_text(t): _logprob(v) for t, v in lp.top}
            top.setdefault(token, _logprob(lp.logprob))
            out.tokens.append(token)
            out.token_logprobs.append(_logprob(lp.logprob))
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(token)
        return out

    def chat_logprobs(self, lps: list[TokenLogprob]) -> ChatLogprobs:
        def entry(token_id: int, value: float) -> dict[str, Any]:
            token = self.token_text(token_id)
            return {"token": token, "logprob": _logprob(value), "bytes": list(token.encode())}

        return ChatLogprobs(content=[
            ChatTokenLogprob(**entry(lp.token_id, lp.logprob),
                             top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top]) for lp in lps])


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n"


# ---------------------------------------------------------------------------------------------------- routes
async def _completions(s: _Server, body: CompletionRequest, request: Request) -> Response:
    s.check_model(body.model)
    p = body.prompt
    if isinstance(p, str):
        prompts = [s.encode(p)]
    elif not p:
        raise InvalidRequest("prompt must not be an empty list", "prompt")
    elif isinstance(p[0], int):
        prompts = [list(p)]
    elif isinstance(p[0], str):
        prompts = [s.encode(t) for t in p]
    else:
        prompts = [list(ids) for ids in p]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    choices = s.choices(body, prompts, body.max_tokens, body.logprobs, request_id, "prompt")
    stream = s.submit(choices)
    created, want_lp = int(time.time()), body.logprobs is not None
    if not body.stream:
        await s.collect(choices, stream, request)
        return JSONResponse(CompletionResponse(
            id=request_id, created=created, model=s.model_name, usage=_usage(choices),
            choices=[CompletionChoice(index=c.index, text="".join(c.text), finish_reason=c.finish_reason,
                                      logprobs=s.completion_logprobs(c.logprobs, 0) if want_lp else None)
                     for c in choices]).model_dump())
    offsets = {c.index: 0 for c in choices}

    def chunk(c: _Choice, out: RequestOutput) -> dict | None:
        if not out.text and not out.token_ids and not out.finished:
            return None
        lp = None
        if want_lp:
            lp = s.completion_logprobs(list(out.logprobs or ()), offsets[c.index])
            offsets[c.index] = lp.text_offset[-1] + len(lp.tokens[-1]) if lp.tokens else offsets[c.index]
            lp = lp.model_dump()
        return {"id": request_id, "object": "text_completion", "created": created, "model": s.model_name,
                "choices": [{"index": c.index, "text": out.text, "logprobs": lp,
                             "finish_reason": out.finish_reason if out.finished else None}]}

    def usage(u: Usage) -> dict:
        return {"id": request_id, "object": "text_completion", "created": created, "model": s.model_name,
                "choices": [], "usage": u.model_dump()}

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    events = s.events(choices, stream, chunk, [], usage if include_usage else None)
    return s.streaming_response(choices, events)


def _chat_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    if not body.messages:
        raise InvalidRequest("messages must not be empty", "messages")
    out = []
    for i, m in enumerate(body.messages):
        if m.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role is {m.role!r}; allowed roles: {', '.join(ROLES)}",
                                 "messages")
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or ())
        # OpenAI's "developer" role is the system role of newer models; chat templates know "system"
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": content} | ({"name": m.name} if m.name else {}))
    return out


async def _chat(s: _Server, body: ChatCompletionRequest, request: Request) -> Response:
    s.check_model(body.model)
    messages = _chat_messages(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs set to true", "top_logprobs")
    try:
        prompt = list(s.tokenizer.encode_chat(messages))
    except (ValueError, jinja2.TemplateError) as e:
        raise InvalidRequest(f"The chat template cannot render these messages: {e}", "messages") from e
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    choices = s.choices(body, [prompt], max_tokens, logprobs, request_id, "messages")
    stream = s.submit(choices)
    created = int(time.time())
    if not body.stream:
        await s.collect(choices, stream, request)
        return JSONResponse(ChatCompletionResponse(
            id=request_id, created=created, model=s.model_name, usage=_usage(choices),
            choices=[ChatChoice(index=c.index, message=AssistantMessage(content="".join(c.text)),
                                finish_reason=c.finish_reason,
                                logprobs=s.chat_logprobs(c.logprobs) if body.logprobs else None)
                     for c in choices]).model_dump(exclude_none=False))

    def base(choices_: list[dict]) -> dict:
        return {"id": request_id, "object": "chat.completion.chunk", "created": created,
                "model": s.model_name, "choices": choices_}

    def chunk(c: _Choice, out: RequestOutput) -> dict | None:
        if not out.text and not out.finished:
            return None
        lp = s.chat_logprobs(list(out.logprobs or ())).model_dump() if body.logprobs else None
        return base([{"index": c.index, "delta": {"content": out.text} if out.text else {}, "logprobs": lp,
                      "finish_reason": out.finish_reason if out.finished else None}])

    def usage(u: Usage) -> dict:
        return base([]) | {"usage": u.model_dump()}

    head = [base([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                   "finish_reason": None}]) for c in choices]
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return s.streaming_response(choices, s.events(choices, stream, chunk, head,
                                                  usage if include_usage else None))


# ------------------------------------------------------------------------------------------------------- app
def build_app(engine, tokenizer, *, model_name: str, api_key: str | None = None,
              max_body_bytes: int = 1 << 20, max_n: int = 16) -> FastAPI:
    """The FastAPI app serving `engine` (started by the caller) under the name `model_name`.

    Args:
      engine: a started `Engine` (submit / abort / stats / settings / cfg).
      tokenizer: a `TextTokenizer` (encode, decode, encode_chat).
      model_name: the only `model` requests may name (others get 404); /v1/models lists it.
      api_key: when set, /v1 routes want `Authorization: Bearer <api_key>` (else 401).
      max_body_bytes: larger request bodies get 413 before they are parsed.
      max_n: the largest `n` (choices per prompt) a request may ask for.
    `app.state.server.draining = True` makes /health answer 503 (serve.py sets it on SIGTERM).
    """
    app = FastAPI(title="longcat-jax", summary="OpenAI-compatible LongCat server", version="0.1.0")
    s = _Server(engine, tokenizer, model_name, max_n)
    app.state.server = s
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=max_body_bytes)

    install_error_handlers(app)

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse}, **ERROR_RESPONSES})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _completions(s, body, request)

    @app.post("/v1/chat/completions", responses={200: {"model": ChatCompletionResponse}, **ERROR_RESPONSES})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _chat(s, body, request)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=s.created, max_model_len=s.max_model_len)])

    @app.get("/health")
    async def health() -> Response:
        if s.draining:
            return error_response(503, "The server is shutting down", "server_error",
                                  code="service_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        content, content_type = s.metrics.render()
        return Response(content, headers={"Content-Type": content_type})

    return app

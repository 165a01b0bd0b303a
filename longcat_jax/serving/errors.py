"""OpenAI-shaped errors: `ApiError`, `error_response`, and the FastAPI exception handlers that turn every
client mistake (FastAPI's own 422 included) into a 4xx with body `{"error": {message, type, param, code}}`."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from longcat_jax.serving.engine import EngineStopped, QueueFull
from longcat_jax.serving.params import InvalidRequest
from longcat_jax.serving.protocol import ErrorResponse, error_body

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}


class ApiError(Exception):
    """A client-facing error: HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return ApiError(status, message, type, param, code, headers).response()


def install_error_handlers(app: FastAPI) -> None:
    """Registers the handlers that answer `app`'s errors in OpenAI's shape."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "")
            return error_response(400, f"The body is not valid JSON: {detail}")
        def where(e: dict) -> str:
            return ".".join(str(x) for x in e.get("loc", ()) if x != "body")

        msgs = "; ".join(f"{where(e) or 'body'}: {e.get('msg')}" for e in errors[:5])
        return error_response(400, f"Invalid request: {msgs}", param=where(first) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")  # "not_found", ...
        return error_response(exc.status_code, str(exc.detail), code=code, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(InvalidRequest)
    async def _bad(request: Request, exc: InvalidRequest) -> JSONResponse:
        return error_response(400, str(exc), param=exc.param)

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull) -> JSONResponse:
        return error_response(429, f"The server is at capacity, retry later ({exc})", "rate_limit_error",
                              code="rate_limit_exceeded", headers={"Retry-After": "1"})

    @app.exception_handler(EngineStopped)
    async def _stopped(request: Request, exc: EngineStopped) -> JSONResponse:
        return error_response(503, "The server is shutting down and takes no new requests", "server_error",
                              code="service_unavailable")

"""The raw ASGI gate in front of the API: the API key, the request-body size limit, and the catch-all that
turns an unexpected exception into a logged OpenAI-shaped 500."""

from __future__ import annotations

import hmac
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from longcat_jax.serving.errors import error_response

log = logging.getLogger("longcat_jax.serving.api")  # the API's logger, as before the gate had its own module


class Gate:
    """Pure ASGI middleware: the API key (before anything reads the body), the body-size limit, and the
    catch-all for unexpected exceptions.

    The body is read here, at most max_body_bytes of it, and replayed to the app; later receive() calls go to
    the server again, so disconnect detection still works. An exception the app's handlers did not turn into
    a response becomes a logged 500 here, and is not re-raised (Starlette's own catch-all re-raises, and
    uvicorn then drops the keep-alive connection under the client's next request)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._gated(scope, receive, tracked)
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if started:  # half a response is out: all that is left is to drop the connection
                raise
            await error_response(500, "Internal server error", "server_error", code="internal_error")(
                scope, receive, send)

    async def _gated(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith("/v1"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                message = "Invalid or missing API key: send 'Authorization: Bearer <key>'"
                return await error_response(401, message, code="invalid_api_key")(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # disconnected while sending the body
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, f"Request body is larger than {self.max_body_bytes} bytes",
                             code="request_too_large")(scope, receive, send)

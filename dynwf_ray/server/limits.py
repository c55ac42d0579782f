"""Request bodies: their size limits and content types, enforced before a route sees them.

`BodyLimits` is ASGI middleware. It refuses a body over its route's limit with 413
as soon as the declared `Content-Length`, or the bytes received so far, pass it, so
an oversized body is never read whole; and a body of a content type the route does
not take with 415. Routes then get the buffered body as usual."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from ..types import MAX_PAYLOAD_BYTES

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: JSON bodies of one instance or event: the 1 MiB payload limit plus room for its envelope.
JSON_LIMIT = MAX_PAYLOAD_BYTES + 64 * 1024
#: A create_batch body (up to 100 items).
BATCH_LIMIT = 16 * 1024 * 1024
#: Default limit of a pushed code archive (`ServerSettings.code_limit`).
CODE_LIMIT = 16 * 1024 * 1024

JSON_TYPES = ("application/json",)
ARCHIVE_TYPES = ("application/zip", "application/gzip", "application/x-gzip", "application/x-tar",
                 "application/x-gtar", "application/octet-stream")


class BodyLimits:
    def __init__(self, app: Any, code_limit: int = CODE_LIMIT):
        self.app = app
        self.code_limit = code_limit

    def rule(self, method: str, path: str) -> tuple[int, tuple[str, ...]] | None:
        """(limit, content types) of a route's body; None: it takes none, 0 bytes allowed."""
        if method not in ("POST", "PUT", "PATCH"):
            return None
        if path.startswith("/v1/webhooks/"):
            return JSON_LIMIT, JSON_TYPES
        if path.endswith("/code"):
            return self.code_limit, ARCHIVE_TYPES
        if path.endswith("/instances/batch"):
            return BATCH_LIMIT, JSON_TYPES
        return JSON_LIMIT, JSON_TYPES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rule = self.rule(scope["method"], scope["path"])
        if rule is None:
            return await self.app(scope, receive, send)
        limit, types = rule
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _refuse(send, 413, "PayloadTooLarge", _too_large(limit, declared))
        buffer, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            buffer += message.get("body", b"")
            more = message.get("more_body", False)
            if len(buffer) > limit:
                return await _refuse(send, 413, "PayloadTooLarge", _too_large(limit, None))
        body = bytes(buffer)
        if body and not scope["path"].startswith("/v1/webhooks/"):
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind not in types and not (types == JSON_TYPES and kind.endswith("+json")):
                return await _refuse(
                    send, 415, "UnsupportedMediaType",
                    f"content type {kind or '(none)'!r} is not accepted here; send {' or '.join(types[:3])}",
                )
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _too_large(limit: int, declared: str | None) -> str:
    size = f" ({declared} bytes)" if declared and declared.isdigit() else ""
    return f"the body{size} is over this route's limit of {limit} bytes"


async def _refuse(send: Send, status: int, name: str, message: str) -> None:
    payload = json.dumps({"error": {"name": name, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),
    ]})
    await send({"type": "http.response.body", "body": payload})

"""Errors over HTTP: every failure is JSON `{"error": {"name", "message"}}` with its 4xx or 5xx.

`ApiError` is what the routes raise for HTTP-only refusals (no or a bad token, an
admin route); a body too large or of the wrong type is refused before them, in the
same shape, by `limits.BodyLimits`; a `DynwfError` from the engine is mapped by its class
(`STATUS`). Request validation, malformed JSON and routing errors get the same shape,
so a client never parses two kinds of error."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    DuplicateInstanceError,
    DynwfError,
    InstanceNotFoundError,
    InvalidInputError,
    InvalidStateError,
    JournalUnavailableError,
    PayloadTooLargeError,
    ReplayDivergenceError,
    UnknownTenantError,
)
from ..types import validate_id


class ErrorDetail(BaseModel):
    name: str
    message: str


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class ApiError(Exception):
    """An HTTP-level refusal: `status`, an error `name` and a message for the client."""

    def __init__(self, status: int, name: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.name, self.message, self.headers = status, name, message, headers


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "Unauthorized", message, {"WWW-Authenticate": "Bearer"})


#: Engine errors by class; the first match in this order wins (subclasses first).
STATUS: list[tuple[type[DynwfError], int]] = [
    (PayloadTooLargeError, 413),
    (InvalidInputError, 400),
    (InstanceNotFoundError, 404),
    (UnknownTenantError, 404),
    (DuplicateInstanceError, 409),
    (InvalidStateError, 409),
    (ReplayDivergenceError, 409),
    (JournalUnavailableError, 503),
]

#: What every route may answer besides its success, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what}
    for code, what in [
        (400, "bad input: a bad id, malformed JSON, a bad archive"),
        (401, "no token, or not a valid one"),
        (403, "this needs an admin token"),
        (404, "no such tenant or instance (or not the caller's)"),
        (409, "the instance's state does not allow it"),
        (413, "the body is over its limit"),
        (415, "a content type this route does not take"),
        (422, "the body does not have the expected shape"),
        (503, "the journal cannot be used now; retry later"),
    ]
}


#: Fields holding ids, checked against ID_PATTERN: what a refusal calls them.
_ID_FIELDS = {"tenant": "tenant id", "id": "instance id", "type": "event type"}


def _body(status: int, name: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"name": name, "message": message}}, status, headers=headers)


def install(app: FastAPI) -> None:
    """Make `app` answer every error in the one JSON shape."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return _body(exc.status, exc.name, exc.message, exc.headers)

    @app.exception_handler(DynwfError)
    async def _engine(_: Request, exc: DynwfError) -> JSONResponse:
        status = next((code for cls, code in STATUS if isinstance(exc, cls)), 500)
        headers = None
        if isinstance(exc, JournalUnavailableError):
            headers = {"Retry-After": "5"} if exc.retryable else None
        return _body(status, type(exc).__name__, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        if first.get("type") == "json_invalid":
            return _body(400, "MalformedJSON", f"the body is not valid JSON: {first.get('msg')}")
        what = _ID_FIELDS.get(str(first.get("loc", ("",))[-1]))
        if what and first.get("type", "").startswith("string_"):
            try:  # the message every other way in gives for a bad id
                validate_id(first.get("input"), what)
            except InvalidInputError as bad:
                return _body(400, "InvalidInputError", str(bad))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return _body(422, "ValidationError", f"{where}: {first.get('msg', 'invalid')}{more}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's: a body its JSON parser gave up on (too deep, ...)
            return _body(400, "MalformedJSON", f"the body is not valid JSON: {exc.detail}")
        name = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return _body(exc.status_code, name, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        return _body(500, "InternalError", f"{type(exc).__name__}: the server failed; see its log")

"""Every failure becomes `{"error": {"type", "message"}}` here, and only here.

Routes raise domain errors (the store's StoreError subclasses, the engine's EngineError subclasses, ApiError for
what the HTTP layer itself refuses); the handlers below pick the status. Nothing else builds an error response.
`documented(...)` is what a route declares of them in the OpenAPI schema.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompt_store.errors import StoreError
from server.engine.request import EngineError, EngineOverloaded, EngineStopped, InputTooLong, InvalidRequest

from .schemas import ErrorResponse

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the HTTP layer raises itself (auth, quotas, limits); carries its status, type and headers."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers or {}


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its engine requests were cancelled."""


def documented(*statuses: int) -> dict[int, dict]:
    """A route's `responses=`: the one error shape for each status it may answer (in the order given)."""
    return {status: {"model": ErrorResponse} for status in statuses}


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def rate_limited(message: str, retry_after_s: float) -> ApiError:
    return ApiError(429, "rate_limited", message, {"Retry-After": str(max(1, int(retry_after_s + 0.999)))})


# status and type per engine error; the first matching class wins (subclasses before bases). Store errors carry
# their own (prompt_store/errors.py).
_ENGINE = [(InputTooLong, 413, "input_too_long"), (InvalidRequest, 422, "invalid_request"),
           (EngineOverloaded, 503, "overloaded"), (EngineStopped, 503, "unavailable"), (EngineError, 500, "internal")]
_FASTAPI_BODY_ERROR = "There was an error parsing the body"
_HTTP_TYPES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "invalid_request", 429: "rate_limited", 503: "unavailable"}


def status_of(exc: Exception) -> tuple[int, str]:
    """(HTTP status, error type) of a domain error; also used to report errors inside an SSE stream."""
    if isinstance(exc, ApiError):
        return exc.status, exc.type
    if isinstance(exc, StoreError):
        return exc.status, exc.type
    for cls, status, type_ in _ENGINE:
        if isinstance(exc, cls):
            return status, type_
    return 500, "internal"


def error_json(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field_path(loc: tuple) -> str:
    """`body.stop.0`, without pydantic's union-branch tags (`constrained-str`, `list[str]`) that name no field."""
    parts = [str(p) for p in loc if not _is_tag(p)]
    return ".".join(parts) or "body"


def _is_tag(p) -> bool:
    return isinstance(p, str) and ("[" in p or "-" in p or p in _UNION_TAGS)


def _relevant(errors: list[dict]) -> list[dict]:
    """For a union field (a string or a list), drop "should be a valid string" when the value is a list that failed
    on its own terms (65 items): only the branch the value's type chose says what is wrong."""
    def split(e):
        loc = tuple(e.get("loc", ()))
        i = next((k for k, p in enumerate(loc) if _is_tag(p)), None)
        mismatch = i is not None and len(loc) == i + 1 and str(e.get("type", "")).endswith("_type")
        return (loc[:i] if i is not None else None), mismatch

    marks = [split(e) for e in errors]
    chosen = {field for field, mismatch in marks if field is not None and not mismatch}
    return [e for e, (field, mismatch) in zip(errors, marks) if not (mismatch and field in chosen)]


def validation_message(errors: list[dict]) -> str:
    """`body.max_new_tokens: Input should be greater than or equal to 1; body.input: Field required`."""
    errors = _relevant(errors)
    parts = list(dict.fromkeys(f"{_field_path(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in errors))
    more = f" (and {len(parts) - 20} more)" if len(parts) > 20 else ""
    return "; ".join(parts[:20]) + more


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_json(422, "invalid_request", validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 400 and message == _FASTAPI_BODY_ERROR:  # e.g. invalid UTF-8: still a bad body
            return error_json(422, "invalid_request", "body: expected JSON text encoded as UTF-8")
        if exc.status_code == 400:  # a malformed multipart body (e.g. too many fields): an invalid body, like JSON
            return error_json(422, "invalid_request", f"body: {message}")
        if exc.status_code == 404 and message == "Not Found":
            message = "no such endpoint"
        return error_json(exc.status_code, _HTTP_TYPES.get(exc.status_code, "error"), message,
                          getattr(exc, "headers", None))

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_json(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, __: ClientGone) -> JSONResponse:  # nobody reads it; 499 as nginx logs it
        return error_json(499, "client_closed_request", "the client disconnected; the request was cancelled")

    async def _domain(request: Request, exc: Exception) -> JSONResponse:
        status, type_ = status_of(exc)
        if status >= 500 and status != 503:  # 503 is backpressure, not a fault
            log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        headers = {"Retry-After": "1"} if status == 503 else None
        return error_json(status, type_, str(exc) or type_, headers)

    app.add_exception_handler(StoreError, _domain)
    app.add_exception_handler(EngineError, _domain)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_json(500, "internal", "internal server error")

    app.add_middleware(UnexpectedErrors)


class UnexpectedErrors:
    """Answer an unexpected exception with the JSON 500 here, without re-raising. Starlette's outermost
    ServerErrorMiddleware re-raises after its handler runs, and uvicorn then drops the kept-alive connection without
    announcing it, so a pooled client's next request would meet a reset."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if started:  # too late for a response of our own
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await error_json(500, "internal", "internal server error")(scope, receive, send)

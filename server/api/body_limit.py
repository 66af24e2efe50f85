"""One cap on request bodies, used in two places: the middleware for every JSON body (`--max-body-bytes`) and the
upload routes for their own, larger limits (`--max-upload-bytes`, `--max-file-bytes`).

A body that declares a length over the cap is refused before it is read; a chunked body (no declared length) is
counted as it arrives and refused as soon as it passes the cap. Without the middleware a classify of 64 inputs of a
million characters each would be read and parsed before any field check refused it.

The refusal is a 413 `payload_too_large` whose message says what was expected and what was found. It is raised as
Starlette's HTTPException because FastAPI, while it parses a body, re-raises that one as is and turns any other
exception into a 400.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request

from .errors import error_json


def too_large(what: str, limit: int, found: int | str) -> HTTPException:
    return HTTPException(413, f"{what} expected at most {limit} bytes, found {found}")


def declared_length(content_length: str | bytes | None) -> int | None:
    """The Content-Length header as a number; None when absent or not a plain number (a chunked body)."""
    if isinstance(content_length, bytes):
        content_length = content_length.decode("latin-1")
    return int(content_length) if content_length and content_length.isdigit() else None


def capped(receive, limit: int, what: str):
    """`receive`, whose body messages raise the 413 once more than `limit` bytes have arrived in all."""
    seen = 0

    async def receive_capped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large(what, limit, "more")
        return message

    return receive_capped


def limited(request: Request, limit: int, what: str = "upload") -> Request:
    """The same request with its body capped at `limit` bytes (for a route with a limit of its own)."""
    declared = declared_length(request.headers.get("content-length"))
    if declared is not None and declared > limit:
        raise too_large(what, limit, declared)
    return Request(request.scope, capped(request.receive, limit, what))


class BodyLimit:
    """ASGI middleware: POST/PUT/PATCH bodies other than multipart uploads are capped at `limit` bytes."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if headers.get(b"content-type", b"").lower().startswith(b"multipart/"):
            return await self.app(scope, receive, send)
        declared = declared_length(headers.get(b"content-length"))
        if declared is not None and declared > self.limit:  # before the app: answered here, not raised
            refused = too_large("request body", self.limit, declared)
            return await error_json(413, "payload_too_large", refused.detail)(scope, receive, send)
        await self.app(scope, capped(receive, self.limit, "request body"), send)

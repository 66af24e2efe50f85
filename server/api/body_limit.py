"""A cap on request bodies that are not uploads: a huge JSON body is refused before it is read and parsed.

Uploads (multipart) have their own, larger limit (`--max-upload-bytes`, enforced by the tasks route); without this
cap a classify of 64 inputs of a million characters each would be read and parsed before any field check refused it.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException

from .errors import error_json


class BodyLimit:
    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if headers.get(b"content-type", b"").lower().startswith(b"multipart/"):
            return await self.app(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        message = f"request body expected at most {self.limit} bytes"
        if declared.isdigit() and int(declared) > self.limit:
            return await error_json(413, "payload_too_large", f"{message}, found {int(declared)}")(scope, receive, send)
        seen = 0

        async def limited():  # chunked bodies declare no length: count them as they arrive
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, f"{message}, found more")  # FastAPI re-raises HTTPException as is
            return msg

        await self.app(scope, limited, send)

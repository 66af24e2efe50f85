"""Server-Sent Events, one framer and one stream for every route: the native generate stream (`event: token`,
`done`, `error`) and OpenAI's chunks (`data: {...}`, then `data: [DONE]`).

Once the headers are sent a failure cannot be a status code: it becomes one in-band error event in the one error
shape, and the engine call lets go of its admission however the stream ends (done, failed, client gone).
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Protocol

from fastapi.responses import StreamingResponse

from .errors import ApiError, status_of

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Closes(Protocol):
    def close(self) -> None: ...


def sse(data: dict | str, event: str | None = None) -> bytes:
    """One event: compact JSON (or a bare string such as OpenAI's [DONE]), named when `event` is given."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    name = f"event: {event}\n" if event is not None else ""
    return f"{name}data: {payload}\n\n".encode()


def stream_error(e: Exception) -> dict:
    """The one error shape inside a stream, whose headers are already sent: a domain error's own message, never the
    text of an unexpected one."""
    status, type_ = status_of(e)
    message = str(e) if status < 500 or isinstance(e, ApiError) else "internal error"
    return {"error": {"type": type_, "message": message}}


def event_stream(call: Closes, events: AsyncIterator[bytes], error_event: str | None = None) -> StreamingResponse:
    """An engine call's events as Server-Sent Events: a failure after the headers becomes one in-band error event
    (named `error_event`, or unnamed as OpenAI sends it), and `call.close()` runs however the stream ends."""
    async def run() -> AsyncIterator[bytes]:
        try:
            async for chunk in events:
                yield chunk
        except Exception as e:  # noqa: BLE001 - headers are gone: report in-band
            yield sse(stream_error(e), error_event)
        finally:
            await events.aclose()
            call.close()

    return StreamingResponse(run(), media_type="text/event-stream", headers=HEADERS)

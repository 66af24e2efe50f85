"""The one streaming helper: after the headers, a failure is one in-band error event in the one error shape (a
domain error's message, never an unexpected one's), and the engine call always lets go of its admission."""

from __future__ import annotations

import asyncio

import pytest

from server.api.errors import ApiError
from server.api.sse import event_stream, sse
from server.engine.request import InvalidRequest


class FakeCall:
    closed = 0

    def close(self) -> None:
        self.closed += 1


async def body(exc: Exception | None):
    yield b"data: 1\n\n"
    if exc is not None:
        raise exc
    yield b"data: 2\n\n"


def collect(call: FakeCall, exc: Exception | None, error_event: str | None) -> list[bytes]:
    response = event_stream(call, body(exc), error_event)

    async def run():
        return [chunk async for chunk in response.body_iterator]
    return asyncio.run(run())


@pytest.mark.parametrize("exc, error", [
    (None, None),
    (InvalidRequest("bad stop"), {"error": {"type": "invalid_request", "message": "bad stop"}}),
    (ApiError(500, "engine_error", "the request failed in the engine"),
     {"error": {"type": "engine_error", "message": "the request failed in the engine"}}),
    (RuntimeError("secret detail"), {"error": {"type": "internal", "message": "internal error"}}),
])
@pytest.mark.parametrize("error_event", [None, "error"])
def test_event_stream_reports_failures_in_band_and_always_closes_the_call(exc, error, error_event):
    call = FakeCall()
    chunks = collect(call, exc, error_event)
    assert chunks[0] == b"data: 1\n\n"
    assert chunks[1:] == ([b"data: 2\n\n"] if error is None else [sse(error, error_event)])
    assert call.closed == 1


def test_one_framer_for_both_stream_kinds():
    """Native events are named; OpenAI's are bare data lines, with [DONE] as text. JSON is compact either way."""
    assert sse({"index": 0, "text": "a b"}, "token") == b'event: token\ndata: {"index":0,"text":"a b"}\n\n'
    assert sse({"choices": []}) == b'data: {"choices":[]}\n\n'
    assert sse("[DONE]") == b"data: [DONE]\n\n"

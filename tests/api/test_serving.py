"""The one streaming helper: after the headers, a failure is one in-band error event in the one error shape (a
domain error's message, never an unexpected one's), and the job always lets go of its admission."""

from __future__ import annotations

import asyncio

import pytest

from server.api.errors import ApiError
from server.api.serving import event_stream
from server.engine.request import InvalidRequest


class FakeJob:
    closed = 0

    def close(self) -> None:
        self.closed += 1


async def body(exc: Exception | None):
    yield b"data: 1\n\n"
    if exc is not None:
        raise exc
    yield b"data: 2\n\n"


def collect(job: FakeJob, exc: Exception | None) -> list[bytes]:
    response = event_stream(job, body(exc), lambda err: repr(err).encode())

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
def test_event_stream_reports_failures_in_band_and_always_closes_the_job(exc, error):
    job = FakeJob()
    chunks = collect(job, exc)
    assert chunks[0] == b"data: 1\n\n"
    assert chunks[1:] == ([b"data: 2\n\n"] if error is None else [repr(error).encode()])
    assert job.closed == 1

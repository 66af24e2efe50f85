"""The loop thread and its async streams (server/engine/async_engine.py), on a tiny model without HTTP: deltas in
order and a final output, the same tokens as the engine stepped by hand, a cancelled stream's row freed, a full
queue and a stopped engine refused, and a loop that dies failing every waiting caller and readiness."""

from __future__ import annotations

import asyncio

import pytest

from prompt_core.spec import PromptKind, PromptSpec
from server.engine.async_engine import AsyncEngine
from server.engine.request import EngineOverloaded, EngineRequest, EngineStopped
from tests.helpers import greedy, new_engine, prompt_ref, run, tiny_llama

TASK = prompt_ref("t@1", PromptSpec(PromptKind.HARD, 0, "Q: {input}\nA:"), None)


@pytest.fixture(scope="module")
def loaded():
    return tiny_llama()


def request(rid: str, n: int = 6) -> EngineRequest:
    return EngineRequest(rid, TASK, f"question {rid}", sampling=greedy(n))


def serve(loaded, body, **kw):
    """Run `body(engine)` on an event loop with a started AsyncEngine, shut down afterwards."""
    async def main():
        engine = AsyncEngine(new_engine(loaded), **kw)
        engine.start()
        try:
            return await body(engine)
        finally:
            await engine.shutdown(grace_s=0)
    return asyncio.run(main())


def test_a_stream_gives_the_engines_own_tokens_delta_by_delta(loaded):
    expected = run(new_engine(loaded), [request("a")])["a"]

    async def body(engine):
        deltas = [out async for out in engine.submit(request("a"))]
        return deltas, engine.in_flight

    deltas, in_flight = serve(loaded, body)
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert "".join(d.new_text for d in deltas) == deltas[-1].text == expected.text
    assert sum(len(d.new_token_ids) for d in deltas) == deltas[-1].completion_tokens == expected.completion_tokens
    assert in_flight == 0  # delivered and forgotten


def test_cancel_frees_the_row_and_the_stream_ends(loaded):
    async def body(engine):
        stream = engine.submit(request("long", n=200))
        first = await stream.__anext__()
        stream.cancel()
        last = await stream.result()
        for _ in range(200):
            if not engine.in_flight and engine.stats().running == 0:
                break
            await asyncio.sleep(0.01)
        return first, last, engine.stats()

    first, last, stats = serve(loaded, body)
    assert not first.finished and last.finished and last.finish_reason == "cancelled"
    assert stats.running == 0 and stats.in_flight == 0


def test_a_full_queue_and_a_stopped_engine_are_refused(loaded):
    async def body(engine):
        engine.submit(request("one", n=50))
        with pytest.raises(EngineOverloaded, match="the limit is 1"):
            engine.submit(request("two"))
        await engine.shutdown(grace_s=0)
        with pytest.raises(EngineStopped, match="not accepting"):
            engine.submit(request("three"))
        return engine.ready

    assert serve(loaded, body, max_queue=1) is False


def test_a_loop_that_dies_fails_every_waiting_caller_and_readiness(loaded, monkeypatch):
    async def body(engine):
        def boom():
            raise RuntimeError("step failed")
        monkeypatch.setattr(engine.engine, "step", boom)
        out = await engine.submit(request("doomed")).result()
        with pytest.raises(EngineStopped, match="the engine loop failed"):
            engine.submit(request("after"))
        return out, engine.ready, engine.stats().loop_alive

    out, ready, alive = serve(loaded, body)
    assert out.finished and out.finish_reason == "error" and out.error == "the engine loop failed"
    assert ready is False and alive is False

"""Batch invariance over HTTP with the official `openai` client, on the server's default precision (`--dtype auto`:
bf16 on a CPU with native bf16): concurrent chat completions are the same tokens and log-probabilities as the same
requests sent one at a time, and /ready says the server is batch-invariant."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.server.api.conftest import ACME, live_server

QUESTIONS = ["Why is the sky blue?", "Write a haiku about rain.", "What is 17 times 3?", "Name a large animal.",
             "Describe a forest at night.", "How do planes fly?", "Give me a tip for sleeping well.",
             "What is a prime number?"]


@pytest.fixture(scope="module")
def server(module_tmp):
    with live_server(module_tmp, dtype="auto", max_prefill_tokens=64) as s:
        yield s


def chat(client: openai.OpenAI, q: str):
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": q}], max_tokens=48,
                                       temperature=0, logprobs=True, top_logprobs=2)
    c = r.choices[0]
    return c.message.content, [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs])
                               for t in c.logprobs.content]


def test_concurrent_chat_equals_each_request_alone(server):
    with server.client() as c:
        ready = c.get("/ready").json()
    assert ready["batch_invariant"] is True, ready
    print(f"served in {ready['dtype']}")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ACME, max_retries=0, timeout=600)
    alone = {q: chat(client, q) for q in QUESTIONS}
    with ThreadPoolExecutor(len(QUESTIONS) * 2) as pool:
        together = list(pool.map(lambda q: (q, chat(client, q)), QUESTIONS * 2))
    for q, got in together:
        assert got == alone[q], q

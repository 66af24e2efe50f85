"""Token-id prompts, echo and logprobs on /v1/completions, logprobs on chat, as OpenAI clients and the evaluation
harness send them, against a live server."""

from __future__ import annotations

import json
import math

import openai
import pytest

from .conftest import ACME, METERED, assert_error, hard_task, live_server, native_soft_prompt, pack, upload

LABELS = ["positive", "negative", "neutral"]


@pytest.fixture(scope="module")
def server(module_tmp):
    with live_server(module_tmp, tenants={"metered": {"tokens_per_minute": 60}}) as s:
        with s.client(ACME) as c:
            assert hard_task(c, "qa", "Question:\n{input}\nAnswer:").status_code == 201
            assert hard_task(c, "plain", "{input}").status_code == 201
            assert upload(c, "senti", pack(native_soft_prompt("prompt_tuning", T=4, seed=3)),
                          {"labels": LABELS, "task_type": "classify"}).status_code == 201
        yield s


@pytest.fixture(scope="module")
def acme(server):
    with server.client(ACME) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=ACME, max_retries=0, timeout=60) as client:
        yield client


def encode(server, text: str) -> list[int]:
    return server.runtime.engine.engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def token_strings(server, ids: list[int]) -> list[str]:
    return server.runtime.engine.engine.token_strings(ids)


def complete(client, **body) -> dict:
    r = client.post("/v1/completions", json={"temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_every_prompt_form_is_one_input_each(server, acme):
    """A string, a list of strings, a list of token ids and a list of token-id lists: the ids of a text give what
    the text gives, placed in the task's template the same way."""
    texts = ["What is 2+2?", "Name a colour."]
    ids = [encode(server, t) for t in texts]
    by_text = [c["text"] for c in complete(acme, model="qa", prompt=texts, max_tokens=5)["choices"]]
    assert complete(acme, model="qa", prompt=texts[0], max_tokens=5)["choices"][0]["text"] == by_text[0]
    one = complete(acme, model="qa", prompt=ids[0], max_tokens=5)
    assert len(one["choices"]) == 1 and one["choices"][0]["text"] == by_text[0]
    many = complete(acme, model="qa", prompt=ids, max_tokens=5)
    assert [c["index"] for c in many["choices"]] == [0, 1]
    assert [c["text"] for c in many["choices"]] == by_text
    # the template's text and the ids: usage counts both, exactly as for the text
    template = encode(server, "Question:\n") + encode(server, "\nAnswer:")
    assert one["usage"]["prompt_tokens"] == len(template) + len(ids[0])


def test_echo_with_logprobs_scores_the_prompt_as_sent(server, acme):
    ids = encode(server, "The capital of France is Paris.")
    for task, first_has_context in (("plain", False), ("qa", True), ("senti", True)):
        body = complete(acme, model=task, prompt=ids, echo=True, logprobs=2, max_tokens=0)
        choice = body["choices"][0]
        lp = choice["logprobs"]
        assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 0
        assert lp["tokens"] == token_strings(server, ids)  # the prompt's own tokens, in order, nothing else
        assert choice["text"] == "The capital of France is Paris."
        for k, tok in enumerate(lp["tokens"]):
            assert choice["text"][lp["text_offset"][k]:].startswith(tok)
        assert (lp["token_logprobs"][0] is not None) == first_has_context, task
        assert (lp["top_logprobs"][0] is not None) == first_has_context, task
        for k in range(1, len(ids)):
            value, top = lp["token_logprobs"][k], lp["top_logprobs"][k]
            assert value < 0 and top[lp["tokens"][k]] == value  # the chosen token is always listed
            assert 2 <= len(top) <= 3 and max(top.values()) >= value
        # text and ids of the same words score the same ("plain" has no template seam)
        if task == "plain":
            again = complete(acme, model=task, prompt="The capital of France is Paris.", echo=True, logprobs=2,
                             max_tokens=0)["choices"][0]["logprobs"]
            assert again["tokens"] == lp["tokens"]
            assert again["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)


def test_harness_style_scoring_request(server, oai, acme):
    """What lm-evaluation-harness sends for a log-likelihood: token ids, echo, logprobs 1, max_tokens 1. It sums
    token_logprobs[ctxlen:-1], so the prompt's entries must come first and exactly one generated entry last."""
    context, continuation = encode(server, "Roses are red, violets are"), encode(server, " blue")
    r = oai.completions.create(model="senti", prompt=[context + continuation], echo=True, logprobs=1, max_tokens=1,
                               temperature=0, seed=1234)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(context) + len(continuation) + 1
    assert lp.tokens[:-1] == token_strings(server, context + continuation)
    assert r.choices[0].text.startswith("Roses are red, violets are blue")
    assert all(v is not None for v in lp.token_logprobs)  # a soft prompt: its virtual tokens are context
    score = sum(lp.token_logprobs[len(context):-1])
    alone = complete(acme, model="senti", prompt=context + continuation, echo=True, logprobs=0,
                     max_tokens=0)["choices"][0]["logprobs"]["token_logprobs"]
    assert score == pytest.approx(sum(alone[len(context):]), abs=1e-4)


def test_verbalizer_logprobs_agree_with_classify(server, acme):
    """For each input and label, the verbalizer's token log-probabilities after the input (echo, max_tokens 0)
    give the classify scores: classify's softmax over labels of those sums."""
    inputs = ["I loved every minute of it.", "Dull and far too long.", "It was a film."]
    verbal = [encode(server, f" {name}") for name in LABELS]
    classified = acme.post("/v1/tasks/senti/classify", json={"input": inputs}).json()
    for text, result in zip(inputs, classified):
        prompts = [encode(server, text) + v for v in verbal]
        choices = complete(acme, model="senti", prompt=prompts, echo=True, logprobs=0, max_tokens=0)["choices"]
        sums = [sum(c["logprobs"]["token_logprobs"][-len(v):]) for c, v in zip(choices, verbal)]
        top = max(sums)
        probs = [math.exp(s - top) for s in sums]
        probs = [p / sum(probs) for p in probs]
        assert probs == pytest.approx([result["scores"][name] for name in LABELS], abs=1e-4)
        assert LABELS[sums.index(top)] == result["label"]


def test_stream_carries_the_same_logprobs(server, acme):
    body = {"model": "qa", "prompt": "Write a word:", "echo": True, "logprobs": 3, "max_tokens": 6, "temperature": 0}
    whole = complete(acme, **body)["choices"][0]
    text, merged = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with acme.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            if choice["logprobs"]:
                for k, v in choice["logprobs"].items():
                    merged[k] += v
    assert text == whole["text"] and text.startswith("Write a word:")
    assert merged["tokens"] == whole["logprobs"]["tokens"]
    assert merged["text_offset"] == whole["logprobs"]["text_offset"]
    assert merged["token_logprobs"] == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-5)
    assert len(merged["tokens"]) > len(encode(server, "Write a word:"))  # the prompt's and the completion's


def test_chat_logprobs(server, oai):
    messages = [{"role": "user", "content": "Say hello."}]
    r = oai.chat.completions.create(model="plain", messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                    top_logprobs=2)
    content = r.choices[0].logprobs.content
    eos = token_strings(server, [server.runtime.engine.engine.tokenizer.eos_token_id])[0]
    joined = "".join(t.token for t in content)
    assert joined in (r.choices[0].message.content, r.choices[0].message.content + eos)
    assert len(content) >= r.usage.completion_tokens >= 1
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy
        assert t.bytes is None or bytes(t.bytes).decode() == t.token
    stream = oai.chat.completions.create(model="plain", messages=messages, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=2, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)
    plain = oai.chat.completions.create(model="plain", messages=messages, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "x", "logprobs": 21}, 422, "between 0 and 20"),
    ({"prompt": "x", "max_tokens": 0}, 422, "allowed with echo"),
    ({"prompt": [1, "a"]}, 422, "one form only"),
    ({"prompt": [[1, 2], []]}, 422, "body.prompt"),
    ({"prompt": [10 ** 6]}, 422, "outside the model's vocabulary"),
    ({"prompt": [-1]}, 422, "body.prompt"),
    ({"prompt": list(range(1, 3000))}, 413, "limit is 2048"),
])
def test_bad_completion_fields_are_clear_4xx(acme, body, status, message):
    err = assert_error(acme.post("/v1/completions", json={"model": "qa", **body}), status)
    assert message in err["message"], err


def test_bad_chat_logprob_fields_are_422(acme):
    chat = {"model": "plain", "messages": [{"role": "user", "content": "hi"}]}
    err = assert_error(acme.post("/v1/chat/completions", json={**chat, "top_logprobs": 2}), 422, "invalid_request")
    assert "needs logprobs" in err["message"]
    err = assert_error(acme.post("/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 25}), 422)
    assert "between 0 and 20" in err["message"]


def test_echo_scoring_counts_toward_the_token_rate(server):
    """A pure scoring request (max_tokens 0) generates nothing but is charged its whole prompt."""
    with server.client(METERED) as metered:
        assert hard_task(metered, "m-plain", "{input}").status_code == 201
        ids = encode(server, "word " * 80)
        r = metered.post("/v1/completions", json={"model": "m-plain", "prompt": ids, "echo": True, "logprobs": 1,
                                                   "max_tokens": 0})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids) > 60
        assert_error(metered.post("/v1/completions", json={"model": "m-plain", "prompt": "x", "max_tokens": 1}), 429,
                     "rate_limited")

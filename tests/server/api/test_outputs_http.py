"""Structured output and the OpenAI sampling fields over HTTP: per request, per task (stored with its version),
logit_bias, penalties and n, on the native route and both OpenAI routes."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from .conftest import ACME, assert_error, hard_task, live_server, native_soft_prompt, pack, upload

CHAT_TEMPLATE = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
TEXT = "Give me a JSON object for a person called Ada aged 36."


@pytest.fixture(scope="module")
def server(module_tmp):
    with live_server(module_tmp) as s:
        with s.client(ACME) as c:
            assert hard_task(c, "free", CHAT_TEMPLATE).status_code == 201
            assert hard_task(c, "raw", "{input}").status_code == 201
            r = hard_task(c, "person", CHAT_TEMPLATE, generation={"response_format": PERSON_FORMAT,
                                                                  "max_new_tokens": 40})
            assert r.status_code == 201, r.text
            # the chat route renders the chat template itself, so its task wraps nothing
            r = hard_task(c, "person-chat", "{input}", generation={"response_format": PERSON_FORMAT})
            assert r.status_code == 201, r.text
        yield s


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=ACME, max_retries=0, timeout=120) as client:
        yield client


def generate(server, task, **body):
    with server.client(ACME) as c:
        return c.post(f"/v1/tasks/{task}/generate", json=body)


def valid_person(text: str) -> dict:
    obj = json.loads(text)
    jsonschema.validate(obj, PERSON)
    return obj


def test_a_task_with_a_stored_schema_answers_valid_json_on_every_route(server, oai):
    r = generate(server, "person", input=TEXT)
    assert r.status_code == 200, r.text
    assert r.json()["finish_reason"] == "stop"
    valid_person(r.json()["text"])
    c = oai.completions.create(model="person", prompt=TEXT, max_tokens=40)
    assert c.choices[0].finish_reason == "stop"
    valid_person(c.choices[0].text)
    chat = oai.chat.completions.create(model="person-chat", messages=[{"role": "user", "content": TEXT}],
                                       max_tokens=40)
    valid_person(chat.choices[0].message.content)
    # the same task without its schema answers in free text
    free = generate(server, "free", input=TEXT, max_new_tokens=12).json()["text"]
    with pytest.raises(ValueError):
        json.loads(free)
    # a request may ask for free text explicitly
    r = generate(server, "person", input=TEXT, max_new_tokens=12, response_format={"type": "text"})
    assert r.json()["text"] == free


def test_the_schema_is_stored_and_versioned_with_the_task(server):
    with server.client(ACME) as c:
        stored = c.get("/v1/tasks/person").json()["generation"]["response_format"]
        assert stored["json_schema"]["schema"] == PERSON
        assert hard_task(c, "person", CHAT_TEMPLATE).status_code == 201  # version 2: no schema
        try:
            v2 = generate(server, "person", input=TEXT, max_new_tokens=12).json()
            v1 = generate(server, "person@1", input=TEXT).json()
            assert v2["task"] == "person@2" and v1["task"] == "person@1"
            with pytest.raises(ValueError):
                json.loads(v2["text"])
            valid_person(v1["text"])
        finally:
            r = hard_task(c, "person", CHAT_TEMPLATE, generation={"response_format": PERSON_FORMAT,
                                                                  "max_new_tokens": 40})
            assert r.status_code == 201


def test_schemas_the_library_cannot_compile_are_refused_at_upload(server):
    with server.client(ACME) as c:
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}
        err = assert_error(hard_task(c, "bad", "{input}", generation={"response_format": bad}), 422)
        assert "Unsupported type" in err["message"] and "json_schema" in err["message"]
        err = assert_error(upload(c, "bad", pack(native_soft_prompt()), metadata={
            "generation": {"response_format": {"type": "regex", "regex": "(ab"}}}), 422)
        assert "regex" in err["message"] and "parenthesis" in err["message"]
        assert_error(hard_task(c, "bad", "{input}", generation={"response_format": {"type": "regex"}}), 422)
        # a response_format inside an artifact's own task.json is checked the same way, before anything is stored
        files = native_soft_prompt()
        manifest = json.loads(files["task.json"])
        manifest["generation"] = {"response_format": bad}
        err = assert_error(upload(c, "bad", pack({**files, "task.json": json.dumps(manifest).encode()})), 422)
        assert "Unsupported type" in err["message"]
        assert c.get("/v1/tasks/bad").status_code == 404  # nothing was stored
        manifest["generation"] = {"response_format": {"type": "choice", "choice": ["yes", "no"]}}
        r = upload(c, "yesno", pack({**files, "task.json": json.dumps(manifest).encode()}))
        assert r.status_code == 201, r.text
        assert generate(server, "yesno", input="Is it?").json()["text"] in ("yes", "no")


def test_request_constraints_on_every_route(server, oai):
    date = r"\d{4}-\d{2}-\d{2}"
    r = generate(server, "free", input="When did the Berlin wall fall?", max_new_tokens=20,
                 response_format={"type": "regex", "regex": date})
    assert re.fullmatch(date, r.json()["text"]), r.text
    r = generate(server, "free", input="Is Paris in France?", max_new_tokens=8,
                 response_format={"type": "choice", "choice": ["yes", "no"]})
    assert r.json()["text"] in ("yes", "no") and r.json()["finish_reason"] == "stop"
    # greedy: chat samples at temperature 1 by default, and a sampled string can run past max_tokens ("length")
    chat = oai.chat.completions.create(model="raw", messages=[{"role": "user", "content": "Describe a cat."}],
                                       max_tokens=64, temperature=0, response_format={"type": "json_object"})
    assert chat.choices[0].finish_reason == "stop", chat.choices[0].message.content
    assert isinstance(json.loads(chat.choices[0].message.content), dict)
    c = oai.completions.create(model="free", prompt=TEXT, max_tokens=40,
                               extra_body={"response_format": PERSON_FORMAT})  # an extension on completions
    valid_person(c.choices[0].text)
    # vLLM's names for the same constraints
    c = oai.completions.create(model="free", prompt=TEXT, max_tokens=40, extra_body={"guided_json": PERSON})
    valid_person(c.choices[0].text)
    c = oai.completions.create(model="free", prompt="Is Paris in France?", max_tokens=8,
                               extra_body={"guided_choice": ["yes", "no"]})
    assert c.choices[0].text in ("yes", "no")
    c = oai.completions.create(model="free", prompt="When did the Berlin wall fall?", max_tokens=20,
                               extra_body={"guided_regex": date})
    assert re.fullmatch(date, c.choices[0].text)


def test_unsupported_or_conflicting_constraints_are_422(server):
    with server.client(ACME) as c:
        body = {"model": "free", "prompt": "x", "max_tokens": 2}
        err = assert_error(c.post("/v1/completions", json={**body, "guided_grammar": "root ::= 'a'"}), 422)
        assert "guided_grammar" in err["message"]
        err = assert_error(c.post("/v1/completions", json={**body, "guided_regex": "a",
                                                            "response_format": {"type": "json_object"}}), 422)
        assert "at most one" in err["message"]
        err = assert_error(c.post("/v1/chat/completions", json={
            "model": "free", "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}}),
            422)
        assert "Unsupported type" in err["message"]
        assert_error(c.post("/v1/completions", json={**body, "best_of": 3}), 422)
        assert_error(c.post("/v1/completions", json={**body, "logit_bias": {"abc": 1}}), 422)
        assert_error(c.post("/v1/completions", json={**body, "logit_bias": {"1": 101}}), 422)
        err = assert_error(c.post("/v1/completions", json={**body, "logit_bias": {"99999999": 1}}), 422)
        assert "vocabulary" in err["message"]
        assert_error(c.post("/v1/completions", json={**body, "presence_penalty": 2.5}), 422)
        assert_error(generate(server, "free", input="x", response_format={"type": "choice", "choice": []}), 422)


def test_logit_bias_forces_and_forbids(server, oai):
    tok = server.runtime.loaded.tokenizer
    plain = oai.completions.create(model="free", prompt="What is the capital of France?", max_tokens=6,
                                   temperature=0)
    first = tok(plain.choices[0].text, add_special_tokens=False)["input_ids"][0]
    banana = tok(" banana", add_special_tokens=False)["input_ids"][0]
    forced = oai.completions.create(model="free", prompt="What is the capital of France?", max_tokens=3,
                                    temperature=0, logit_bias={str(banana): 100})
    assert tok(forced.choices[0].text, add_special_tokens=False)["input_ids"] == [banana] * 3
    banned = oai.chat.completions.create(model="free", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                         temperature=0)
    first_chat = tok(banned.choices[0].message.content, add_special_tokens=False)["input_ids"][0]
    banned2 = oai.chat.completions.create(model="free", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          temperature=0, logit_bias={str(first_chat): -100})
    assert first_chat not in tok(banned2.choices[0].message.content, add_special_tokens=False)["input_ids"]
    r = generate(server, "free", input="What is the capital of France?", max_new_tokens=6,
                 logit_bias={str(first): -100})
    assert first not in tok(r.json()["text"], add_special_tokens=False)["input_ids"]


def test_frequency_penalty_over_http(server, oai):
    prompt = "A list of fruits: apple, apple, apple, apple,"
    base = oai.completions.create(model="raw", prompt=prompt, max_tokens=20, temperature=0).choices[0].text
    pen = oai.completions.create(model="raw", prompt=prompt, max_tokens=20, temperature=0,
                                 frequency_penalty=1.5).choices[0].text
    assert base.count("apple") >= 6 and pen.count("apple") < base.count("apple") / 2, (base, pen)


def test_n_choices_with_a_seed_reproduce(server, oai):
    kw = dict(model="raw", prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=5, n=3)
    a = oai.completions.create(**kw)
    b = oai.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [c.text for c in a.choices]
    assert texts == [c.text for c in b.choices]
    assert len(set(texts)) > 1  # each choice draws with its own seed
    one = oai.completions.create(**{**kw, "n": 1})
    assert one.choices[0].text == texts[0]  # choice 0 draws with the seed itself
    assert a.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once, as OpenAI counts it
    assert 3 <= a.usage.completion_tokens <= 3 * 8
    # two prompts x n=2: prompt-major order
    two = oai.completions.create(model="raw", prompt=["Once upon a time", "The weather"], max_tokens=4,
                                 temperature=1.0, seed=5, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert [c.text for c in two.choices[:2]] == [c.text for c in oai.completions.create(
        model="raw", prompt="Once upon a time", max_tokens=4, temperature=1.0, seed=5, n=2).choices]
    chat = oai.chat.completions.create(model="free", messages=[{"role": "user", "content": "Say something."}],
                                       max_tokens=8, temperature=1.0, seed=9, n=3)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) > 1


def test_n_choices_stream_with_their_index(oai):
    stream = oai.chat.completions.create(model="free", messages=[{"role": "user", "content": "Say something."}],
                                         max_tokens=6, temperature=1.0, seed=9, n=2, stream=True)
    text, finished = {0: "", 1: ""}, set()
    for chunk in stream:
        for ch in chunk.choices:
            text[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1}
    full = oai.chat.completions.create(model="free", messages=[{"role": "user", "content": "Say something."}],
                                       max_tokens=6, temperature=1.0, seed=9, n=2)
    assert [text[0], text[1]] == [c.message.content for c in full.choices]


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_metrics_count_constrained_requests_compiles_and_mask_time(server):
    with server.client() as anon:
        before = anon.get("/metrics").text
    r = generate(server, "free", input="Is Paris in France?", max_new_tokens=4,
                 response_format={"type": "choice", "choice": ["oui", "non", "peut-être"]})
    assert r.status_code == 200
    with server.client() as anon:
        after = anon.get("/metrics").text
    name = 'promptserve_constrained_requests_total{kind="choice"}'
    assert _metric(after, name) == _metric(before, name) + 1
    name = 'promptserve_grammar_compile_seconds_count{kind="choice"}'
    assert _metric(after, name) == _metric(before, name) + 1  # a new choice list: compiled once
    name = "promptserve_grammar_mask_seconds_count"
    assert _metric(after, name) > _metric(before, name)


def test_logprobs_are_the_models_own_before_bias_and_masks(server, oai):
    """A token forced by logit_bias +100 is reported with its log-probability under the model, not ~0."""
    tok = server.runtime.loaded.tokenizer
    banana = tok(" banana", add_special_tokens=False)["input_ids"][0]
    r = oai.completions.create(model="free", prompt="What is the capital of France?", max_tokens=1, temperature=0,
                               logprobs=1, logit_bias={str(banana): 100})
    assert tok(r.choices[0].text, add_special_tokens=False)["input_ids"] == [banana]
    assert r.choices[0].logprobs.token_logprobs[0] < -5

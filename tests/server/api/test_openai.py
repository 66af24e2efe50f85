"""The OpenAI-compatible endpoints with the official `openai` client against a live server."""

from __future__ import annotations

import openai
import pytest

from .conftest import ACME, GLOBEX, hard_task, live_server, native_soft_prompt, pack, upload

CHATML = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"   # README's qa: already a chat prompt
TERSE = "<|im_start|>system\nAnswer in one short sentence.<|im_end|>\n<|im_start|>user\n{input}<|im_end|>\n" \
        "<|im_start|>assistant\n"                                          # a chat prompt with its own system turn
TERSE_DEFAULTS = {"max_new_tokens": 40, "temperature": 0, "stop": ["."]}


@pytest.fixture(scope="module")
def server(module_tmp):
    with live_server(module_tmp) as s:
        with s.client(ACME) as c:
            assert hard_task(c, "qa").status_code == 201
            assert hard_task(c, "chat", "{input}").status_code == 201
            assert upload(c, "soft", pack(native_soft_prompt("p_tuning", T=3, seed=2))).status_code == 201
            assert hard_task(c, "chatml", CHATML).status_code == 201
            assert hard_task(c, "terse", TERSE, generation=TERSE_DEFAULTS).status_code == 201
        yield s


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=ACME, max_retries=0, timeout=60) as client:
        yield client


def native(server, task, text, n, **kw):
    body = {"input": text, **({"max_new_tokens": n} if n is not None else {}), **kw}
    with server.client(ACME) as c:
        return c.post(f"/v1/tasks/{task}/generate", json=body).json()


def test_models_lists_the_tenants_tasks(oai):
    ids = {m.id for m in oai.models.list()}
    assert {"qa", "chat", "soft", "default"} <= ids
    m = oai.models.retrieve("qa")
    assert m.id == "qa" and m.object == "model" and m.owned_by == "acme"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("missing")


def test_completion_greedy_equals_native_generate(server, oai):
    r = oai.completions.create(model="qa", prompt="What is 2+2?", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.model == "qa" and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.finish_reason in ("stop", "length")
    expected = native(server, "qa", "What is 2+2?", 6)
    assert choice.text == expected["text"]
    assert r.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_prompt_list_gives_one_choice_each_in_order(server, oai):
    prompts = ["Name a color.", "Name an animal.", "Name a city."]
    r = oai.completions.create(model="soft", prompt=prompts, max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, r.choices):
        assert choice.text == native(server, "soft", prompt, 4)["text"]


def test_completion_stream(server, oai):
    chunks = list(oai.completions.create(model="qa", prompt="What is 2+2?", max_tokens=6, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == native(server, "qa", "What is 2+2?", 6)["text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_completion_stream_of_a_list(oai):
    chunks = list(oai.completions.create(model="qa", prompt=["a", "b"], max_tokens=3, temperature=0, stream=True))
    done = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(done) == [0, 1]


def test_temperature_defaults_to_one_and_seed_reproduces(oai):
    a = oai.completions.create(model="qa", prompt="Once upon a time", max_tokens=8, seed=7)
    b = oai.completions.create(model="qa", prompt="Once upon a time", max_tokens=8, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_chat_applies_the_chat_template_then_the_task(server, oai):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
    r = oai.chat.completions.create(model="chat", messages=messages, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    tokenizer = server.runtime.engine.engine.tokenizer
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = native(server, "chat", rendered, 6)
    assert r.choices[0].message.content == expected["text"]
    assert r.usage.prompt_tokens == expected["usage"]["prompt_tokens"]


def test_chat_stream(server, oai):
    messages = [{"role": "user", "content": "Say hi."}]
    chunks = list(oai.chat.completions.create(model="chat", messages=messages, max_tokens=6, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = oai.chat.completions.create(model="chat", messages=messages, max_tokens=6, temperature=0)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_errors_reach_the_client_as_openai_errors(server, oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="missing", prompt="x", max_tokens=2)
    assert e.value.body["type"] == "not_found"  # the client unwraps {"error": {...}}
    with pytest.raises(openai.UnprocessableEntityError):
        oai.completions.create(model="qa", prompt="x", max_tokens=2, n=17)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.completions.create(model="qa", prompt="x", max_tokens=0)
    with pytest.raises(openai.AuthenticationError):
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key-0123456789", max_retries=0) as bad:
            bad.models.list()
    # another tenant sees none of acme's private tasks
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=GLOBEX, max_retries=0) as other:
        assert {m.id for m in other.models.list()} == {"default"}  # the bare model only
        with pytest.raises(openai.NotFoundError):
            other.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=2)


def test_chat_with_a_chat_prompt_task_equals_generate(server, oai):
    """The template is already a chat: the user's message is its input, not a chat nested in a chat."""
    question = "What is the capital of France?"
    r = oai.chat.completions.create(model="chatml", messages=[{"role": "user", "content": question}],
                                    max_tokens=8, temperature=0)
    expected = native(server, "chatml", question, 8)
    assert r.choices[0].message.content == expected["text"]
    assert r.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    # a system message or earlier turns have nowhere to go in a one-turn template: said, not dropped
    for messages in ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": question}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": question}]):
        with pytest.raises(openai.UnprocessableEntityError) as e:
            oai.chat.completions.create(model="terse", messages=messages, max_tokens=4)
        assert "exactly one user message" in e.value.body["message"]


def test_chat_with_a_soft_prompt_task_equals_generate(server, oai):
    r = oai.chat.completions.create(model="soft", messages=[{"role": "user", "content": "Name a color."}],
                                    max_tokens=5, temperature=0)
    expected = native(server, "soft", "Name a color.", 5)
    assert r.choices[0].message.content == expected["text"]
    assert r.usage.prompt_tokens == expected["usage"]["prompt_tokens"]  # the 3 virtual tokens included


def test_chat_with_a_plain_template_frames_the_message_inside_the_models_chat(server, oai):
    """`Q: {input}\nA:` frames the last user message; the model's chat template frames the conversation."""
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
    r = oai.chat.completions.create(model="qa", messages=messages, max_tokens=6, temperature=0)
    tokenizer = server.runtime.engine.engine.tokenizer
    rendered = tokenizer.apply_chat_template([messages[0], {"role": "user", "content": "Q: Say hi.\nA:"}],
                                             tokenize=False, add_generation_prompt=True)
    assert r.choices[0].message.content == native(server, "chat", rendered, 6)["text"]


def test_the_bare_model_is_served_as_default(server, oai):
    listed = {m.id: m for m in oai.models.list()}
    assert listed["default"].owned_by == "promptserve" and oai.models.retrieve("default").id == "default"
    r = oai.completions.create(model="default", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.choices[0].text == native(server, "chat", "The capital of France is", 5)["text"]  # chat: "{input}"
    messages = [{"role": "user", "content": "Say hi."}]
    r = oai.chat.completions.create(model="default", messages=messages, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == oai.chat.completions.create(
        model="chat", messages=messages, max_tokens=5, temperature=0).choices[0].message.content
    with server.client(ACME) as c:  # the name is taken while the bare model is served
        r = hard_task(c, "default")
        assert r.status_code == 422 and "bare model" in r.json()["error"]["message"]


def test_the_operator_can_turn_the_bare_model_off(server, oai):
    settings = server.runtime.settings
    settings.serve_base_model = False
    try:
        assert "default" not in {m.id for m in oai.models.list()}
        with pytest.raises(openai.NotFoundError):
            oai.completions.create(model="default", prompt="x", max_tokens=2)
    finally:
        settings.serve_base_model = True


def test_openai_routes_use_the_tasks_generation_defaults(server, oai):
    """Request fields win; fields left out take the task's defaults (greedy, 40 tokens, stop "."), then the server's."""
    question = "Why is the sky blue?"
    expected = native(server, "terse", question, None)  # /generate with the task's defaults
    # the task's stop "." ends it after more than OpenAI's 16 default tokens, so each default is visible
    assert expected["finish_reason"] == "stop" and expected["usage"]["completion_tokens"] > 16
    for _ in range(2):  # temperature 0 from the task: the same text every time
        r = oai.completions.create(model="terse", prompt=question)
        assert r.choices[0].text == expected["text"] and r.choices[0].finish_reason == "stop"
    r = oai.chat.completions.create(model="terse", messages=[{"role": "user", "content": question}])
    assert r.choices[0].message.content == expected["text"]
    r = oai.completions.create(model="terse", prompt=question, max_tokens=2)  # the request's own field wins
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"


def test_unsupported_fields_say_so(oai):
    for extra in ({"guided_grammar": 'root ::= "a"'}, {"structured_outputs": {"regex": "a"}}, {"best_of": 3}):
        with pytest.raises(openai.UnprocessableEntityError) as e:
            oai.completions.create(model="qa", prompt="x", max_tokens=2, extra_body=extra)
        assert "not supported" in e.value.body["message"]


def test_min_tokens_and_ignore_eos_on_every_route(server, oai):
    """The chatml task answers "The capital of France is Paris." and stops at end-of-sequence; with ignore_eos it
    runs to max_tokens on every route, and min_tokens holds the end back until that many tokens."""
    question = "What is the capital of France?"
    plain = native(server, "chatml", question, 24)
    assert plain["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] < 12
    short = plain["usage"]["completion_tokens"]
    fixed = native(server, "chatml", question, 12, ignore_eos=True)
    assert (fixed["finish_reason"], fixed["usage"]["completion_tokens"]) == ("length", 12)
    assert fixed["text"].startswith(plain["text"])
    held = native(server, "chatml", question, 24, min_tokens=short + 3)
    assert held["usage"]["completion_tokens"] >= short + 3
    extra = {"ignore_eos": True}
    c = oai.completions.create(model="chatml", prompt=question, max_tokens=12, temperature=0, extra_body=extra)
    assert (c.choices[0].finish_reason, c.usage.completion_tokens) == ("length", 12)
    ch = oai.chat.completions.create(model="chatml", messages=[{"role": "user", "content": question}], max_tokens=12,
                                     temperature=0, extra_body=extra)
    assert (ch.choices[0].finish_reason, ch.usage.completion_tokens) == ("length", 12)
    c = oai.completions.create(model="chatml", prompt=question, max_tokens=24, temperature=0,
                               extra_body={"min_tokens": short + 3})
    assert c.usage.completion_tokens >= short + 3
    with pytest.raises(openai.UnprocessableEntityError, match="min_tokens"):
        oai.completions.create(model="chatml", prompt=question, max_tokens=4, extra_body={"min_tokens": 5})

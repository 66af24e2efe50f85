"""The one sampling translation (server/api/schemas/sampling.py) and the bodies that use it: request fields over the
task's generation defaults over the route's, the server's cap on a left-out max_new_tokens, vLLM's guided_* names,
and a task's broken defaults refused as the user's to fix. No model: the bodies and the engine's plain types."""

from __future__ import annotations

import pytest

from server.api.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest, ResponseFormat
from server.api.schemas.sampling import CHAT, COMPLETIONS, MAX_SCHEMA_CHARS, NATIVE, Asked, constraint_of, logit_bias_of
from server.engine.request import DEFAULT_MAX_NEW_TOKENS, Constraint, InvalidRequest

TASK = {"max_new_tokens": 5, "temperature": 0.3, "top_p": 0.9, "top_k": 7, "stop": ["\n"],
        "response_format": {"type": "regex", "regex": "[a-z]+"}}


def test_each_route_falls_back_to_its_own_defaults():
    native = GenerateRequest(input="x").to_sampling({}, None)
    assert (native.max_new_tokens, native.temperature, native.top_p, native.top_k) == (DEFAULT_MAX_NEW_TOKENS, 0.0,
                                                                                         1.0, 0)
    completions = CompletionRequest(model="t", prompt="x").to_sampling({}, None)
    assert (completions.max_new_tokens, completions.temperature) == (16, 1.0)  # OpenAI's own
    chat = ChatCompletionRequest(model="t", messages=[{"role": "user", "content": "x"}]).to_sampling({}, None)
    assert (chat.max_new_tokens, chat.temperature) == (DEFAULT_MAX_NEW_TOKENS, 1.0)
    assert native.constraint is None and native.stop == () and native.logit_bias == ()


def test_the_request_wins_over_the_task_which_wins_over_the_route():
    task_only = GenerateRequest(input="x").to_sampling(TASK, None)
    assert (task_only.max_new_tokens, task_only.temperature, task_only.top_p, task_only.top_k) == (5, 0.3, 0.9, 7)
    assert task_only.stop == ("\n",) and task_only.constraint == Constraint("regex", "[a-z]+")
    asked = GenerateRequest(input="x", max_new_tokens=9, temperature=0.0, top_p=1.0, top_k=0, stop="END",
                            response_format={"type": "text"}).to_sampling(TASK, None)
    assert (asked.max_new_tokens, asked.temperature, asked.top_p, asked.top_k) == (9, 0.0, 1.0, 0)
    assert asked.stop == ("END",) and asked.constraint is None  # {"type": "text"} asks for free text


def test_the_cap_bounds_only_a_left_out_max_new_tokens():
    assert Asked().over({}, NATIVE, cap=10).max_new_tokens == 10
    assert Asked().over({}, COMPLETIONS, cap=10).max_new_tokens == 10 > Asked().over({}, CHAT, 8).max_new_tokens
    assert Asked(max_new_tokens=40).over({}, NATIVE, cap=10).max_new_tokens == 40  # the engine judges it
    assert Asked().over({"max_new_tokens": 30}, NATIVE, cap=10).max_new_tokens == 30


def test_openai_bodies_map_their_own_fields():
    score = CompletionRequest(model="t", prompt="x", max_tokens=0, echo=True).to_sampling({}, None)
    assert score.max_new_tokens == 1  # max_tokens 0 scores the prompt: one token nobody sees
    chat = ChatCompletionRequest(model="t", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                 max_completion_tokens=3, logit_bias={"12": 1.5, "3": -2}, seed=5)
    params = chat.to_sampling(TASK, None)
    assert params.max_new_tokens == 3 and params.logit_bias == ((3, -2.0), (12, 1.5)) and params.seed == 5
    assert params.top_k == 7  # not an OpenAI field: the task's


@pytest.mark.parametrize("fields, constraint", [
    ({"guided_regex": "a+"}, Constraint("regex", "a+")),
    ({"guided_choice": ["yes", "no"]}, Constraint("choice", '["yes","no"]')),
    ({"guided_json": '{"type": "object"}'}, Constraint("json_schema", '{"type":"object"}', True)),
    ({"guided_json": {"type": "object"}}, Constraint("json_schema", '{"type":"object"}', True)),
])
def test_vllm_guided_fields_are_response_formats(fields, constraint):
    assert CompletionRequest(model="t", prompt="x", **fields).to_sampling({}, None).constraint == constraint


@pytest.mark.parametrize("fields, message", [
    ({"guided_regex": "a", "guided_choice": ["a"]}, "at most one output constraint"),
    ({"guided_json": "{bad"}, "guided_json is not JSON"),
    ({"guided_json": "[1]"}, "must be a JSON schema object"),
    ({"logit_bias": {"abc": 1.0}}, "logit_bias keys must be token ids"),
])
def test_bad_openai_fields_are_422s(fields, message):
    with pytest.raises(InvalidRequest, match=message):
        CompletionRequest(model="t", prompt="x", **fields).to_sampling({}, None)


def test_a_tasks_broken_defaults_are_the_users_to_fix():
    with pytest.raises(InvalidRequest, match="the task's generation defaults are invalid"):
        GenerateRequest(input="x").to_sampling({"temperature": "hot"}, None)
    with pytest.raises(InvalidRequest, match="response_format is invalid"):
        GenerateRequest(input="x").to_sampling({"response_format": {"type": "xml"}}, None)


def test_constraints_from_the_wire_and_from_a_stored_task():
    assert constraint_of(None) is None and constraint_of({"type": "text"}) is None
    assert constraint_of(ResponseFormat(type="json_object")) == Constraint("json_object")
    stored = {"type": "json_schema", "json_schema": {"schema": {"type": "object"}, "strict": False}}
    assert constraint_of(stored) == Constraint("json_schema", '{"type":"object"}', False)
    huge = {"type": "json_schema", "json_schema": {"schema": {"enum": ["x" * MAX_SCHEMA_CHARS]}}}
    with pytest.raises(InvalidRequest, match=f"the limit is {MAX_SCHEMA_CHARS}"):
        constraint_of(huge)
    assert logit_bias_of(None) == () and logit_bias_of({" 7 ": 1}) == ((7, 1.0),)

"""Output constraints (server/engine/constraints.py): the builders from the wire shapes (pure Python), what the
grammar library refuses named in the request's own 422, and compiled grammars shared per constraint. How masks
apply in a batched step is test_logits_processors.py's."""

from __future__ import annotations

import json

import pytest

from server.engine import constraints as C
from server.engine.request import EngineRequest, InvalidRequest, SamplingParams
from tests.helpers import default_model, new_engine, prompt_ref
from tests.server.engine.test_logits_processors import CHAT, PERSON


def test_builders_keep_what_the_output_follows_and_refuse_empty_shapes():
    ordered = C.json_schema({"type": "object", "properties": {"b": {}, "a": {}}})
    assert ordered.value == '{"type":"object","properties":{"b":{},"a":{}}}'  # property order is output order
    assert ordered.strict and not C.json_schema({"type": "object"}, strict=False).strict
    assert C.choice(["yes", "no", "yes"]) == C.choice(["yes", "no"])  # duplicates collapse, order kept
    assert C.regex("[0-9]+") == C.Constraint("regex", "[0-9]+")
    for bad in (lambda: C.regex(""), lambda: C.choice(["a", ""]), lambda: C.json_schema([1])):
        with pytest.raises(InvalidRequest):
            bad()


def test_unenforced_keywords_are_found_only_where_a_schema_can_be():
    C.check_schema({"properties": {"not": {"type": "string"}, "if": {"type": "boolean"}}})
    with pytest.raises(InvalidRequest, match="'contains' at /?items/0"):
        C.check_schema({"items": [{"contains": {}}]})
    with pytest.raises(InvalidRequest, match="'if' at \\$defs/x"):
        C.check_schema({"$defs": {"x": {"if": {}}}})


def test_schemas_the_library_refuses_name_the_problem():
    engine = new_engine(default_model())
    with pytest.raises(InvalidRequest, match="Unsupported type"):
        engine.grammars.compile(C.json_schema({"type": "wat"}))
    with pytest.raises(InvalidRequest, match="nope"):
        engine.grammars.compile(C.json_schema({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}))
    with pytest.raises(InvalidRequest, match="parenthesis"):
        engine.grammars.compile(C.regex("(ab"))
    # keywords the library would accept but not enforce are refused, naming where they are
    tags = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                                      "uniqueItems": True}}}
    with pytest.raises(InvalidRequest, match="'uniqueItems' at properties/tags"):
        engine.grammars.compile(C.json_schema(tags))
    with pytest.raises(InvalidRequest, match="'not' at anyOf/1"):
        engine.grammars.compile(C.json_schema({"anyOf": [{"type": "string"}, {"not": {"type": "null"}}]}))
    with pytest.raises(InvalidRequest, match="'allOf'"):
        engine.grammars.compile(C.json_schema({"allOf": [PERSON, {"required": ["name"]}]}))
    named_not = {"type": "object", "properties": {"not": {"type": "boolean"}}, "required": ["not"]}
    engine.grammars.compile(C.json_schema(named_not))  # a property called "not" is no keyword
    with pytest.raises(InvalidRequest):
        C.choice([])
    deep = {"type": "string"}
    for _ in range(5000):  # deeper than Python's recursion limit: refused without recursing
        deep = {"type": "array", "items": deep}
    with pytest.raises(InvalidRequest, match="nests deeper than 64"):
        C.json_schema(deep)
    # a refused constraint is refused when the request is made, before it is queued
    ref = prompt_ref("chat@1", CHAT, None)
    with pytest.raises(InvalidRequest, match="regex"):
        engine.make_sequence(EngineRequest("r", ref, "x", sampling=SamplingParams(constraint=C.regex("[z-a]"))))
    assert not engine.has_work()


def test_compiled_grammars_are_shared():
    engine = new_engine(default_model())
    a = engine.grammars.compile(C.json_schema(dict(PERSON)))
    b = engine.grammars.compile(C.json_schema(json.loads(json.dumps(PERSON))))
    assert a is b and engine.grammars.compiles == 1

"""Constrained decoding: compile a request's constraint into a grammar once, and keep one matcher per sequence.

The grammar library is xgrammar (chosen by measurement against llguidance on the default model's 49k-token
vocabulary: a token mask in ~10 µs against ~200 µs; see docs/api.md). It is only touched here, in
`logits_processors.py` through `GrammarMatcher`, and nowhere in the scheduler.

Compiled grammars are shared: one cache per engine, keyed by the constraint's canonical text, so every request of a
task with a stored schema (and every request sending the same schema) reuses one compiled grammar. Compiling
happens in the caller's thread (`LLMEngine.make_sequence`, or a task upload), never in the engine loop, so a slow
schema delays only its own request, and a schema the library cannot compile is a 422 before it is queued.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from typing import Callable, Iterable

from .request import Constraint, InvalidRequest

MAX_CACHED = 512  # compiled grammars kept (least recently used go first)


class GrammarCache:
    """Constraint -> compiled grammar, for one tokenizer and vocabulary. Thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Iterable[int],
                 on_compile: Callable[[str, float], None] | None = None):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_ids = sorted(stop_ids)
        self.on_compile = on_compile  # (constraint kind, seconds): metrics
        self._compiler = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[Constraint, object] = OrderedDict()
        self.compiles = 0

    def _get_compiler(self):
        import xgrammar as xgr  # imported on first use: a server that never constrains never loads it

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def compile(self, c: Constraint):
        """The compiled grammar (cached). Raises InvalidRequest naming what the library refused."""
        with self._lock:
            hit = self._cache.get(c)
            if hit is not None:
                self._cache.move_to_end(c)
                return hit
            compiler = self._get_compiler()
        t0 = time.perf_counter()
        try:
            compiled = _compile(compiler, c)
        except InvalidRequest:
            raise
        except Exception as e:  # noqa: BLE001 - the library's own errors (RuntimeError, ValueError, ...)
            raise InvalidRequest(f"the {c.kind} constraint cannot be compiled: {_first_line(e)}") from None
        seconds = time.perf_counter() - t0
        if self.on_compile is not None:
            self.on_compile(c.kind, seconds)
        with self._lock:
            self.compiles += 1
            self._cache[c] = compiled
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, c: Constraint):
        """A fresh matcher for one sequence: it follows the tokens generated so far."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(c))


class MaskBuffer:
    """Fills the next-token bitmask of constrained rows and applies it to their logits in place (masked tokens to
    -inf), with the library's own kernels: a C++ loop on CPU, a GPU kernel on CUDA. The bitmask buffer is kept."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._bitmask = None

    def apply(self, logits, matchers: list, rows: list[int]) -> None:
        """logits [n, V]; matchers[j] masks row rows[j]."""
        import xgrammar as xgr

        n = logits.shape[0]
        if self._bitmask is None or self._bitmask.shape[0] < n:
            self._bitmask = xgr.allocate_token_bitmask(max(n, 8), self.vocab_size)
        bitmask = self._bitmask[:n]
        for m, r in zip(matchers, rows):
            m.fill_next_token_bitmask(bitmask, r)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                        vocab_size=min(self.vocab_size, logits.shape[-1]), indices=rows)


# Keywords xgrammar 0.2 accepts but does not enforce (a matcher accepts an instance that breaks them; allOf's
# later branches are dropped), so an output could break them: refused, never silently ignored.
UNENFORCED = ("allOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
              "uniqueItems", "contains", "minContains", "maxContains", "unevaluatedProperties", "unevaluatedItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "propertyNames", "additionalItems")


def check_schema(schema, where: str = "") -> None:
    """Refuse keywords the grammar would not enforce, naming where they are. Walks schema positions only, so a
    property that happens to be called "not" is fine."""
    if not isinstance(schema, dict):
        return
    for key in UNENFORCED:
        if key in schema:
            raise InvalidRequest(f"the json_schema constraint uses {key!r}{' at ' + where if where else ''}, which "
                                 f"constrained decoding cannot enforce; supported keywords are listed in docs/api.md")
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                check_schema(sub, f"{where}/{key}/{name}".lstrip("/"))
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                check_schema(sub, f"{where}/{key}/{i}".lstrip("/"))
    for key in _SUBSCHEMAS:
        sub = schema.get(key)
        for i, item in enumerate(sub) if isinstance(sub, list) else [(None, sub)]:
            check_schema(item, f"{where}/{key}" + (f"/{i}" if i is not None else ""))


def _compile(compiler, c: Constraint):
    if c.kind == "json_object":
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
    if c.kind == "json_schema":
        check_schema(json.loads(c.value))
        return compiler.compile_json_schema(c.value, any_whitespace=False, strict_mode=c.strict)
    if c.kind == "regex":
        return compiler.compile_regex(c.value)
    choices = json.loads(c.value)
    # EBNF string literals take JSON's escapes, so json.dumps quotes any choice (quotes, backslashes, newlines)
    return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(x, ensure_ascii=False) for x in choices))


_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[12:49:37] /project/cpp/file.cc:94: " before the library's message


def _first_line(e: BaseException) -> str:
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    return _LOCATION.sub("", text)[:500]


# ---- building constraints from the wire shapes (pure Python; the API and the task upload share these)

def canonical_json(obj) -> str:
    """Compact JSON; key order is kept, since a schema's property order is the order the output follows."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


MAX_SCHEMA_DEPTH = 64  # nested objects/arrays of a schema document


def _depth(obj) -> int:
    """Nesting depth of JSON containers, without recursion (a hostile schema may nest thousands deep)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, d)
            if deepest > MAX_SCHEMA_DEPTH:
                return deepest
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def json_schema(schema: dict, strict: bool = True) -> Constraint:
    if not isinstance(schema, dict):
        raise InvalidRequest(f"a JSON schema must be an object, got {type(schema).__name__}")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise InvalidRequest(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    return Constraint("json_schema", canonical_json(schema), bool(strict))


def regex(pattern: str) -> Constraint:
    if not isinstance(pattern, str) or not pattern:
        raise InvalidRequest("a regex constraint needs a non-empty pattern")
    return Constraint("regex", pattern)


def choice(choices: list[str]) -> Constraint:
    if not isinstance(choices, list) or not choices or not all(isinstance(x, str) and x for x in choices):
        raise InvalidRequest("a choice constraint needs a non-empty list of non-empty strings")
    return Constraint("choice", canonical_json(list(dict.fromkeys(choices))))

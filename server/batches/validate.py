"""A batch's input checked whole before any line runs: streamed, one line at a time, with line-numbered errors.

Each line must be `{custom_id, method: "POST", url, body}` with a url of the batch's endpoint and a body that the
live route's own pydantic model accepts, naming a model (task) the tenant can see; custom_ids are unique. What only
the route itself can refuse (a prompt over the token limit, a chat that a soft-prompt task cannot take) is not
guessed here: such a line runs, and the route's own 4xx lands in the error file.

Memory: the custom_ids are kept as 8-byte hashes in one array, sorted in place to find repeats (which a second pass
confirms on the ids themselves, so a hash collision is never reported), so checking a 100,000-line file holds
800 KB, not its ids.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import ValidationError

from server.api.errors import validation_message
from server.api.schemas import ChatCompletionRequest, ClassifyRequest, CompletionRequest, GenerateRequest

from .records import endpoint_of, task_of

BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
          "/v1/tasks/classify": ClassifyRequest, "/v1/tasks/generate": GenerateRequest}
MAX_ERRORS = 100
MAX_CUSTOM_ID = 512
# (kind, ref) -> None if the tenant may use it, else why not. kind: "model" (an OpenAI route's `model`, where
# `default` may be the bare model) or "task" (a native route's task id)
Visible = Callable[[str, str], "str | None"]


@dataclass
class Checked:
    total: int            # requests (blank lines not counted)
    errors: list[dict]    # OpenAI's BatchError: {code, message, param, line}; empty when the file is good


class LineProblem(ValueError):
    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


def _hash(custom_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class LineChecker:
    """One line at a time; remembers what it learned about each model so 100,000 lines ask the store once each."""

    def __init__(self, endpoint: str, visible: Visible):
        self.endpoint, self.visible = endpoint, visible
        self._seen: dict[tuple[str, str], str | None] = {}

    def _can_use(self, kind: str, ref: str, param: str) -> None:
        key = (kind, ref)
        if key not in self._seen:
            if len(self._seen) >= 4096:
                self._seen.clear()
            self._seen[key] = self.visible(kind, ref)
        if self._seen[key] is not None:
            raise LineProblem("model_not_found", self._seen[key], param)

    def check(self, raw: bytes) -> str:
        """The line's custom_id, or LineProblem."""
        try:
            line = json.loads(raw)
        except (ValueError, RecursionError) as e:
            why = (f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                   if isinstance(e, RecursionError) else "not UTF-8 text")
            raise LineProblem("invalid_json_line", f"not valid JSON ({why})") from None
        if not isinstance(line, dict):
            raise LineProblem("invalid_json_line", "expected a JSON object {custom_id, method, url, body}")
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
            raise LineProblem("invalid_custom_id", f"custom_id expected a string of 1 to {MAX_CUSTOM_ID} characters, "
                                                   f"found {_short(custom_id)}", "custom_id")
        if line.get("method") != "POST":
            raise LineProblem("invalid_method", f"method expected 'POST', found {_short(line.get('method'))}",
                              "method")
        url = line.get("url")
        endpoint = endpoint_of(url) if isinstance(url, str) else None
        if endpoint is None:
            raise LineProblem("invalid_url", f"url expected /v1/completions, /v1/chat/completions, "
                                             f"/v1/tasks/{{id}}/classify or /v1/tasks/{{id}}/generate, found "
                                             f"{_short(url)}", "url")
        if endpoint != self.endpoint:
            raise LineProblem("mismatched_endpoint", f"url {url!r} does not belong to the batch's endpoint "
                                                     f"{self.endpoint!r}", "url")
        body = line.get("body")
        if not isinstance(body, dict):
            raise LineProblem("invalid_request", f"body expected a JSON object, found {_short(body)}", "body")
        try:
            parsed = BODIES[endpoint].model_validate(body)
        except ValidationError as e:
            errors = [{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors()]
            first = ".".join(str(p) for p in errors[0]["loc"]) if errors else "body"
            raise LineProblem("invalid_request", validation_message(errors), first) from None
        if getattr(parsed, "stream", False):
            raise LineProblem("invalid_request", "body.stream: a batch's requests cannot stream; leave it out",
                              "body.stream")
        if endpoint in ("/v1/completions", "/v1/chat/completions"):
            self._can_use("model", parsed.model, "body.model")
        else:
            self._can_use("task", task_of(url), "url")
        return custom_id


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_file(path: Path, endpoint: str, visible: Visible, name: str = "input.jsonl",
               max_errors: int = MAX_ERRORS) -> Checked:
    """Every line of `path` (streamed); errors are `name:line: ...` with the line number in `line` too."""
    checker = LineChecker(endpoint, visible)
    hashes = array("Q")
    errors: list[dict] = []
    total = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            total += 1
            try:
                custom_id = checker.check(raw)
            except LineProblem as p:
                errors.append({"code": p.code, "message": f"{name}:{n}: {p}", "param": p.param, "line": n})
                if len(errors) >= max_errors:
                    errors.append({"code": "too_many_errors", "message": f"{name}: checking stopped after "
                                   f"{max_errors} errors", "param": None, "line": None})
                    return Checked(total, errors)
                continue
            hashes.append(_hash(custom_id))
    if not total:
        errors.append({"code": "empty_file", "message": f"{name}: no requests", "param": None, "line": None})
    errors.extend(_duplicates(path, name, hashes, max_errors - len(errors)))
    errors.sort(key=lambda e: e["line"] or 0)
    return Checked(total, errors)


def _duplicates(path: Path, name: str, hashes: array, room: int) -> list[dict]:
    """Lines whose custom_id an earlier line has. The hashes are sorted in place; a hash that repeats is confirmed
    on the ids themselves in a second pass (which a file without repeats never needs)."""
    if len(hashes) < 2:
        return []
    h = np.frombuffer(hashes, dtype=np.uint64)   # a view of the array: sorted in place, no copy
    h.sort()
    repeated = set(h[1:][h[1:] == h[:-1]].tolist())
    if not repeated:
        return []
    first: dict[str, int] = {}
    out: list[dict] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                custom_id = json.loads(raw)["custom_id"] if raw.strip() else None
            except (ValueError, KeyError, TypeError):
                continue
            if not isinstance(custom_id, str) or _hash(custom_id) not in repeated:
                continue
            if custom_id in first and len(out) < room:
                out.append({"code": "duplicate_custom_id", "message": f"{name}:{n}: custom_id {custom_id!r} is "
                            f"already on line {first[custom_id]}; each request needs its own", "param": "custom_id",
                            "line": n})
            first.setdefault(custom_id, n)
    return out

"""Checking a batch file: line numbers, duplicates found exactly (a hash collision is never an error), windows."""

from __future__ import annotations

import json

import pytest

from prompt_store.errors import InvalidPrompt
from server.batches import validate
from server.batches.records import endpoint_of, line_of, line_request_id, parse_window


def write(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def row(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/tasks/t/generate", "body": {"input": "x", **body}}


def visible(kind: str, ref: str) -> str | None:
    return None if ref == "t" else f"no task {ref!r}"


def test_duplicates_are_confirmed_on_the_ids_when_every_hash_collides(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "_hash", lambda custom_id: 7)   # every id hashes alike
    write(tmp_path / "b.jsonl", [row("a"), row("b"), "", row("c"), row("a"), row("b")])
    checked = validate.check_file(tmp_path / "b.jsonl", "/v1/tasks/generate", visible, "b.jsonl")
    assert checked.total == 5
    assert [(e["line"], e["code"], e["message"]) for e in checked.errors] == [
        (5, "duplicate_custom_id", "b.jsonl:5: custom_id 'a' is already on line 1; each request needs its own"),
        (6, "duplicate_custom_id", "b.jsonl:6: custom_id 'b' is already on line 2; each request needs its own")]


def test_a_good_file_has_no_errors_and_a_task_it_cannot_see_is_named(tmp_path):
    write(tmp_path / "b.jsonl", [row(f"r{i}", max_new_tokens=2) for i in range(50)])
    assert validate.check_file(tmp_path / "b.jsonl", "/v1/tasks/generate", visible).errors == []
    write(tmp_path / "c.jsonl", [row("a"), {**row("b"), "url": "/v1/tasks/other/generate"},
                                 row("c", max_new_tokens=0), {**row("d"), "body": []}])
    errors = validate.check_file(tmp_path / "c.jsonl", "/v1/tasks/generate", visible, "c.jsonl").errors
    assert [(e["line"], e["code"], e["param"]) for e in errors] == [
        (2, "model_not_found", "url"), (3, "invalid_request", "body.max_new_tokens"), (4, "invalid_request", "body")]
    assert errors[0]["message"] == "c.jsonl:2: no task 'other'"


def test_checking_stops_after_max_errors(tmp_path):
    write(tmp_path / "b.jsonl", ["nope"] * 30)
    errors = validate.check_file(tmp_path / "b.jsonl", "/v1/tasks/generate", visible, max_errors=5).errors
    assert [e["line"] for e in errors] == [1, 2, 3, 4, 5, None] and errors[-1]["code"] == "too_many_errors"


@pytest.mark.parametrize("text, seconds", [("24h", 86400), ("1h", 3600), ("10m", 600), ("60s", 60), ("1s", 1)])
def test_windows(text, seconds):
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["25h", "0s", "1d", "", "24 h", "1441m", None])
def test_bad_windows(text):
    with pytest.raises(InvalidPrompt, match="completion_window"):
        parse_window(text)


def test_urls_and_line_ids():
    assert endpoint_of("/v1/tasks/qa@2/classify") == "/v1/tasks/classify"
    assert endpoint_of("/v1/completions") == "/v1/completions"
    assert endpoint_of("/v1/tasks/a/b/generate") is None and endpoint_of("/v1/embeddings") is None
    assert line_of(line_request_id("batch_0123456789abcdef01234567", 4242)) == 4242
    assert line_of("cmpl-1") is None and line_of(None) is None

"""The HTTP contract is pinned: the app serves exactly the committed docs/openapi.json. A change that means to move
the contract regenerates the file with `python -m scripts.openapi` and commits it with the change."""

from __future__ import annotations

from scripts.openapi import SNAPSHOT, served


def test_openapi_is_the_committed_snapshot():
    assert SNAPSHOT.read_text() == served(), "the contract moved: run python -m scripts.openapi if you meant it"

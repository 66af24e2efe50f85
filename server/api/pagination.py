"""OpenAI's cursor pagination (`after`, `limit`, `has_more`), one helper for every list route."""

from __future__ import annotations

from .errors import ApiError


def page(items: list, after: str | None, limit: int) -> tuple[list, bool]:
    """Items newest first; `after` is the id of the last item of the previous page. Returns (page, has_more)."""
    if after is not None:
        ids = [x.id if hasattr(x, "id") else x["id"] for x in items]
        if after not in ids:
            raise ApiError(404, "not_found", f"no item {after!r} to list after")
        items = items[ids.index(after) + 1:]
    return items[:limit], len(items) > limit

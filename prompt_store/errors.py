"""Store errors, one class per HTTP status, so the API maps them to responses in one place.

All derive from ValueError-compatible `StoreError` so callers that only know "bad user input" still catch them.
"""

from __future__ import annotations


class StoreError(ValueError):
    """Base of every prompt-store error; `status` is the HTTP status the API should answer with."""
    status: int = 400


class InvalidPrompt(StoreError):
    """The upload or request is malformed; the message names what was expected and what was found."""
    status = 422


class TaskNotFound(StoreError):
    """No such task (or version) visible to this tenant; never says whether it exists for someone else."""
    status = 404


class PayloadTooLarge(StoreError):
    """A file or archive is over the configured size limits."""
    status = 413


class QuotaExceeded(StoreError):
    """The tenant already has its maximum number of tasks."""
    status = 429


class Forbidden(StoreError):
    """The tenant may see the task but not change it (only its owner or an admin may)."""
    status = 403


class StorageFull(StoreError):
    """The store's disk (or quota) is full: the server's problem, not the upload's; nothing was published."""
    status = 507


def is_disk_full(exc: BaseException) -> bool:
    import errno
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class CorruptArtifact(StoreError):
    """A stored file fails its checksum or cannot be parsed; only that task fails."""
    status = 500


HTTP_STATUS: dict[type[StoreError], int] = {
    cls: cls.status for cls in (StoreError, InvalidPrompt, TaskNotFound, PayloadTooLarge, QuotaExceeded, Forbidden,
                                StorageFull, CorruptArtifact)
}

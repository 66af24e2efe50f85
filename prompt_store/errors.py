"""Store errors, one class per HTTP status. Each class carries its status and error type: the API answers with
exactly these (server/api/errors.py reads them), so this file is the one table of what a store error means.

All derive from ValueError-compatible `StoreError` so callers that only know "bad user input" still catch them.
"""

from __future__ import annotations


class StoreError(ValueError):
    """Base of every prompt-store error; `status` and `type` are what the API answers with."""
    status: int = 400
    type: str = "invalid_request"


class InvalidPrompt(StoreError):
    """The upload or request is malformed; the message names what was expected and what was found."""
    status = 422
    type = "invalid_request"


class TaskNotFound(StoreError):
    """No such task (or version) visible to this tenant; never says whether it exists for someone else."""
    status = 404
    type = "not_found"


class PayloadTooLarge(StoreError):
    """A file or archive is over the configured size limits."""
    status = 413
    type = "payload_too_large"


class QuotaExceeded(StoreError):
    """The tenant already has its maximum number of tasks."""
    status = 429
    type = "quota_exceeded"


class Forbidden(StoreError):
    """The tenant may see the task but not change it (only its owner or an admin may)."""
    status = 403
    type = "forbidden"


class StorageFull(StoreError):
    """The store's disk (or quota) is full: the server's problem, not the upload's; nothing was published."""
    status = 507
    type = "insufficient_storage"


def is_disk_full(exc: BaseException) -> bool:
    import errno
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class CorruptArtifact(StoreError):
    """A stored file fails its checksum or cannot be parsed; only that task fails."""
    status = 500
    type = "corrupt_artifact"

"""What each domain error answers on the wire: store errors carry their own status and type (one table, in
prompt_store/errors.py), engine errors are mapped in server/api/errors.py."""

from __future__ import annotations

import pytest

from prompt_store.errors import (
    CorruptArtifact,
    Forbidden,
    InvalidPrompt,
    PayloadTooLarge,
    QuotaExceeded,
    StorageFull,
    StoreError,
    TaskNotFound,
)
from server.api.errors import ApiError, status_of
from server.engine.request import EngineOverloaded, EngineStopped, InputTooLong, InvalidRequest
from training.files import FileNotFound
from training.jobs import JobNotFound


@pytest.mark.parametrize("exc, expected", [
    (TaskNotFound("x"), (404, "not_found")), (FileNotFound("x"), (404, "not_found")),
    (JobNotFound("x"), (404, "not_found")), (Forbidden("x"), (403, "forbidden")),
    (PayloadTooLarge("x"), (413, "payload_too_large")), (QuotaExceeded("x"), (429, "quota_exceeded")),
    (InvalidPrompt("x"), (422, "invalid_request")), (StorageFull("x"), (507, "insufficient_storage")),
    (CorruptArtifact("x"), (500, "corrupt_artifact")), (StoreError("x"), (400, "invalid_request")),
    (InputTooLong("x"), (413, "input_too_long")), (InvalidRequest("x"), (422, "invalid_request")),
    (EngineOverloaded("x"), (503, "overloaded")), (EngineStopped("x"), (503, "unavailable")),
    (ApiError(429, "rate_limited", "x"), (429, "rate_limited")), (RuntimeError("x"), (500, "internal")),
])
def test_status_and_type_of_each_domain_error(exc, expected):
    assert status_of(exc) == expected

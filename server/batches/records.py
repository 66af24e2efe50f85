"""A batch's record (OpenAI's Batch object, plus the lease), the files in its directory, windows and line ids."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

from prompt_store.errors import InvalidPrompt, TaskNotFound

BATCH_NAME = "batch.json"
INPUT_NAME = "input.jsonl"      # the batch's own link to its input file: deleting the file never breaks a resume
OUTPUT_NAME = "output.jsonl"    # appended as lines succeed (2xx), published as a batch_output file at the end
ERRORS_NAME = "errors.jsonl"    # appended as lines fail, and every unrun line of an expired batch

STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")   # counted against the tenant's quota
TERMINAL = ("completed", "failed", "expired", "cancelled")
# what a batch's `endpoint` may be; the two task endpoints take lines for any task: /v1/tasks/{id}/classify
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/tasks/classify", "/v1/tasks/generate")
TASK_URL = re.compile(r"^/v1/tasks/([A-Za-z0-9._~@-]{1,270})/(classify|generate)$")
WINDOW = re.compile(r"^([1-9][0-9]{0,5})(s|m|h)$")
MAX_WINDOW_S = 24 * 3600


class BatchNotFound(TaskNotFound):
    """No such batch for this tenant (404); another tenant's batch reads exactly like a missing one."""


@dataclass
class BatchRecord:
    id: str
    tenant: str
    admin: bool                       # the creator's rights: lines see the tasks it could see
    open: bool                        # created in open mode (no auth file)
    endpoint: str
    input_file_id: str
    completion_window: str
    expires_at: int
    output_file: str                  # ids fixed at creation, so publishing after a crash is idempotent
    error_file: str
    metadata: dict | None = None
    status: str = "validating"
    created_at: int = field(default_factory=lambda: int(time.time()))
    created: float = field(default_factory=time.time)   # order within a second: lists and claims go by it
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None  # set once published (null while running, and when no line went there)
    error_file_id: str | None = None
    errors: list[dict] | None = None   # validation errors, OpenAI's {code, message, param, line}
    total: int = 0
    completed: int = 0
    failed: int = 0
    ending: str | None = None          # the terminal status it is publishing its files for (a resume finishes it)
    cancel_requested: bool = False
    base_model: str | None = None      # embedding sha256 of the model it runs on: only such a runner claims it
    attempts: int = 0
    lease_owner: str | None = None
    lease_until: float = 0.0


def parse_window(text: str) -> int:
    """OpenAI's "24h", or a shorter window for tests and short jobs: "60s", "10m", "1h" (at most 24 h)."""
    m = WINDOW.match(text) if isinstance(text, str) else None
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)] if m else 0
    if not m or seconds > MAX_WINDOW_S:
        raise InvalidPrompt(f"completion_window expected a duration of at most 24h such as '24h', '1h', '10m' or "
                            f"'60s', found {text!r}")
    return seconds


def endpoint_of(url: str) -> str | None:
    """The batch endpoint a line's url belongs to (/v1/tasks/{id}/classify -> /v1/tasks/classify), or None."""
    if url in ("/v1/completions", "/v1/chat/completions"):
        return url
    m = TASK_URL.match(url)
    return f"/v1/tasks/{m.group(2)}" if m else None


def task_of(url: str) -> str | None:
    m = TASK_URL.match(url)
    return m.group(1) if m else None


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex[:24]}"


def line_request_id(batch_id: str, line: int) -> str:
    """An output line's `id` holds its input line number, so a resume knows which lines are done without a map
    from custom_id to line (memory per line would grow with the file)."""
    return f"batch_req_{batch_id.removeprefix('batch_')[:12]}_{line}"


def line_of(request_id: object) -> int | None:
    if not isinstance(request_id, str) or not request_id.startswith("batch_req_"):
        return None
    tail = request_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None

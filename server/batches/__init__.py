"""Batches (OpenAI's Batch API) on the resident model: durable, run from idle capacity, private to the tenant.

Layout: ROOT/batches/<batch-id>/
    batch.json      the record (OpenAI's fields and states, the lease); replaced atomically under ROOT/batches/.lock
    input.jsonl     the batch's own link to its input file (purpose `batch`), so deleting the file breaks nothing
    output.jsonl    answers of lines that succeeded, appended and fsynced as they finish
    errors.jsonl    answers of lines that failed (the route's own status and body), and expired lines
At the end both are published as files of purpose `batch_output` (ROOT/files/, hard links, ids fixed at creation).

Files (each one job):
    records.py   BatchRecord, the states, windows, endpoints, line ids (they hold the input line number)
    store.py     BatchStore: records, claiming under a lease (the fine-tuning job store's approach)
    validate.py  the whole input checked first, streamed, with line-numbered errors
    executor.py  a line through the app itself, in-process, as the batch's tenant (byte-identical answers)
    gate.py      when a line may start: idle capacity, `--batch-share` while interactive traffic is present
    output.py    durable appends, and what a resume reads back (a torn last line cut off)
    run.py       one batch: validate, resume, feed, write, expire, cancel, finish
    runner.py    BatchRunner: its own thread and event loop, claims batches, bounds lines in flight
    service.py   in a server or worker: open the store and runner; create and cancel (quotas)
The routes are server/api/routes/batches.py; `python -m server.batch_worker` runs batches without a server.
"""

from __future__ import annotations

from .records import ACTIVE, ENDPOINTS, STATUSES, TERMINAL, BatchNotFound, BatchRecord, parse_window
from .runner import BatchRunner, BatchRunnerConfig
from .store import BatchStore

__all__ = ["ACTIVE", "ENDPOINTS", "STATUSES", "TERMINAL", "BatchNotFound", "BatchRecord", "BatchRunner",
           "BatchStore", "BatchRunnerConfig", "parse_window"]

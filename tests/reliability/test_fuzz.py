"""The CI-sized fuzz: scripts/fuzz_api.py's schemathesis run (positive, negative and aimed at real tasks) over every
operation in the live /openapi.json, with a bearer key. No 5xx, no response that breaks the schema or the error shape,
no dropped connection. The full run (1,000+ requests) is `python -m scripts.fuzz_api`; see docs/reliability.md.
"""

from __future__ import annotations

from scripts import fuzz_api

from .conftest import ACME, live_server


def fine_tuning(label: str) -> bool:
    """The files, fine-tuning and batch routes: they take no model time at the request."""
    return "/v1/files" in label or "/v1/fine_tuning" in label or "/v1/batches" in label


def test_fuzz_every_operation_no_5xx_no_schema_violation(tmp_path):
    with live_server(tmp_path, max_new_tokens=64, max_input_tokens=256) as server:
        fuzz_api.seed_tasks(server.url, ACME)
        report = fuzz_api.run_fuzz(server.url, ACME, examples=5, seed=0, time_budget_s=100, request_timeout_s=120,
                                   only=lambda label: not fine_tuning(label))
        server.wait_idle(timeout_s=60)
    print(report.summary())
    assert report.server_errors == 0 and report.schema_violations == 0 and report.count("transport") == 0, \
        report.summary()
    operations = {op for op in report.by_operation}
    assert len(operations) == 15, operations  # every endpoint was reached
    assert report.requests >= 150, report.summary()
    assert sum(c[200] + c[201] + c[204] for c in report.by_operation.values()) >= 30  # not only refusals


def test_fuzz_files_and_fine_tuning_operations(tmp_path):
    """The files, fine-tuning and batch routes on their own budget (they take no model time: ids that do not exist
    are 404s, bodies that do not validate 422s)."""
    with live_server(tmp_path, training_runner=False, batch_runner=False) as server:
        report = fuzz_api.run_fuzz(server.url, ACME, examples=4, seed=0, time_budget_s=60, request_timeout_s=60,
                               only=fine_tuning)
    print(report.summary())
    assert report.server_errors == 0 and report.schema_violations == 0 and report.count("transport") == 0, \
        report.summary()
    assert len(report.by_operation) == 15, sorted(report.by_operation)

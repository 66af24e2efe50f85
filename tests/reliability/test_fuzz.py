"""The CI-sized fuzz: scripts/fuzz_api.py's schemathesis run (positive, negative and aimed at real tasks) over every
operation in the live /openapi.json, with a bearer key. No 5xx, no response that breaks the schema or the error shape,
no dropped connection. The full run (1,000+ requests) is `python scripts/fuzz_api.py`; see docs/reliability.md.
"""

from __future__ import annotations

import importlib.util
import sys

from .conftest import ACME, REPO, live_server


def load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_api", REPO / "scripts" / "fuzz_api.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_api"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fine_tuning(label: str) -> bool:
    """The files, fine-tuning and batch routes: they take no model time at the request."""
    return "/v1/files" in label or "/v1/fine_tuning" in label or "/v1/batches" in label


def test_fuzz_every_operation_no_5xx_no_schema_violation(tmp_path):
    fuzz = load_fuzzer()
    with live_server(tmp_path, max_new_tokens=64, max_input_tokens=256) as server:
        fuzz.seed_tasks(server.url, ACME)
        report = fuzz.run_fuzz(server.url, ACME, examples=5, seed=0, time_budget_s=100, request_timeout_s=120,
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
    fuzz = load_fuzzer()
    with live_server(tmp_path, training_runner=False, batch_runner=False) as server:
        report = fuzz.run_fuzz(server.url, ACME, examples=4, seed=0, time_budget_s=60, request_timeout_s=60,
                               only=fine_tuning)
    print(report.summary())
    assert report.server_errors == 0 and report.schema_violations == 0 and report.count("transport") == 0, \
        report.summary()
    assert len(report.by_operation) == 15, sorted(report.by_operation)

"""The batch runner without a model or a server: stores on a tmp directory, and executors that answer at once."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from pathlib import Path

import pytest

from server.auth import Principal
from server.batches import BatchRunner, BatchRunnerConfig, BatchStore
from server.batches.executor import Answer
from server.batches.service import create_batch
from training.files import FileLimits, FileStore

ACME = Principal(tenant="acme")


class Stub:
    """An executor that answers every line at once (200, the prompt reversed) and counts lines in flight."""

    def __init__(self, delay_s: float = 0.0, keep: bool = True):
        self.delay_s, self.keep, self.now, self.peak, self.calls, self.started = delay_s, keep, 0, 0, 0, 0
        self.prompts: list[str] = []   # (kept only when asked: the memory test must not grow its own list)

    async def __call__(self, url: str, body: dict) -> Answer:
        self.now += 1
        self.started += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(self.delay_s)
            self.calls += 1
            if self.keep:
                self.prompts.append(body["prompt"])
            return Answer(200, {"id": f"cmpl-{self.calls}", "text": body["prompt"][::-1]}, None)
        finally:
            self.now -= 1

    async def aclose(self) -> None:
        return None


class Rig:
    def __init__(self, root: Path):
        self.root = root
        self.batches = BatchStore(root, fsync=False)
        self.files = FileStore(root, FileLimits(max_file_bytes=1 << 30, max_tenant_bytes=1 << 32), fsync=False)
        self.runners: list[BatchRunner] = []
        self.outcomes: collections.Counter = collections.Counter()   # what the runners reported per line

    def file(self, n: int, name: str = "b.jsonl") -> str:
        """A batch file of n completions lines, written to disk and streamed into the file store."""
        path = self.root / name
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                    "body": {"model": "qa", "prompt": f"item number {i} of the batch",
                                             "max_tokens": 4}}) + "\n")
        with open(path, "rb") as f:
            return self.files.create_stream("acme", name, "batch", f).id

    def batch(self, file_id: str, window: str = "24h"):
        return create_batch(self.batches, self.files, ACME, input_file_id=file_id, endpoint="/v1/completions",
                            completion_window=window, metadata=None, max_active=100, max_lines=10**6,
                            base_model=None)

    def runner(self, stub: Stub, **config) -> BatchRunner:
        cfg = {"max_in_flight": 8, "fsync": False, "poll_s": 0.05, "sync_s": 0.1, "tick_s": 0.01, **config}
        r = BatchRunner(self.batches, self.files, executor_for=lambda rec: stub,
                        visible_for=lambda rec: (lambda kind, ref: None), config=BatchRunnerConfig(**cfg),
                        on_line=lambda outcome: self.outcomes.update([outcome]))
        self.runners.append(r)
        return r

    def wait(self, batch_id: str, until=("completed", "failed", "expired", "cancelled"), timeout_s: float = 120,
             **counts):
        deadline = time.monotonic() + timeout_s
        while True:
            rec = self.batches.get(batch_id)
            if rec.status in until and all(getattr(rec, k) >= v for k, v in counts.items()):
                return rec
            assert time.monotonic() < deadline, f"{batch_id} still {rec.status} after {timeout_s} s"
            time.sleep(0.02)

    def lines(self, file_id: str | None) -> list[dict]:
        if file_id is None:
            return []
        rec = self.files.get(file_id, "acme")
        return [json.loads(x) for x in self.files.path(rec).read_text().splitlines()]


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        for runner in r.runners:
            runner.stop(timeout_s=30)

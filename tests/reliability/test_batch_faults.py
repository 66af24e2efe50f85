"""kill -9 of a real `python -m server` in the middle of a batch, then a restart on the same store.

The batch resumes where it stopped: the lines answered before the kill are kept as they were (not run again), a
torn last line (a write cut by the kill) is cut off and its request runs again, no request is in the output twice,
none is missing, and the output equals an uninterrupted run of the same file (greedy).
"""

from __future__ import annotations

import json
import time

from tests.server.api.batching import jsonl, line, save_tiny_model, stable

from .conftest import ServerProcess

N = 80


def wait_status(c, batch_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        b = c.get(f"/v1/batches/{batch_id}").json()
        if b["status"] in ("completed", "failed", "expired", "cancelled"):
            return b
        assert time.monotonic() < deadline, b
        time.sleep(0.2)


def output(c, b: dict) -> dict[str, dict]:
    rows = [json.loads(x) for x in c.get(f"/v1/files/{b['output_file_id']}/content").text.splitlines()]
    out = {r["custom_id"]: r for r in rows}
    assert len(out) == len(rows), "a request is in the output twice"
    return out


def test_kill_9_mid_batch_then_restart_resumes_without_duplicates_or_losses(tmp_path):
    tiny = save_tiny_model(tmp_path / "tiny")
    store = tmp_path / "store"
    args = ("--model", str(tiny), "--threads", "1", "--batch-max-in-flight", "1", "--no-self-check")
    rows = [line(f"r{i}", "/v1/completions", {"model": "qa", "prompt": f"line {i}:", "max_tokens": 24,
                                              "ignore_eos": True, "temperature": 0}) for i in range(N)]
    srv = ServerProcess(store, *args)
    try:
        with srv.client() as c:
            assert c.post("/v1/tasks", json={"task_id": "qa", "kind": "hard", "template": "Q: {input}\nA:"}
                          ).status_code == 201
            f = c.post("/v1/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", jsonl(rows))}).json()
            b = c.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/completions",
                                            "completion_window": "1h"}).json()
        path = store / "batches" / b["id"] / "output.jsonl"
        deadline = time.monotonic() + 120
        while not path.exists() or path.read_bytes().count(b"\n") < 5:
            assert time.monotonic() < deadline and srv.proc.poll() is None, "no line was answered"
            time.sleep(0.02)
        srv.proc.kill()
        srv.proc.wait(timeout=30)
    finally:
        srv.close()
    before = path.read_bytes()
    kept = [json.loads(x) for x in before.splitlines() if x.strip()]
    assert 5 <= len(kept) < N, "the batch ended before the kill: make its lines longer"
    with open(path, "ab") as out:  # as a kill in the middle of a write leaves it
        out.write(b'{"id": "batch_req_x", "custom_id": "r')

    srv = ServerProcess(store, *args)
    try:
        with srv.client() as c:
            done = wait_status(c, b["id"])
            assert done["status"] == "completed" and done["request_counts"] == {"total": N, "completed": N,
                                                                                "failed": 0}, done
            resumed = output(c, done)
            assert set(resumed) == {r["custom_id"] for r in rows}
            for row in kept:  # answered before the kill: kept, not run again (a rerun has a new request id)
                assert resumed[row["custom_id"]] == row
            again = c.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/completions",
                                                "completion_window": "1h"}).json()
            uninterrupted = output(c, wait_status(c, again["id"]))
        assert {k: stable(v["response"]["body"]) for k, v in resumed.items()} == \
            {k: stable(v["response"]["body"]) for k, v in uninterrupted.items()}
        record = json.loads((store / "batches" / b["id"] / "batch.json").read_text())
        assert record["attempts"] == 2 and not (store / "batches" / b["id"] / "output.jsonl").exists()
    finally:
        srv.close()

"""The batch runner on its own (no model, no HTTP): memory that does not grow with the file, the bound on lines in
flight, resuming after a stop or a crash without a line twice or a line lost, and a runner that lost its lease."""

from __future__ import annotations

import json
import time
import tracemalloc

from server.batches.gate import Gate, IdleCapacity
from server.batches.output import LineSet
from server.batches.records import ERRORS_NAME, OUTPUT_NAME, line_request_id
from server.engine.async_engine import EngineStats

from .conftest import Stub


def run_measured(rig, n: int) -> tuple[int, object, Stub]:
    """Peak traced memory (bytes) while a runner validates and runs an n-line batch; the finished record."""
    file_id = rig.file(n, name=f"b{n}.jsonl")
    stub = Stub(keep=False)
    runner = rig.runner(stub)
    tracemalloc.start()
    try:
        runner.start()
        rec = rig.wait(rig.batch(file_id).id)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        runner.stop()
    assert runner.peak_in_flight <= 8 and stub.peak <= 8
    return peak, rec, stub


def test_a_20000_line_batch_costs_the_memory_of_a_2000_line_one(rig):
    """The input is streamed twice (checked, then run) and at most 8 lines are in flight: the peak is set by the
    bound, not the file (what grows with it: 8 bytes a line to find duplicate custom_ids, and a bit to know which
    lines are done)."""
    small, rec_small, _ = run_measured(rig, 2_000)
    big, rec, stub = run_measured(rig, 20_000)
    size = rig.files.get(rec.input_file_id, "acme").bytes
    assert rec.status == "completed" and rec.completed == 20_000 and rec_small.completed == 2_000
    assert stub.calls == 20_000 and stub.peak == 8      # the bound was reached, never passed
    assert big - small < 10 * 18_000 + (64 << 10), (small, big)  # the hashes (and their sort), plus noise
    assert big < size / 4, (big, size)                          # far below the file (2.3 MB here)
    out = rig.lines(rec.output_file_id)
    assert len(out) == 20_000 and len({o["custom_id"] for o in out}) == 20_000


def test_a_resume_skips_what_the_files_hold_and_cuts_a_torn_line(rig):
    """A crash left 10 answers, 1 error and half of a line: the next runner runs the other 19 lines only."""
    file_id = rig.file(30)
    b = rig.batch(file_id)
    d = rig.batches.batch_dir(b.id)
    done = [{"id": line_request_id(b.id, n), "custom_id": f"r{n - 1}",
             "response": {"status_code": 200, "request_id": "x", "body": {"text": "earlier"}}, "error": None}
            for n in range(1, 11)]
    failed = {"id": line_request_id(b.id, 11), "custom_id": "r10", "response": {"status_code": 422, "body": {}},
              "error": {"code": "invalid_request", "message": "no"}}
    (d / OUTPUT_NAME).write_text("".join(json.dumps(x) + "\n" for x in done) + '{"id": "batch_req_')
    (d / ERRORS_NAME).write_text(json.dumps(failed) + "\n")

    def crashed(r):  # as a killed runner leaves it: in progress, held by a process that is gone
        r.status, r.in_progress_at, r.total = "in_progress", int(time.time()), 30
        r.lease_owner, r.lease_until = "elsewhere:1:dead", time.time() - 1
    rig.batches.update(b.id, crashed)
    stub = Stub()
    rig.runner(stub).start()
    rec = rig.wait(b.id)
    assert rec.status == "completed" and (rec.completed, rec.failed) == (29, 1) and rec.attempts == 1
    assert sorted(stub.prompts) == sorted(f"item number {i} of the batch" for i in range(11, 30))
    out = rig.lines(rec.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"r{i}" for i in range(30) if i != 10)
    assert [e["custom_id"] for e in rig.lines(rec.error_file_id)] == ["r10"]


class Held(Gate):
    def __init__(self, n: int):
        self.n = n

    def open(self) -> bool:
        if self.n > 0:
            self.n -= 1
            return True
        return False


def test_a_stopped_runner_releases_and_another_resumes_where_it_stopped(rig):
    file_id = rig.file(25)
    b = rig.batch(file_id)
    first, second = Stub(), Stub()
    a = rig.runner(first)
    a.gate = Held(7)
    a.start()
    rig.wait(b.id, until=("in_progress",), completed=7)
    a.stop()
    rec = rig.batches.get(b.id)
    assert rec.status == "in_progress" and rec.lease_owner is None and rec.completed == 7
    rig.runner(second).start()
    rec = rig.wait(b.id)
    assert rec.status == "completed" and rec.completed == 25 and rec.attempts == 2
    assert len(first.prompts) == 7 and len(second.prompts) == 18
    assert not set(first.prompts) & set(second.prompts)
    assert len({o["custom_id"] for o in rig.lines(rec.output_file_id)}) == 25


def test_a_runner_that_lost_its_lease_writes_nothing_more(rig):
    b = rig.batch(rig.file(200))
    stub = Stub(delay_s=0.02)
    runner = rig.runner(stub, max_in_flight=2)
    runner.start()
    rig.wait(b.id, until=("in_progress",), completed=5)

    def taken(r):  # another runner presumed this one dead and claimed the batch
        r.lease_owner, r.lease_until = "elsewhere:1:alive", time.time() + 600
    rig.batches.update(b.id, taken)
    deadline = time.monotonic() + 30
    while runner.running:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    path = rig.batches.batch_dir(b.id) / OUTPUT_NAME
    lines = path.read_text().count("\n")
    time.sleep(0.3)  # the runner is gone: nothing may still be appending
    assert path.read_text().count("\n") == lines < 200
    rec = rig.batches.get(b.id)
    assert rec.status == "in_progress" and rec.lease_owner == "elsewhere:1:alive"


def test_the_gate_gives_batches_idle_capacity_and_a_share_while_interactive_traffic_runs():
    class Work:
        interactive = batch = 0
        interactive_at = float("-inf")

    class Engine:
        waiting = 0

        def stats(self):
            return EngineStats(running=0, waiting=self.waiting, in_flight=0, steps=0, loop_alive=True)

    work, engine = Work(), Engine()
    gate = IdleCapacity(work, lambda: engine, share=0.25, max_batch_size=16)   # 4 rows while interactive runs
    work.batch = 12
    assert gate.open()                                   # idle: the runner's own bound is the only limit
    work.interactive = 1
    assert not gate.open()                               # 12 batch rows: over the share
    work.batch = 3
    assert gate.open()
    engine.waiting = 1
    assert not gate.open()                               # someone waits for a row: no new batch line
    assert not IdleCapacity(work, engine, share=0.0, max_batch_size=16).open()
    engine.waiting, work.interactive = 0, 0
    work.interactive_at = time.monotonic()                # the last interactive request just ended
    quiet = IdleCapacity(work, engine, share=0.0, max_batch_size=16, quiet_s=1.0)
    assert not quiet.open()                               # a quiet second first
    work.interactive_at -= 1.0
    assert quiet.open()


def test_lineset():
    s = LineSet()
    for n in (1, 8, 9, 100_000):
        s.add(n)
    assert [n for n in range(100_002) if n in s] == [1, 8, 9, 100_000] and len(s.bits) < 20_000

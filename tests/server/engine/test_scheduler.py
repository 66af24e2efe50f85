"""The scheduler: the step's token budget (decoding rows, prompt chunks, admissions), admission by rows and blocks,
preemption by memory, fairness and priority, token-fair sharing between tenants, prefix sharing within a step."""

from __future__ import annotations

from prompt_core.layout import RowPlan
from prompt_core.spec import PromptKind, PromptSpec
from server.engine.block_manager import BlockManager, GroupSpec
from server.engine.request import EngineRequest, PromptRef, SamplingParams, Sequence, Status
from server.engine.scheduler import Scheduler, SchedulerConfig

REF = PromptRef("t@1", PromptSpec(PromptKind.HARD))


def seq(i: int, tenant: str = "a", tokens: int = 10, priority: str = "interactive", new: int = 64,
        ids: list[int] | None = None) -> Sequence:
    ids = ids if ids is not None else [1] * tokens
    return Sequence(EngineRequest(f"{tenant}{i}", REF, "x", tenant=tenant, priority=priority,
                                  sampling=SamplingParams(max_new_tokens=new)),
                    RowPlan(ids=list(ids), virt=[-1] * len(ids)))


def run_step(s: Scheduler, tokens: dict[str, int] | None = None):
    """Schedule, then account for what ran as the engine does: queries computed; a completed row gets a token."""
    out = s.schedule()
    for item in out.scheduled:
        s.advance(item.seq, item.count)
        if item.completes:
            item.seq.output_ids.append((tokens or {}).get(item.seq.request_id, 7))
    return out


def test_batch_rows_limit_admission():
    s = Scheduler(SchedulerConfig(max_batch_size=3, max_prefill_tokens=1000))
    for i in range(5):
        s.add(seq(i))
    first = s.schedule().admitted
    assert [q.request_id for q in first] == ["a0", "a1", "a2"]
    assert all(q.status is Status.RUNNING for q in first)
    assert s.schedule().admitted == []                  # the batch is full
    s.finish(first[:2])
    assert [q.request_id for q in s.schedule().admitted] == ["a3", "a4"]


def test_the_token_budget_chunks_long_prompts_and_decoding_rows_go_first():
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_prefill_tokens=16))
    short, long = seq(0, tokens=6), seq(1, tokens=40)
    s.add(short)
    s.add(long)
    out = run_step(s)
    assert [(x.seq.request_id, x.start, x.count) for x in out.scheduled] == [("a0", 0, 6), ("a1", 0, 10)]
    out = run_step(s)                                   # a0 decodes (one token), a1 gets the other 15
    assert [(x.seq.request_id, x.start, x.count) for x in out.scheduled] == [("a0", 6, 1), ("a1", 10, 15)]
    out = run_step(s)
    assert [(x.seq.request_id, x.start, x.count) for x in out.scheduled] == [("a0", 7, 1), ("a1", 25, 15)]
    assert out.scheduled[1].completes and long.output_ids == [7]   # its prefill done: it sampled a token


def test_an_oversized_request_still_progresses_alone():
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_prefill_tokens=5))
    s.add(seq(0, tokens=50))
    counts = [sum(x.count for x in run_step(s).scheduled) for _ in range(10)]
    assert counts == [5] * 10 and s.running[0].output_ids == [7]


def test_a_classify_prompt_keeps_its_last_token_with_its_label_tokens():
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_prefill_tokens=8))
    c = Sequence(EngineRequest("c", REF, "x", mode="classify"),
                 RowPlan(ids=[1] * 10, virt=[-1] * 10, labels=[[5, 6, 7], [8, 9]]))   # 3 label queries
    s.add(c)
    assert [(x.start, x.count) for x in s.schedule().scheduled] == [(0, 8)]
    s.advance(c, 8)                                     # 5 left: the prompt's last two tokens and 3 label tokens
    assert [(x.start, x.count, x.completes) for x in s.schedule().scheduled] == [(8, 5, True)]
    d = Sequence(EngineRequest("d", REF, "x", mode="classify"),
                 RowPlan(ids=[1] * 6, virt=[-1] * 6, labels=[[5, 6, 7], [8, 9]]))   # 9 queries, 4 in the tail
    s.add(d)
    s.finish([c])
    assert [(x.start, x.count) for x in s.schedule().scheduled] == [(0, 5)]   # not 8: that would split the tail


def test_admission_waits_for_blocks_and_growth_preempts_the_latest_admitted():
    blocks = BlockManager([GroupSpec(6, None, ())], 16, prefix_caching=False, watermark=0.0)
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_prefill_tokens=1000), blocks)
    a, b, c = seq(0, tokens=32), seq(1, tokens=32), seq(2, tokens=32)
    for q in (a, b, c):
        s.add(q)
    out = run_step(s)
    assert out.admitted == [a, b, c] and blocks.pools[0].num_free == 0   # two blocks each
    out = run_step(s)                                   # each needs a third block for its next token: none free
    assert [(q.request_id, r) for q, r in out.preempted] == [("a2", "memory")]
    assert [x.seq for x in out.scheduled] == [a, b] and c.status is Status.WAITING and c.computed == 0
    assert s.waiting["a"][0] is c and c.output_ids == [7]        # it resumes with what it had generated
    assert s.preemptions == {"memory": 1}


def test_batch_work_is_admitted_after_interactive_and_preempted_first():
    s = Scheduler(SchedulerConfig(max_batch_size=2, max_prefill_tokens=1000, batch_rows=1))
    bulk = [seq(i, "b", priority="batch") for i in range(3)]
    for q in bulk:
        s.add(q)
    s.add(seq(0, "i"))
    assert [q.request_id for q in s.schedule().admitted] == ["i0", "b0"]
    s.add(seq(1, "i"))
    out = s.schedule()                                   # full: the batch row gives way to the interactive one
    assert [(q.request_id, r) for q, r in out.preempted] == [("b0", "priority")]
    assert [q.request_id for q in out.admitted] == ["i1"]


def test_batch_rows_pause_in_place_while_interactive_work_runs_and_resume_after():
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_prefill_tokens=1000))
    bulk = [seq(i, "b", priority="batch") for i in range(3)]
    for q in bulk:
        s.add(q)
    out = run_step(s)
    assert out.admitted == bulk and out.background              # batch rows alone: the step may be abandoned
    s.add(seq(0, "i"))
    s.add(q := seq(3, "b", priority="batch"))
    out = run_step(s)                                           # the interactive row runs alone
    assert [x.seq.request_id for x in out.scheduled] == ["i0"] and not out.background
    assert out.preempted == [] and all(b.status is Status.RUNNING and b.computed == 10 for b in bulk)
    assert q.status is Status.WAITING                           # no batch admission beside interactive work
    i0 = out.scheduled[0].seq
    run_step(s)
    s.finish([i0])
    out = run_step(s)                                           # it left: the paused rows go on where they were
    assert [(x.seq.request_id, x.start) for x in out.scheduled] == [("b0", 10), ("b1", 10), ("b2", 10), ("b3", 0)]
    assert out.background and s.preemptions == {}


def test_a_batch_share_runs_the_earliest_batch_rows_beside_interactive_ones():
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_prefill_tokens=1000, batch_rows=2))
    bulk = [seq(i, "b", priority="batch") for i in range(3)]
    for q in bulk:
        s.add(q)
    run_step(s)
    s.add(seq(0, "i"))
    out = run_step(s)
    assert sorted(x.seq.request_id for x in out.scheduled) == ["b0", "b1", "i0"] and not out.background


def test_an_interactive_request_short_of_blocks_takes_them_from_paused_batch_rows():
    blocks = BlockManager([GroupSpec(6, None, ())], 16, prefix_caching=False, watermark=0.0)
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_prefill_tokens=1000), blocks)
    bulk = [seq(i, "b", tokens=32, priority="batch") for i in range(3)]
    for q in bulk:
        s.add(q)
    run_step(s)
    assert blocks.pools[0].num_free == 0
    s.add(seq(0, "i", tokens=20))
    out = run_step(s)           # the batch rows would pause holding every block: the newest gives its two back
    assert [(q.request_id, r) for q, r in out.preempted] == [("b2", "priority")]
    assert [x.seq.request_id for x in out.scheduled] == ["i0"] and bulk[2].status is Status.WAITING


def test_a_flooding_tenant_cannot_starve_a_light_one():
    s = Scheduler(SchedulerConfig(max_batch_size=1, max_prefill_tokens=1000))
    for i in range(50):
        s.add(seq(i, "heavy"))
    order = []
    for step in range(12):
        if step == 2:
            s.add(seq(0, "light"))
            s.add(seq(1, "light"))
        admitted = s.schedule().admitted
        order += [q.tenant for q in admitted]
        for q in admitted:
            s.charge_output(q, 5)
        s.finish(admitted)
    # the light tenant arrives behind 48 heavy requests and is still served within the next few admissions
    assert order[:2] == ["heavy", "heavy"]
    assert order[2:6].count("light") == 2, order


def test_weights_share_capacity_in_proportion():
    s = Scheduler(SchedulerConfig(max_batch_size=1, max_prefill_tokens=1000, tenant_weights={"gold": 3.0}))
    for i in range(40):
        s.add(seq(i, "gold"))
        s.add(seq(i, "free"))
    served = []
    for _ in range(40):
        admitted = s.schedule().admitted
        served += [q.tenant for q in admitted]
        s.finish(admitted)
    assert served.count("gold") == 30 and served.count("free") == 10


def test_an_idle_tenant_does_not_bank_credit():
    s = Scheduler(SchedulerConfig(max_batch_size=1, max_prefill_tokens=1000))
    for i in range(20):
        s.add(seq(i, "a"))
    for _ in range(10):
        s.finish(s.schedule().admitted)
    for i in range(10):
        s.add(seq(i, "b"))
    served = []
    for _ in range(10):
        admitted = s.schedule().admitted
        served += [q.tenant for q in admitted]
        s.finish(admitted)
    # b starts at a's counter, so they alternate instead of b taking ten turns in a row
    assert 4 <= served.count("b") <= 6, served


def test_a_starved_tenant_preempts_the_tenant_over_its_share():
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_prefill_tokens=1000))
    for i in range(8):
        s.add(seq(i, "heavy"))
    assert len(s.schedule().admitted) == 4
    s.running[-1].output_ids = [5, 6]  # it had generated two tokens
    s.add(seq(0, "light"))
    out = s.schedule()
    assert [(q.request_id, r) for q, r in out.preempted] == [("heavy3", "fairness")]
    assert [q.request_id for q in out.admitted] == ["light0"]
    victim = out.preempted[0][0]
    assert victim.status is Status.WAITING and s.waiting["heavy"][0] is victim
    assert victim.cost_tokens == 12 and victim.computed == 0  # resumes with its prompt and its two tokens
    # a second light request takes a second row (its share is 2 of 4 for two tenants); at its share, no more
    s.add(seq(1, "light"))
    out = s.schedule()
    assert [(q.request_id, r) for q, r in out.preempted] == [("heavy2", "fairness")]
    assert [q.request_id for q in out.admitted] == ["light1"]
    s.add(seq(2, "light"))
    assert s.schedule().preempted == []


def test_no_preemption_when_disabled_or_batch_not_full():
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_prefill_tokens=1000, preempt=False))
    for i in range(4):
        s.add(seq(i, "heavy"))
    s.schedule()
    s.add(seq(0, "light"))
    assert s.schedule().preempted == []


def test_requests_of_one_task_admitted_together_share_its_head_from_the_next_step():
    blocks = BlockManager([GroupSpec(64, None, ())], 16, prefix_caching=True, watermark=0.0)
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_prefill_tokens=1000), blocks)
    head = list(range(100, 132))                         # two full blocks every request of the task shares
    reqs = [seq(i, ids=head + [i, i + 1, i + 2]) for i in range(4)]
    for q in reqs:
        q.head_len = 32
        s.add(q)
    out = run_step(s)
    assert out.admitted == reqs[:1]                      # the others would compute the same two blocks
    out = run_step(s)
    assert out.admitted == reqs[1:] and all(q.blocks.cached_tokens == 32 for q in reqs[1:])
    assert [x.start for x in out.scheduled if x.seq in reqs[1:]] == [32, 32, 32]
    assert blocks.stats()["shared"] == 2 and blocks.hits == 96


def test_cancelled_waiting_requests_leave_their_queue_and_running_ones_stay_until_finished():
    s = Scheduler(SchedulerConfig(max_batch_size=1, max_prefill_tokens=1000))
    a = [seq(i, "a") for i in range(3)]
    b = seq(0, "b")
    for q in a + [b]:
        s.add(q)
    running = s.schedule().admitted
    assert running == [a[0]]
    for q in (a[0], a[2], b):
        q.cancelled = True
    waiting, still_running = s.cancelled()
    assert waiting == [a[2], b] and still_running == [a[0]]
    assert list(s.waiting["a"]) == [a[1]] and not s.waiting["b"] and s.num_waiting == 1
    assert s.running == [a[0]]  # its blocks are the engine's to free first
    assert s.cancelled() == ([], [a[0]])  # the waiting ones are gone; the running one is reported until finished
    s.finish(still_running)
    assert s.cancelled() == ([], []) and a[0].status is Status.FINISHED
    assert s.schedule().admitted == [a[1]]  # the one request left runs next
    assert s.running == [a[1]] and s.num_waiting == 0


def test_remove_waiting_only_removes_a_waiting_sequence():
    s = Scheduler(SchedulerConfig(max_batch_size=1, max_prefill_tokens=1000))
    first, second = seq(0), seq(1)
    s.add(first)
    s.add(second)
    s.schedule()
    assert not s.remove_waiting(first)  # running, not waiting
    assert s.remove_waiting(second) and not s.remove_waiting(second)
    assert s.num_waiting == 0 and s.running == [first]


def test_a_tenants_interactive_request_goes_before_its_own_queued_batch_work():
    """Batch lines are charged to their tenant: its interactive request must not wait behind them in its queue."""
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_prefill_tokens=1000))
    s.add(seq(0, "a", priority="batch"))
    s.add(seq(1, "a", priority="batch"))
    run_step(s)
    s.add(seq(2, "a", priority="batch"))
    s.add(seq(3, "a"))
    out = run_step(s)
    assert [x.seq.request_id for x in out.scheduled] == ["a3"]
    assert [q.request_id for q in s.waiting["a"]] == ["a2"]

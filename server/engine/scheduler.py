"""Which sequences run at the next step, and how many of their queries. Pure Python: the scheduler never touches
tensors; it asks the block manager (block_manager.py) for key/value memory.

One step has a token budget (`max_prefill_tokens`): every decoding row takes one token of it, then sequences whose
prompt is still being prefilled take chunks of what is left, then waiting sequences are admitted with a first
chunk (vLLM V1's scheduler: a long prompt is split over steps, so it never stalls the rows that decode).

Admission needs a free row, budget, and free blocks for the first chunk beyond a small watermark. Leading blocks of
the prompt that the prefix cache holds are taken instead of computed. A waiting sequence whose next block is being
computed by a sequence of this very step waits one step and then shares it (the requests of one task hold its
head once).

Tenants share capacity by weighted virtual-token counters (S-LoRA's VTC): admitting a request charges its tenant
for input tokens, each generated token charges it again, and the next admission goes to the waiting tenant with
the smallest counter. A tenant that returns from idle starts at the smallest active counter, so it cannot bank
credit, and a flooding tenant cannot starve a light one.

Batch-priority requests (the Batch API) run from idle capacity: they are admitted only when no interactive request
waits, and while any interactive request runs or waits, only `batch_rows` of them (the earliest admitted) join a
step; the others pause with their blocks kept and resume where they stopped. A step of batch rows alone is marked
`background`, so the engine may abandon it the moment an interactive request arrives.

Preemption (recompute, as vLLM does: the sequence goes back to the head of its queue and later prefills its
prompt plus what it had generated):
- memory: when a running sequence needs a block and none is free, the lowest-priority running sequence gives up
  its blocks (batch work first, then the most recently admitted);
- fairness: when the batch is full and a tenant with nothing running waits, the tenant holding the most rows
  (beyond its share) gives up its most recent one;
- priority: when the batch is full and an interactive request waits, the most recent batch row gives way.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager, GroupSpec
from .config import SchedulerConfig
from .request import Sequence, Status
from .sequences import block_keys, cache_limit


def is_batch(seq: Sequence) -> bool:
    return seq.request.priority == "batch"


@dataclass
class Scheduled:
    """One sequence's part of a step: queries [start, start + count) of its query list."""
    seq: Sequence
    start: int
    count: int
    completes: bool = False  # it computes the sequence's last query: a generating one samples its next token

    def __post_init__(self) -> None:
        self.completes = self.start + self.count == self.seq.num_queries


@dataclass
class Schedule:
    """What the engine runs at this step."""
    scheduled: list[Scheduled] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)              # taken from the queues at this step
    preempted: list[tuple[Sequence, str]] = field(default_factory=list)  # (sequence, reason); waiting again
    background: bool = False     # batch-priority rows only: the step may be abandoned for interactive work


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager | None = None):
        self.config = config
        # without a block manager (tests of the policy alone): memory never runs out
        self.blocks = blocks or BlockManager([GroupSpec(1 << 20, None, ())], 16, prefix_caching=False)
        self.waiting: dict[str, deque[Sequence]] = {}
        self.running: list[Sequence] = []
        self.counters: dict[str, float] = {}
        self.preemptions: dict[str, int] = {}  # by reason

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running) or any(self.waiting.values())

    def _weight(self, tenant: str) -> float:
        return self.config.tenant_weights.get(tenant, 1.0)

    def _active_tenants(self) -> set[str]:
        return {t for t, q in self.waiting.items() if q} | {s.tenant for s in self.running}

    def add(self, seq: Sequence) -> None:
        tenant = seq.tenant
        active = self._active_tenants()
        if tenant not in active:
            floor = min((self.counters.get(t, 0.0) for t in active), default=0.0)
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        self._enqueue(seq, front=False)

    def _enqueue(self, seq: Sequence, front: bool) -> None:
        """A tenant's queue holds its interactive requests before its batch ones (the head is what admission sees);
        `front`: first of its kind (a preempted sequence resumes before the others)."""
        queue = self.waiting.setdefault(seq.tenant, deque())
        first_batch = next((i for i, s in enumerate(queue) if is_batch(s)), len(queue))
        if is_batch(seq):
            queue.insert(first_batch if front else len(queue), seq)
        else:
            queue.insert(0 if front else first_batch, seq)

    def remove_waiting(self, seq: Sequence) -> bool:
        """Take a sequence out of its tenant's queue; False if it is not waiting."""
        queue = self.waiting.get(seq.tenant)
        if queue and seq in queue:
            queue.remove(seq)
            return True
        return False

    def cancelled(self) -> tuple[list[Sequence], list[Sequence]]:
        """Cancelled sequences as (waiting, running). The waiting ones leave their queues here, since they hold no
        blocks; the running ones stay until the engine calls `finish`."""
        waiting = [s for queue in self.waiting.values() for s in queue if s.cancelled]
        for s in waiting:
            self.remove_waiting(s)
        return waiting, [s for s in self.running if s.cancelled]

    # ---- the step
    def schedule(self) -> Schedule:
        out = Schedule()
        for victim in self._preempt_for_rows():
            out.preempted.append(victim)
        budget = self.config.max_prefill_tokens
        interactive = self._interactive_present()   # (preemption and admission below do not change it)
        paused = self._paused() if interactive else set()
        # decoding rows first (one token each), then chunks of prompts being prefilled, in admission order
        for seq in sorted(self.running, key=lambda s: s.prefilling):
            if seq.status is not Status.RUNNING or seq in paused:
                continue  # preempted earlier in this loop, or a batch row giving way to interactive work
            count = 1 if not seq.prefilling else self._chunk(seq, budget)
            if count <= 0:
                continue
            if not self._grow(seq, count, out):
                continue  # it was preempted itself
            out.scheduled.append(Scheduled(seq, seq.computed, count))
            budget -= count
        self._admit(out, budget, interactive)
        out.background = bool(out.scheduled) and all(is_batch(s.seq) for s in out.scheduled)
        return out

    def _interactive_present(self) -> bool:
        return any(not is_batch(s) for s in self.running) or \
            any(not is_batch(s) for q in self.waiting.values() for s in q)

    def _paused(self) -> set[Sequence]:
        """Running batch rows that sit this step out while interactive work is present: all but the first
        `batch_rows`."""
        return set([s for s in self.running if is_batch(s)][self.config.batch_rows:])

    def _admit(self, out: Schedule, budget: int, interactive: bool) -> None:
        pending = self._pending_keys(out.scheduled)
        # a sequence preempted in this step does not come straight back; neither does a deferred tenant
        deferred: set[str] = {seq.tenant for seq, _ in out.preempted}
        while len(self.running) < self.config.max_batch_size and budget > 0:
            tenant = self._next_tenant(exclude=deferred)
            if tenant is None:
                break
            seq = self.waiting[tenant][0]
            if is_batch(seq) and interactive and \
                    sum(1 for s in self.running if is_batch(s)) >= self.config.batch_rows:
                break  # only batch work waits, and interactive work holds the engine
            keys = block_keys(seq, self.blocks.block_size) if self.blocks.prefix_caching else []
            hit = self.blocks.lookup(keys, cache_limit(seq))
            if hit < len(keys) and keys[hit] in pending and hit * self.blocks.block_size < cache_limit(seq):
                deferred.add(tenant)  # its next block is computed right now: share it from the next step
                continue
            start = max(0, hit * self.blocks.block_size - seq.plan.prefix)
            count = self._chunk(seq, budget, start)
            upto = seq.plan.prefix + start + count
            need = self.blocks.needed(seq.blocks, upto, seq.plan.prefix + start)
            if not self._room(seq, need, keys[:hit], out):
                break  # it stays at the head of its queue for the next step
            self.waiting[tenant].remove(seq)  # (a batch row of this tenant preempted for room went before it)
            self.blocks.match_prefix(seq.blocks, keys, hit, seq.plan.prefix + seq.plan.num_tokens)
            self.blocks.allocate(seq.blocks, upto, seq.plan.prefix + start)
            seq.computed = start
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.admitted.append(seq)
            out.scheduled.append(Scheduled(seq, start, count))
            pending |= set(self._pending_keys([out.scheduled[-1]]))
            budget -= count
            if not seq.output_ids:  # a resumed sequence is not charged twice for its prompt
                self.counters[tenant] = self.counters.get(tenant, 0.0) + \
                    self.config.input_cost * seq.cost_tokens / self._weight(tenant)

    def _room(self, seq: Sequence, need, hits: list[bytes], out: Schedule) -> bool:
        """Free blocks for an admission; an interactive request takes them from batch rows (paused ones would
        otherwise hold them until it left)."""
        while not self.blocks.can_allocate(need, admitting=True, hits=hits):
            batch = [s for s in self.running if is_batch(s)]
            if is_batch(seq) or not batch:
                return False
            self._preempt(batch[-1], "priority", out)
        return True

    def _next_tenant(self, exclude: set[str]) -> str | None:
        """The waiting tenant with the smallest counter, interactive requests before batch ones."""
        heads = [(t, q[0]) for t, q in self.waiting.items() if q and t not in exclude]
        if not heads:
            return None
        interactive = [t for t, s in heads if not is_batch(s)]
        candidates = interactive or [t for t, _ in heads]
        return min(candidates, key=lambda t: self.counters.get(t, 0.0))

    def _pending_keys(self, scheduled: list[Scheduled]) -> set[bytes]:
        """Prefix-cache keys of blocks that this step completes (published once it has run)."""
        out: set[bytes] = set()
        if not self.blocks.prefix_caching:
            return out
        B = self.blocks.block_size
        for s in scheduled:
            keys = s.seq.blocks.keys
            done = (s.seq.plan.prefix + s.start + s.count) // B
            out.update(keys[s.seq.blocks.registered:done])
        return out

    def _chunk(self, seq: Sequence, budget: int, start: int | None = None) -> int:
        """Queries to compute now: all that are left, or a chunk within the budget. A classify request's last
        chunk holds its prompt's last token and every label token, which are scored together."""
        left = seq.num_queries - (seq.computed if start is None else start)
        if left <= budget:
            return left
        if budget <= 0:
            return 0
        if seq.is_classify:
            tail = seq.plan.num_label_queries + 1
            return min(budget, left - tail) if left > tail else left
        return budget

    def _grow(self, seq: Sequence, count: int, out: Schedule) -> bool:
        """Blocks for the sequence's next `count` queries, preempting lower-priority rows when none are free.
        False if the sequence itself had to give way."""
        upto = seq.plan.prefix + seq.computed + count
        first = seq.plan.prefix + seq.computed
        while not self.blocks.can_allocate(self.blocks.needed(seq.blocks, upto, first)):
            victim = self._victim(exclude=seq)
            if victim is None or self._rank(victim) > self._rank(seq):
                self._preempt(seq, "memory", out)
                return False
            self._preempt(victim, "memory", out)
        self.blocks.allocate(seq.blocks, upto, first)
        return True

    def _rank(self, seq: Sequence) -> tuple[int, int]:
        """Higher keeps its blocks longer: interactive over batch, then earlier admission."""
        return (not is_batch(seq), -self.running.index(seq))

    def _victim(self, exclude: Sequence) -> Sequence | None:
        others = [s for s in self.running if s is not exclude]
        return min(others, key=self._rank) if others else None

    def _preempt(self, seq: Sequence, reason: str, out: Schedule) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.blocks)
        seq.status = Status.WAITING
        seq.computed = 0
        seq.prefix_written = False
        seq.preemptions += 1
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]
        out.admitted = [s for s in out.admitted if s is not seq]
        self._enqueue(seq, front=True)
        self.preemptions[reason] = self.preemptions.get(reason, 0) + 1
        out.preempted.append((seq, reason))

    def _preempt_for_rows(self) -> list[tuple[Sequence, str]]:
        """When the batch is full: batch rows give way to waiting interactive requests, and a waiting tenant below
        its weighted share of rows takes rows, one per waiting request, from the tenant most over its share (so a
        light tenant behind another's burst runs at once instead of after it)."""
        out = Schedule()
        if not self.config.preempt or len(self.running) < self.config.max_batch_size:
            return []
        waiting_interactive = sum(1 for q in self.waiting.values() for s in q if not is_batch(s))
        for victim in [s for s in reversed(self.running) if is_batch(s)][:waiting_interactive]:
            self._preempt(victim, "priority", out)
        rows: dict[str, int] = {}
        for s in self.running:
            rows[s.tenant] = rows.get(s.tenant, 0) + 1
        active = set(rows) | {t for t, q in self.waiting.items() if q}
        total = sum(self._weight(t) for t in active)
        share = {t: self.config.max_batch_size * self._weight(t) / total for t in active}
        taken = {p for p, _ in out.preempted}
        for tenant in sorted(active, key=lambda t: rows.get(t, 0) / share[t]):
            queue = [s for s in self.waiting.get(tenant, ()) if s not in taken]
            while queue and rows.get(tenant, 0) + 1 <= max(share[tenant], 1):
                over = [t for t in rows if t != tenant and rows[t] > share[t]]
                if not over:
                    break
                donor = max(over, key=lambda t: rows[t] / share[t])
                victim = next(s for s in reversed(self.running) if s.tenant == donor)
                self._preempt(victim, "fairness", out)
                rows[donor] -= 1
                rows[tenant] = rows.get(tenant, 0) + 1   # the row it frees goes to this tenant at admission
                queue.pop(0)
        return out.preempted

    def charge_output(self, seq: Sequence, tokens: int = 1) -> None:
        self.counters[seq.tenant] = self.counters.get(seq.tenant, 0.0) + \
            self.config.output_cost * tokens / self._weight(seq.tenant)

    def advance(self, seq: Sequence, count: int) -> None:
        """The step computed `count` more queries of the sequence: its full prompt blocks can now be shared."""
        seq.computed += count
        self.blocks.publish(seq.blocks, seq.plan.prefix + seq.computed)

    def finish(self, seqs: list[Sequence]) -> None:
        done = {id(s) for s in seqs}
        for s in seqs:
            if id(s) in done and s.status is Status.RUNNING:
                self.blocks.free(s.blocks)
        self.running = [s for s in self.running if id(s) not in done]
        for s in seqs:
            s.status = Status.FINISHED

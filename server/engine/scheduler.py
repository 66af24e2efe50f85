"""Which waiting requests join the batch at the next step. Pure Python: the scheduler never touches tensors.

Tenants share batch capacity by weighted virtual-token counters (S-LoRA's VTC): admitting a request charges its
tenant for input tokens, each generated token charges it again, and the next admission goes to the waiting tenant
with the smallest counter. A tenant that returns from idle starts at the smallest active counter, so it cannot bank
credit, and a flooding tenant cannot starve a light one.

When the batch is full and a tenant with no running request waits, the tenant holding the most rows (beyond its
share) gives up its most recent one: that sequence goes back to the head of its queue and later resumes by
prefilling its prompt plus what it had generated (recompute preemption, as vLLM does). Without it, a light
tenant's request waits for a flooding tenant's request to finish.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .config import SchedulerConfig
from .request import Sequence, Status


@dataclass
class Schedule:
    """What the engine runs at this step."""
    admitted: list[Sequence] = field(default_factory=list)   # to prefill now (resumed ones carry their output)
    preempted: list[Sequence] = field(default_factory=list)  # rows to free now; they are waiting again


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: dict[str, deque[Sequence]] = {}
        self.running: list[Sequence] = []
        self.counters: dict[str, float] = {}

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
        self.waiting.setdefault(tenant, deque()).append(seq)

    def remove_waiting(self, seq: Sequence) -> bool:
        """Take a sequence out of its tenant's queue; False if it is not waiting."""
        queue = self.waiting.get(seq.tenant)
        if queue and seq in queue:
            queue.remove(seq)
            return True
        return False

    def cancelled(self) -> tuple[list[Sequence], list[Sequence]]:
        """Cancelled sequences as (waiting, running). The waiting ones leave their queues here, since they hold no
        row; the running ones stay running until the engine has freed their rows and calls `finish`."""
        waiting = [s for queue in self.waiting.values() for s in queue if s.cancelled]
        for s in waiting:
            self.remove_waiting(s)
        return waiting, [s for s in self.running if s.cancelled]

    def schedule(self) -> Schedule:
        """Admit waiting sequences, fairest tenant first, within the batch-size and prefill-token limits."""
        out = Schedule(preempted=self._preempt())
        tokens = 0
        while len(self.running) + len(out.admitted) < self.config.max_batch_size:
            candidates = [t for t, q in self.waiting.items() if q and q[0] not in out.preempted]
            if not candidates:
                break
            tenant = min(candidates, key=lambda t: self.counters.get(t, 0.0))
            seq = self.waiting[tenant][0]
            if out.admitted and tokens + seq.cost_tokens > self.config.max_prefill_tokens:
                break  # it stays at the head of its queue for the next step
            self.waiting[tenant].popleft()
            out.admitted.append(seq)
            tokens += seq.cost_tokens
            if not seq.output_ids:  # a resumed sequence is not charged twice for its prompt
                self.counters[tenant] = self.counters.get(tenant, 0.0) + \
                    self.config.input_cost * seq.cost_tokens / self._weight(tenant)
        for seq in out.admitted:
            seq.status = Status.RUNNING
        self.running.extend(out.admitted)
        return out

    def _preempt(self) -> list[Sequence]:
        """One row per starved tenant (waiting, nothing running), taken from the tenant most over its share."""
        if not self.config.preempt or len(self.running) < self.config.max_batch_size:
            return []
        rows: dict[str, int] = {}
        for s in self.running:
            rows[s.tenant] = rows.get(s.tenant, 0) + 1
        starved = [t for t, q in self.waiting.items() if q and t not in rows]
        share = self.config.max_batch_size / (len(rows) + len(starved)) if starved else 0
        preempted = []
        for _ in starved:
            tenant = max(rows, key=rows.get)
            if rows[tenant] <= max(share, 1):
                break
            victim = next(s for s in reversed(self.running) if s.tenant == tenant)
            self.running.remove(victim)
            victim.status = Status.WAITING
            self.waiting[tenant].appendleft(victim)
            rows[tenant] -= 1
            preempted.append(victim)
        return preempted

    def charge_output(self, seq: Sequence, tokens: int = 1) -> None:
        self.counters[seq.tenant] = self.counters.get(seq.tenant, 0.0) + \
            self.config.output_cost * tokens / self._weight(seq.tenant)

    def finish(self, seqs: list[Sequence]) -> None:
        done = {id(s) for s in seqs}
        self.running = [s for s in self.running if id(s) not in done]
        for s in seqs:
            s.status = Status.FINISHED

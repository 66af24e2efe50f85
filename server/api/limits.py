"""Per-tenant admission: concurrent requests and a token rate, both answered with 429 and Retry-After (a call
larger than the tenant's whole concurrency is a 413: waiting cannot help it).

The server-wide `--max-concurrent` is each tenant's guaranteed share of the engine's queue, not a ceiling: a tenant
past it is still admitted while the global queue has room beyond a quarter kept for the others (`BORROW_SHARE`), so
one client's burst (a benchmark, a backfill) queues as it would on any server instead of getting 429 at 64. A
`max_concurrent` set for a tenant in the auth file is a hard limit. Fair sharing of what is admitted is the engine
scheduler's job (virtual token counters and weights), so a bursting tenant cannot starve another one there.

The token rate is a bucket that may go into debt: a request is admitted while the tenant's balance is positive and
is charged its real prompt and completion tokens when it finishes, so nothing is estimated up front. A tenant that
overspends waits until the bucket refills past zero. Fair sharing of batch capacity among admitted requests is the
engine scheduler's job; this only keeps one tenant from holding every queue slot.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

from server.auth import KeyRing

from .errors import ApiError, rate_limited

BORROW_SHARE = 0.75  # past its share, a tenant may fill the global queue up to this fraction of it


@dataclass
class TenantState:
    in_flight: int = 0
    balance: float = 0.0        # tokens; refills at rate/60 per second up to `burst`
    updated: float = field(default_factory=time.monotonic)


class Admission:
    """A held slot: release it exactly once, with the tokens the request used."""

    def __init__(self, limiter: "TenantLimiter", tenant: str, requests: int = 1):
        self._limiter, self.tenant, self.requests, self._released = limiter, tenant, requests, False

    def release(self, tokens: int = 0) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self.tenant, tokens, self.requests)


class TenantLimiter:
    def __init__(self, keyring: KeyRing, max_concurrent: int, tokens_per_minute: int, max_queue: int = 0):
        self._keyring = keyring
        self._max_concurrent = max_concurrent
        self._tpm = tokens_per_minute
        self._borrow_limit = int(max_queue * BORROW_SHARE)   # 0: no borrowing
        self._tenants: dict[str, TenantState] = {}
        self._lock = threading.Lock()

    def limits(self, tenant: str) -> tuple[int, int]:
        pol = self._keyring.policy(tenant)
        conc = pol.max_concurrent if pol.max_concurrent is not None else self._max_concurrent
        tpm = pol.tokens_per_minute if pol.tokens_per_minute is not None else self._tpm
        return conc, tpm

    def _hard_cap(self, tenant: str) -> bool:
        return self._keyring.policy(tenant).max_concurrent is not None or not self._borrow_limit

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            st = self._tenants.get(tenant)
            return st.in_flight if st else 0

    def acquire(self, tenant: str, requests: int = 1) -> Admission:
        """Hold `requests` slots (a classify list or completions list counts each input), or raise 429; 413 for a call
        larger than the tenant may ever run."""
        conc, tpm = self.limits(tenant)
        hard = self._hard_cap(tenant)
        if requests > (conc if hard else max(conc, self._borrow_limit)):  # no retry can succeed: not a 429
            raise ApiError(413, "too_many_inputs",
                           f"this call holds {requests} inputs but tenant {tenant!r} may run at most {conc} "
                           f"requests at once, so it can never be admitted: split it into calls of at most "
                           f"{conc} inputs")
        with self._lock:
            st = self._tenants.get(tenant)
            if st is None:
                st = self._tenants[tenant] = TenantState(balance=float(tpm))
            self._refill(st, tpm)
            if tpm and st.balance <= 0:
                wait = -st.balance / (tpm / 60.0) + 0.001
                raise rate_limited(f"tenant {tenant!r} is over its {tpm} tokens per minute; retry in "
                                   f"{math.ceil(wait)} s", wait)
            if st.in_flight + requests > conc and (hard or self._total() + requests > self._borrow_limit):
                raise rate_limited(f"tenant {tenant!r} already has {st.in_flight} requests in flight (limit {conc}"
                                   + ("" if hard else ", and the server's queue has no room to spare") + ")", 1)
            st.in_flight += requests
        return Admission(self, tenant, requests)

    def _total(self) -> int:
        return sum(st.in_flight for st in self._tenants.values())

    def _release(self, tenant: str, tokens: int, requests: int) -> None:
        _, tpm = self.limits(tenant)
        with self._lock:
            st = self._tenants[tenant]
            st.in_flight -= requests
            self._refill(st, tpm)
            if tpm:
                st.balance -= tokens

    @staticmethod
    def _refill(st: TenantState, tpm: int) -> None:
        now = time.monotonic()
        if tpm:
            st.balance = min(float(tpm), st.balance + (now - st.updated) * tpm / 60.0)
        st.updated = now



class WorkInFlight:
    """Engine requests in flight in this process by priority, so batch work can see whether interactive traffic is
    present (server/batches/gate.py). Counted by `serving.EngineCall`, from every event loop that runs routes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {"interactive": 0, "batch": 0}
        self.interactive_at = float("-inf")   # time.monotonic() when interactive work was last in flight

    def add(self, priority: str, n: int) -> None:
        with self._lock:
            self._counts[priority] += n
            if priority == "interactive":
                self.interactive_at = time.monotonic()

    @property
    def interactive(self) -> int:
        return self._counts["interactive"]

    @property
    def batch(self) -> int:
        return self._counts["batch"]

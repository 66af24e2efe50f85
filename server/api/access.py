"""Which tasks a caller may see and use, and how a task record becomes an engine prompt or a wire object.

The store enforces visibility (another tenant's private task is TaskNotFound, exactly like a missing one); this
module only translates the caller: in open mode (no auth file) the store's tenant is None, which sees everything.
"""

from __future__ import annotations

from datetime import datetime

from prompt_store.store import PromptStore, TaskRecord
from server.auth import OPEN_TENANT, Principal
from server.engine.request import PromptRef

from .schemas import LabelPublic, TaskPublic


def store_tenant(principal: Principal) -> str | None:
    return None if principal.open else principal.tenant


def find_visible(store: PromptStore, principal: Principal, ref: str) -> TaskRecord:
    """`id` (latest) or `id@N`; TaskNotFound (404) if absent or another tenant's private task."""
    return store.get(ref, store_tenant(principal), admin=principal.admin)


def list_visible(store: PromptStore, principal: Principal) -> list[TaskRecord]:
    return store.list(store_tenant(principal), admin=principal.admin)


def prompt_ref(store: PromptStore, record: TaskRecord) -> PromptRef:
    """The engine loads tensors at prefill through the store's tiers; a deleted or corrupt task fails that request."""
    return PromptRef(key=record.key, spec=record.spec, load=lambda: store.tensors(record))


def created_epoch(record: TaskRecord) -> int:
    try:
        return int(datetime.fromisoformat(record.created_at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def task_public(record: TaskRecord) -> TaskPublic:
    return TaskPublic(id=record.id, version=record.version, kind=record.kind,
                      num_virtual_tokens=record.num_virtual_tokens, sha256=record.tensors_sha256,
                      task_type=record.task_type, template=record.template, description=record.description,
                      labels=[LabelPublic(**dict(x)) for x in record.labels], visibility=record.visibility,
                      owner=record.tenant or OPEN_TENANT, generation=dict(record.generation),
                      created_at=record.created_at)

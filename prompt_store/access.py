"""Who sees and who may change which task, and what a name means to a tenant.

A tenant sees its own tasks and public ones; only the owner (or an admin, or open mode, tenant=None) changes a task.
An id held privately by another tenant is invisible, so a tenant may reuse it: its task is then stored as its own
copy "<id>~<tenant>", and the name resolves to that copy first. Every refusal reads the same whether the other
task exists or not, so nothing leaks about other tenants' tasks.
"""

from __future__ import annotations

from .errors import Forbidden, QuotaExceeded
from .index import TaskIndex
from .records import IndexedTask, StoreConfig
from .validate import NAMESPACE_SEP, own_copy


def can_see(task: IndexedTask, tenant: str | None, admin: bool) -> bool:
    return tenant is None or admin or task.owner == tenant or task.latest.visibility == "public"


def may_change(task: IndexedTask, tenant: str | None, admin: bool) -> bool:
    return tenant is None or admin or task.owner == tenant


def resolve(index: TaskIndex, name: str, tenant: str | None, admin: bool) -> IndexedTask | None:
    """The task `name` means to this tenant: its own copy of a reused id, else the task of that id if it may
    see it, else a public copy. Admins (and open mode) reach a tenant's copy by its storage id "<id>~<tenant>"."""
    tasks = index.tasks  # atomic reads; IndexedTask objects are replaced, never mutated
    if NAMESPACE_SEP in name:
        return tasks.get(name) if tenant is None or admin else None
    if tenant is not None:
        own = tasks.get(own_copy(name, tenant))
        if own is not None:
            return own
    task = tasks.get(name)
    if task is not None and can_see(task, tenant, admin):
        return task
    for sid in sorted(index.copies.get(name, ())):
        copy = tasks.get(sid)
        if copy is not None and copy.latest.visibility == "public":
            return copy
    return None


def target(index: TaskIndex, name: str, tenant: str | None, admin: bool) -> str:
    """Where a create of `name` by this tenant goes: the task it reaches by that name, or, when the id is held
    privately by another tenant (invisible to this one), this tenant's own copy, as if the id were free."""
    task = resolve(index, name, tenant, admin)
    if task is not None:
        return task.id
    held = index.tasks.get(name)
    if held is not None and tenant is not None and not can_see(held, tenant, admin):
        return own_copy(name, tenant)
    return name


def check_public_name(index: TaskIndex, name: str, sid: str) -> None:
    """One public task per id: every tenant must reach the same one."""
    for other in [name, *sorted(index.copies.get(name, ()))]:
        task = index.tasks.get(other)
        if other != sid and task is not None and task.latest.visibility == "public":
            raise Forbidden(f"a public task {name!r} already exists; choose another id")


def check_write(index: TaskIndex, config: StoreConfig, task: IndexedTask | None, task_id: str, tenant: str | None,
                admin: bool, creating: bool) -> None:
    """May this tenant add a version to `task` (None: a new task), within the version and task quotas?"""
    if task is not None:
        if not may_change(task, tenant, admin):
            if can_see(task, tenant, admin):
                raise Forbidden(f"only the owner of task {task_id!r} or an admin may add versions")
            # the id is taken by another tenant's private task: say no without saying whose or what
            raise Forbidden(f"task id {task_id!r} is not available; choose another id")
        if len(task.versions) >= config.max_versions_per_task:
            raise QuotaExceeded(f"task {task_id!r} expected at most {config.max_versions_per_task} "
                                f"versions, found {len(task.versions)} already; delete it to start over")
        return
    if creating and tenant is not None and not admin:
        owned = index.owned_by(tenant)
        if owned >= config.max_tasks_per_tenant:
            raise QuotaExceeded(f"tenant {tenant!r} expected at most {config.max_tasks_per_tenant} tasks, "
                                f"found {owned} already")

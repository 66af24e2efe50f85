"""Checks on the way in: task ids and refs, tensor shapes against the loaded model, finiteness, limits.

Every failure is an InvalidPrompt (HTTP 422) or PayloadTooLarge (413) whose message says what was expected and what
was found, so a user can fix the upload without reading our code.
"""

from __future__ import annotations

import re

import torch

from prompt_core.fingerprint import ModelFingerprint
from prompt_core.spec import PromptKind, PromptSpec, PromptTensors

from .errors import InvalidPrompt

TASK_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_task_id(task_id: str) -> str:
    """Ids become directory names: letters, digits, '.', '_', '-', at most 128, no '..'."""
    if not isinstance(task_id, str) or not TASK_ID_PATTERN.match(task_id) or ".." in task_id:
        raise InvalidPrompt(f"task id expected to match {TASK_ID_PATTERN.pattern} without '..', found {task_id!r}")
    return task_id


# A tenant that reuses an id another tenant holds privately gets its own copy, stored as "<id>~<tenant>" (a name
# no task id can take), so creating it answers exactly as for a free id and reveals nothing.
NAMESPACE_SEP = "~"


def own_copy(task_id: str, tenant: str) -> str:
    return f"{task_id}{NAMESPACE_SEP}{tenant}"


def task_name(storage_id: str) -> str:
    """The id users see for a stored task: "<id>" for "<id>" and for "<id>~<tenant>"."""
    return storage_id.partition(NAMESPACE_SEP)[0]


def check_storage_id(storage_id: str) -> str:
    """A task directory name: a task id, or "<id>~<tenant>" (a tenant's own copy of a reused id)."""
    if not isinstance(storage_id, str):
        raise InvalidPrompt(f"task id expected a string, found {storage_id!r}")
    task_id, sep, tenant = storage_id.partition(NAMESPACE_SEP)
    check_task_id(task_id)
    if sep:
        check_tenant(tenant)
    return storage_id


def check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant) or ".." in tenant:
        raise InvalidPrompt(f"tenant expected to match {TENANT_PATTERN.pattern} without '..', found {tenant!r}")
    return tenant


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`task` -> (task, None) meaning latest; `task@3` -> (task, 3). A malformed ref is TaskNotFound-worthy input
    error (InvalidPrompt) so it never probes the filesystem."""
    if not isinstance(ref, str):
        raise InvalidPrompt(f"task reference expected a string 'id' or 'id@version', found {ref!r}")
    task_id, sep, ver = ref.partition("@")
    check_storage_id(task_id)
    if not sep:
        return task_id, None
    if not ver.isdigit() or int(ver) < 1 or len(ver) > 9:
        raise InvalidPrompt(f"task version expected a positive integer after '@', found {ver!r} in {ref!r}")
    return task_id, int(ver)


def expected_shape(spec: PromptSpec, fp: ModelFingerprint) -> tuple[str, tuple[int, ...]] | None:
    """(tensor name, shape) the model needs for this prompt, or None for hard prompts."""
    T = spec.num_virtual_tokens
    if spec.kind is PromptKind.HARD:
        return None
    if spec.kind is PromptKind.PREFIX_TUNING:
        return "prefix", (fp.num_layers, 2, fp.num_kv_heads, T, fp.head_dim)
    return "virtual", (T, fp.hidden_size)


_DIM_NAMES = {"virtual": ("virtual tokens", "hidden size"),
              "prefix": ("layers", "key/value", "KV heads", "virtual tokens", "head dim")}


def check_tensors(spec: PromptSpec, tensors: PromptTensors | None, fp: ModelFingerprint,
                  max_virtual_tokens: int | None = None) -> None:
    """Shape against the model's dims, floating dtype, all finite, T within the configured limit."""
    if max_virtual_tokens is not None and spec.num_virtual_tokens > max_virtual_tokens:
        raise InvalidPrompt(f"num_virtual_tokens expected at most {max_virtual_tokens}, "
                            f"found {spec.num_virtual_tokens}")
    want = expected_shape(spec, fp)
    if want is None:
        if tensors is not None and (tensors.virtual is not None or tensors.prefix is not None):
            raise InvalidPrompt("a hard prompt expected no tensors, found some")
        return
    name, shape = want
    other = "virtual" if name == "prefix" else "prefix"
    t = None if tensors is None else getattr(tensors, name)
    if t is None:
        raise InvalidPrompt(f"a {spec.kind.value} prompt expected a {name!r} tensor of shape {list(shape)}, found none")
    if tensors is not None and getattr(tensors, other) is not None:
        raise InvalidPrompt(f"a {spec.kind.value} prompt expected no {other!r} tensor, found one")
    if not t.is_floating_point():
        raise InvalidPrompt(f"{name!r} expected a floating dtype (float32), found {t.dtype}")
    if tuple(t.shape) != shape:
        dims = _DIM_NAMES[name]
        detail = ", ".join(f"{dims[i]} expected {shape[i]} found {t.shape[i]}"
                           for i in range(min(len(shape), t.dim())) if shape[i] != t.shape[i])
        raise InvalidPrompt(f"{name!r} expected shape {list(shape)}, found {list(t.shape)}"
                            + (f" ({detail})" if detail else f" (rank expected {len(shape)}, found {t.dim()})"))
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InvalidPrompt(f"{name!r} expected only finite values, found {bad} NaN/inf of {t.numel()}")


def check_fingerprint(manifest_fp: dict | None, model_fp: ModelFingerprint) -> None:
    """A prompt trained on another base model must not be served here; None means unknown (PEFT imports)."""
    if manifest_fp is None:
        return
    try:
        found = ModelFingerprint.from_dict(manifest_fp)
    except (ValueError, TypeError) as e:
        raise InvalidPrompt(f"fingerprint is malformed: {e}") from None
    diffs = model_fp.differences(found)
    if diffs:
        raise InvalidPrompt("the prompt was made for another base model: " + "; ".join(diffs))


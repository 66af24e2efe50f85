"""Task registry: upload (multipart archive or JSON hard prompt), list, read, delete, export.

Visibility and ownership are the store's rules, applied with the caller's tenant: another tenant's private task
is a 404 everywhere, and a visible task that the caller does not own is a 403 for changes.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
import zipfile
from pathlib import Path as FsPath
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from prompt_core.spec import PromptKind, PromptSpec
from prompt_store.store import PromptStore, TaskRecord
from server.auth import Principal

from ..access import find_visible, list_visible, store_tenant, task_public
from ..body_limit import limited
from ..deps import RuntimeDep, StoreDep, TenantDep
from ..errors import ApiError, documented
from ..schemas import BASE_MODEL_ID, HardTaskCreate, TaskList, TaskMetadata, TaskPublic

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

TaskRef = Annotated[str, Path(description="a task id, or id@version", max_length=270)]
TaskId = Annotated[str, Path(description="a task id", max_length=260)]
ERRORS = documented(401, 403, 404, 413, 422, 429)
MAX_FORM_TEXT = 1 << 20  # task_id and metadata parts

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["task_id", "adapter"],
            "properties": {
                "task_id": {"type": "string", "maxLength": 128},
                "adapter": {"type": "string", "format": "binary",
                            "description": ".zip or .tar.gz of a PEFT adapter directory or a native artifact"},
                "metadata": {"type": "string", "description": "JSON: " + ", ".join(TaskMetadata.model_fields)},
            }}},
        "application/json": {"schema": HardTaskCreate.model_json_schema(ref_template="#/components/schemas/{model}")},
    },
}


def _validation_error(e: ValidationError, prefix: tuple) -> RequestValidationError:
    return RequestValidationError([{**err, "loc": (*prefix, *err["loc"])} for err in e.errors()])


def _check_free(rt, task_id: str) -> None:
    """`default` names the bare model on the OpenAI routes while it is served; a task of that name would be hidden."""
    if rt.settings.serve_base_model and task_id == BASE_MODEL_ID:
        raise ApiError(422, "invalid_request", f"body.task_id: {BASE_MODEL_ID!r} names the bare model on the OpenAI "
                                               "routes (--serve-base-model); choose another id")


@router.post("", status_code=201, response_model=TaskPublic, openapi_extra={"requestBody": _UPLOAD_BODY},
             responses=ERRORS)
async def create_task(request: Request, principal: TenantDep, store: StoreDep, rt: RuntimeDep,
                      response: Response) -> TaskPublic:
    """Upload a soft prompt (multipart: task_id, adapter archive, optional metadata JSON) or create a hard prompt
    (JSON body). An existing id gets a new version."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        record = await _hard_prompt(request, principal, store, rt)
    elif ctype == "multipart/form-data":
        record = await _uploaded(request, principal, store, rt)
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"expected multipart/form-data (an adapter archive) or application/json (a hard prompt), "
                       f"found {ctype or 'no content type'!r}")
    response.headers["Location"] = f"/v1/tasks/{record.id}@{record.version}"
    return task_public(record)


async def _hard_prompt(request: Request, principal: Principal, store: PromptStore, rt) -> TaskRecord:
    """A JSON body (HardTaskCreate): a hard prompt, no tensors."""
    raw = await limited(request, rt.settings.max_upload_bytes).body()
    try:
        body = HardTaskCreate.model_validate_json(raw)
    except ValidationError as e:
        raise _validation_error(e, ("body",)) from None
    _check_free(rt, body.task_id)
    meta = body.model_dump(exclude={"task_id", "kind"}, exclude_none=True, by_alias=True)
    return await run_in_threadpool(store.create, body.task_id, store_tenant(principal),
                                   spec=PromptSpec(kind=PromptKind.HARD), metadata=meta, admin=principal.admin)


async def _uploaded(request: Request, principal: Principal, store: PromptStore, rt) -> TaskRecord:
    """A multipart upload: task_id, the adapter archive, optional metadata JSON (TaskMetadata)."""
    form = await limited(request, rt.settings.max_upload_bytes).form(max_files=1, max_fields=2,
                                                                        max_part_size=MAX_FORM_TEXT)
    try:
        task_id, adapter, meta = form.get("task_id"), form.get("adapter"), form.get("metadata")
        errors = []
        if not isinstance(task_id, str) or not task_id:
            errors.append({"type": "missing", "loc": ("body", "task_id"), "msg": "a text field is required"})
        if not isinstance(adapter, UploadFile):
            errors.append({"type": "missing", "loc": ("body", "adapter"),
                           "msg": "a file (.zip or .tar.gz) is required"})
        if meta is not None and not isinstance(meta, str):
            errors.append({"type": "string_type", "loc": ("body", "metadata"), "msg": "must be JSON text"})
        if errors:
            raise RequestValidationError(errors)
        try:
            metadata = TaskMetadata.model_validate_json(meta) if meta else TaskMetadata()
        except ValidationError as e:
            raise _validation_error(e, ("body", "metadata")) from None
        _check_free(rt, task_id)
        data = await adapter.read()
        return await run_in_threadpool(store.create_from_archive, task_id, store_tenant(principal), data,
                                       filename=adapter.filename or "",
                                       metadata=metadata.model_dump(exclude_none=True, by_alias=True),
                                       admin=principal.admin)
    finally:
        await form.close()


@router.get("", response_model=TaskList, responses=ERRORS)
def list_tasks(principal: TenantDep, store: StoreDep) -> TaskList:
    """The latest version of every task this tenant may use: its own and public ones."""
    return TaskList(data=[task_public(r) for r in list_visible(store, principal)])


@router.get("/{task_id}", response_model=TaskPublic, responses=ERRORS)
def get_task(task_id: TaskRef, principal: TenantDep, store: StoreDep) -> TaskPublic:
    return task_public(find_visible(store, principal, task_id))


@router.get("/{task_id}/versions", response_model=TaskList, responses=ERRORS)
def list_versions(task_id: TaskId, principal: TenantDep, store: StoreDep) -> TaskList:
    """Every live version, oldest first."""
    return TaskList(data=[task_public(r) for r in store.versions(task_id, store_tenant(principal),
                                                                 admin=principal.admin)])


@router.delete("/{task_id}", status_code=204, response_class=Response, responses=ERRORS)
def delete_task(task_id: TaskId, principal: TenantDep, store: StoreDep) -> Response:
    """Remove every version from service at once (owner or admin only)."""
    store.delete(task_id, store_tenant(principal), admin=principal.admin)
    return Response(status_code=204)


@router.get("/{task_id}/export", response_class=Response, responses={
    **ERRORS, 200: {"content": {"application/zip": {}, "application/gzip": {}}}})
def export_task(task_id: TaskRef, principal: TenantDep, store: StoreDep,
                format: Annotated[Literal["zip", "tar.gz"], Query(description="archive type")] = "zip",
                layout: Annotated[Literal["peft", "native"], Query(
                    description="peft: adapter_config.json + adapter_model.safetensors; native: task.json + "
                                "prompt.safetensors")] = "peft") -> Response:
    """A soft prompt as a PEFT adapter directory (or the native artifact), packed as .zip or .tar.gz."""
    tenant = store_tenant(principal)
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        out = FsPath(tmp) / "adapter"
        if layout == "peft":
            record = store.export_peft(task_id, tenant, out, admin=principal.admin)
        else:
            record = store.export_artifact(task_id, tenant, out, admin=principal.admin)
        name = f"{record.id}-v{record.version}"
        data = _pack(out, name, format)
    media = "application/zip" if format == "zip" else "application/gzip"
    return Response(data, media_type=media, headers={
        "Content-Disposition": f'attachment; filename="{name}.{format}"', "X-Task": record.ref})


def _pack(directory: FsPath, name: str, fmt: str) -> bytes:
    """Files under one top-level folder `name/`, the layout PEFT's from_pretrained expects after unpacking."""
    buf = io.BytesIO()
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    if fmt == "zip":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in files:
                zf.write(p, f"{name}/{p.relative_to(directory).as_posix()}")
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for p in files:
                tf.add(p, f"{name}/{p.relative_to(directory).as_posix()}", recursive=False)
    return buf.getvalue()


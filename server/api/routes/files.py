"""Files (OpenAI's /v1/files): upload JSONL, list, read, download, delete; private to the tenant.

Purposes: `fine-tune`, whose every line is validated on upload (errors name the line, 422), and `batch`, copied to
disk in chunks and checked line by line when a batch is made of it (server/batches). A batch's output and error
files are files of purpose `batch_output`, downloaded here. A file over `--max-file-bytes` is a 413 and a tenant
over `--max-file-bytes-per-tenant` of stored files a 429. Another tenant's file is a 404, as a missing one.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from training.files import FileNotFound, FileRecord

from ..body_limit import limited
from ..deps import RuntimeDep, TenantDep, file_store
from ..errors import ApiError, documented
from ..schemas import FileDeleted, FileList, FileObject

router = APIRouter(prefix="/v1/files", tags=["files"])

FileId = Annotated[str, Path(description="a file id (file-...)", max_length=64)]
ERRORS = documented(401, 404, 413, 422, 429)
_UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "JSONL, one example (fine-tune) or one request (batch) a line"},
                   "purpose": {"type": "string", "enum": ["fine-tune", "batch"]}}}}}}


def file_object(rec: FileRecord) -> FileObject:
    return FileObject(id=rec.id, bytes=rec.bytes, created_at=rec.created_at, filename=rec.filename,
                      purpose=rec.purpose, lines=rec.lines, tasks=rec.tasks)


@router.post("", response_model=FileObject, openapi_extra={"requestBody": _UPLOAD_BODY}, responses=ERRORS)
async def upload_file(request: Request, principal: TenantDep, rt: RuntimeDep) -> FileObject:
    """Multipart `file` (JSONL) and `purpose`: "fine-tune" (lines {input, output}, {input, label}, {prompt,
    completion}, {messages: [...]}) or "batch" (lines {custom_id, method, url, body}); see docs/api.md."""
    files = file_store(rt)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", f"expected multipart/form-data with 'file' and 'purpose', "
                                                      f"found {ctype or 'no content type'!r}")
    limit = rt.settings.max_file_bytes
    form = await limited(request, limit + (64 << 10)).form(max_files=1, max_fields=4, max_part_size=1 << 16)
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        errors = []
        if not isinstance(upload, UploadFile):
            errors.append({"type": "missing", "loc": ("body", "file"), "msg": "a JSONL file is required"})
        if not isinstance(purpose, str) or not purpose:
            errors.append({"type": "missing", "loc": ("body", "purpose"), "msg": "a text field is required"})
        if errors:
            raise RequestValidationError(errors)
        if purpose == "batch":  # copied from the spooled upload a chunk at a time
            rec = await run_in_threadpool(files.create_stream, principal.tenant, upload.filename or "", purpose,
                                          upload.file)
        else:
            data = await upload.read()
            rec = await run_in_threadpool(files.create, principal.tenant, upload.filename or "", purpose, data)
    finally:
        await form.close()
    return file_object(rec)


@router.get("", response_model=FileList, responses=ERRORS)
def list_files(principal: TenantDep, rt: RuntimeDep,
               purpose: Annotated[str | None, Query(max_length=32)] = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
               after: Annotated[str | None, Query(max_length=64)] = None,
               order: Annotated[Literal["asc", "desc"], Query()] = "desc") -> FileList:
    """The tenant's files (an admin sees every tenant's), newest first unless order=asc."""
    recs = file_store(rt).list(principal.tenant, admin=principal.admin)
    if purpose:
        recs = [r for r in recs if r.purpose == purpose]
    if order == "asc":
        recs.reverse()
    if after:
        ids = [r.id for r in recs]
        recs = recs[ids.index(after) + 1:] if after in ids else []
    return FileList(data=[file_object(r) for r in recs[:limit]], has_more=len(recs) > limit)


@router.get("/{file_id}", response_model=FileObject, responses=ERRORS)
def get_file(file_id: FileId, principal: TenantDep, rt: RuntimeDep) -> FileObject:
    return file_object(file_store(rt).get(file_id, principal.tenant, principal.admin))


@router.get("/{file_id}/content", response_class=Response, responses={**ERRORS, 200: {
    "content": {"application/jsonl": {}}}})
def file_content(file_id: FileId, principal: TenantDep, rt: RuntimeDep) -> Response:
    """The uploaded bytes as they came (or a batch's output), streamed from disk."""
    files = file_store(rt)
    rec = files.get(file_id, principal.tenant, principal.admin)
    path = files.path(rec)
    if not path.is_file():  # deleted since it was read
        raise FileNotFound(f"no file {file_id!r}")
    return FileResponse(path, media_type="application/jsonl")


@router.delete("/{file_id}", response_model=FileDeleted, responses=ERRORS)
def delete_file(file_id: FileId, principal: TenantDep, rt: RuntimeDep) -> FileDeleted:
    """Jobs keep their own copy of their data, so deleting a file never breaks a queued or running job."""
    file_store(rt).delete(file_id, principal.tenant, principal.admin)
    return FileDeleted(id=file_id)

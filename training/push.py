"""Upload a trained artifact to a running server: `POST URL/v1/tasks`, multipart `task_id`, `adapter` (a zip of the
artifact files) and `metadata` (JSON text), with a bearer key. Only the artifact goes: logs, plots, checkpoints and
the PEFT copy stay local."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import httpx

from .export import ARTIFACT_FILES


def zip_artifact(directory: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in ARTIFACT_FILES:
            path = Path(directory) / name
            if path.is_file():
                zf.write(path, arcname=name)
    return buf.getvalue()


def metadata_from_manifest(manifest: dict) -> dict:
    """The upload's `metadata` part: only the fields the API's TaskMetadata takes (it rejects unknown ones); labels as
    a name -> verbalizer map so custom verbalizers survive."""
    meta = {k: manifest[k] for k in ("task_type", "template", "description", "visibility") if manifest.get(k)}
    if manifest.get("labels"):
        meta["labels"] = {lab["name"]: lab["verbalizer"] for lab in manifest["labels"]}
    if manifest.get("generation"):
        meta["generation"] = manifest["generation"]
    return meta


def push(directory: Path, url: str, api_key: str, task_id: str, metadata: dict | None = None,
         timeout: float = 60.0) -> dict:
    """Returns the server's JSON answer; raises ValueError with the server's message on any non-2xx status."""
    endpoint = url.rstrip("/") + "/v1/tasks"
    files = {"adapter": (f"{task_id}.zip", zip_artifact(directory), "application/zip")}
    data = {"task_id": task_id, "metadata": json.dumps(metadata or {})}
    try:
        resp = httpx.post(endpoint, data=data, files=files, headers={"Authorization": f"Bearer {api_key}"},
                          timeout=timeout)
    except httpx.HTTPError as e:
        raise ValueError(f"push to {endpoint} failed: {e}") from None
    if resp.status_code // 100 != 2:
        raise ValueError(f"push to {endpoint} answered {resp.status_code}: {resp.text[:500]}")
    try:
        return resp.json()
    except ValueError:
        return {"status": resp.status_code, "text": resp.text}

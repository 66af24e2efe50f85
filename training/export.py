"""Write what training produced: the native artifact in DIR (what `POST /v1/tasks` takes) and, where PEFT can
represent the method, a PEFT adapter in DIR/peft. Formats belong to prompt_store; this only fills them in."""

from __future__ import annotations

import re
from pathlib import Path

from prompt_core.fingerprint import ModelFingerprint
from prompt_core.spec import PromptSpec, PromptTensors
from prompt_store.format import MANIFEST_NAME, TENSORS_NAME, TaskManifest, write_artifact
from prompt_store.peft_io import export_peft

PEFT_DIR = "peft"
ARTIFACT_FILES = (MANIFEST_NAME, TENSORS_NAME)


def default_task_id(out: Path) -> str:
    """The output folder's name, reduced to characters every store accepts."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(out).resolve().name).strip("-.") or "task"


def make_manifest(spec: PromptSpec, task: str, fingerprint: ModelFingerprint, task_id: str, description: str,
                  max_new_tokens: int) -> TaskManifest:
    return TaskManifest(
        id=task_id, version=1, tenant="", visibility="private", kind=spec.kind.value,
        num_virtual_tokens=spec.num_virtual_tokens, template=spec.template,
        labels=[{"name": lab.name, "verbalizer": lab.verbalizer} for lab in spec.labels], task_type=task,
        generation={} if task == "classify" else {"max_new_tokens": max_new_tokens, "temperature": 0.0},
        description=description, fingerprint=fingerprint.to_dict())


def export_all(out: Path, manifest: TaskManifest, tensors: PromptTensors | None, peft_ok: bool,
               fingerprint: ModelFingerprint, base_model: str = "") -> TaskManifest:
    """Returns the written manifest (with its tensor checksum)."""
    written = write_artifact(Path(out), manifest, tensors)
    if peft_ok and tensors is not None:
        export_peft(Path(out) / PEFT_DIR, manifest.spec(), tensors, fingerprint, base_model=base_model)
    return written


def stored_bytes(out: Path) -> int:
    """Size of the native artifact: what the server stores and loads."""
    return sum((Path(out) / name).stat().st_size for name in ARTIFACT_FILES if (Path(out) / name).is_file())

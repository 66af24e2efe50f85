"""The native on-disk artifact of one task version: `task.json` (metadata) and `prompt.safetensors` (tensors).

Kept separate from the store so the trainer and other tools can write artifacts without a running server.
The layout is documented in docs/prompt-format.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from prompt_core.spec import Label, PromptKind, PromptSpec, PromptTensors

from .errors import CorruptArtifact, InvalidPrompt

MANIFEST_NAME = "task.json"
TENSORS_NAME = "prompt.safetensors"
FORMAT_VERSION = 1
VISIBILITIES = ("private", "public")
TASK_TYPES = ("generate", "classify")
TENSOR_NAMES = {"virtual": 2, "prefix": 5}  # name -> rank: virtual [T, D], prefix [L, 2, H_kv, T, Dh]


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class TaskManifest:
    """Everything about a task version except its tensors; small, so start-up reads only these."""
    id: str
    version: int
    tenant: str  # owner; "" means no owner (single-tenant open mode)
    visibility: str  # "private" | "public"
    kind: str  # PromptKind value
    num_virtual_tokens: int
    template: str
    labels: list[dict] = field(default_factory=list)  # [{"name": ..., "verbalizer": ...}]
    task_type: str = "generate"  # "generate" | "classify"
    generation: dict = field(default_factory=dict)  # defaults, e.g. {"max_new_tokens": 64, "temperature": 0.0}
    description: str = ""
    fingerprint: dict | None = None  # ModelFingerprint.to_dict() of the base model it was trained on
    tensors_sha256: str | None = None  # sha256 of prompt.safetensors; None for hard prompts
    created_at: str = field(default_factory=utc_now)  # ISO 8601 UTC
    format: int = FORMAT_VERSION

    def spec(self) -> PromptSpec:
        """The model-facing view; raises InvalidPrompt if kind/template/labels do not form a valid prompt."""
        try:
            labels = tuple(Label(str(d["name"]), str(d["verbalizer"])) for d in self.labels)
            return PromptSpec(kind=PromptKind.parse(self.kind), num_virtual_tokens=int(self.num_virtual_tokens),
                              template=self.template, labels=labels)
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidPrompt(f"task {self.id!r}: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TaskManifest":
        """Parse and check a manifest; every problem is an InvalidPrompt (a ValueError) naming the field."""
        if not isinstance(d, dict):
            raise InvalidPrompt(f"a manifest must be a JSON object, found {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidPrompt(f"manifest has unknown fields {unknown}; expected only {sorted(names)}")
        required = ("id", "version", "kind", "num_virtual_tokens", "template")
        missing = [k for k in required if k not in d]
        if missing:
            raise InvalidPrompt(f"manifest is missing required fields {missing}")
        data = dict(d)
        data.setdefault("tenant", "")
        data.setdefault("visibility", "private")
        if data.get("tenant") is None:
            data["tenant"] = ""
        m = cls(**data)
        m.check()
        return m

    def check(self) -> None:
        """Field types and values; raises InvalidPrompt naming expected vs found."""
        def need(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise InvalidPrompt(f"manifest field {name!r}: expected {expected}, found {getattr(self, name)!r}")
        need("format", isinstance(self.format, int) and self.format == FORMAT_VERSION, f"{FORMAT_VERSION}")
        need("id", isinstance(self.id, str) and bool(self.id), "a non-empty string")
        need("version", isinstance(self.version, int) and not isinstance(self.version, bool) and self.version >= 1,
             "an integer >= 1")
        need("tenant", isinstance(self.tenant, str), "a string")
        need("visibility", self.visibility in VISIBILITIES, f"one of {list(VISIBILITIES)}")
        need("kind", isinstance(self.kind, str) and self.kind in {k.value for k in PromptKind},
             f"one of {[k.value for k in PromptKind]}")
        need("num_virtual_tokens", isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens >= 0,
             "an integer >= 0")
        need("template", isinstance(self.template, str), "a string")
        need("labels", isinstance(self.labels, list) and all(
            isinstance(x, dict) and set(x) == {"name", "verbalizer"} for x in self.labels),
            'a list of {"name": ..., "verbalizer": ...}')
        need("task_type", self.task_type in TASK_TYPES, f"one of {list(TASK_TYPES)}")
        need("task_type", (self.task_type == "classify") == bool(self.labels),
             "'classify' exactly when labels are given")
        need("generation", isinstance(self.generation, dict), "an object")
        need("description", isinstance(self.description, str), "a string")
        need("fingerprint", self.fingerprint is None or isinstance(self.fingerprint, dict), "an object or null")
        hard = self.kind == PromptKind.HARD.value
        need("tensors_sha256", (self.tensors_sha256 is None) if hard else
             (self.tensors_sha256 is None or (isinstance(self.tensors_sha256, str) and len(self.tensors_sha256) == 64)),
             "null for a hard prompt, else a 64-hex sha256")
        need("created_at", isinstance(self.created_at, str), "an ISO 8601 string")
        self.spec()  # template / labels / kind consistency

    @property
    def key(self) -> str:
        return f"{self.id}@{self.version}"


def tensors_to_dict(spec: PromptSpec, tensors: PromptTensors | None) -> dict[str, torch.Tensor]:
    """The tensors a kind must have, as contiguous fp32 CPU tensors under their file names."""
    kind = spec.kind
    if kind is PromptKind.HARD:
        if tensors is not None and (tensors.virtual is not None or tensors.prefix is not None):
            raise InvalidPrompt("a hard prompt has no tensors, found some")
        return {}
    if tensors is None:
        raise InvalidPrompt(f"a {kind.value} prompt needs tensors, found none")
    want, other = ("prefix", "virtual") if kind is PromptKind.PREFIX_TUNING else ("virtual", "prefix")
    t, extra = getattr(tensors, want), getattr(tensors, other)
    if t is None:
        raise InvalidPrompt(f"a {kind.value} prompt needs a {want!r} tensor, found none")
    if extra is not None:
        raise InvalidPrompt(f"a {kind.value} prompt has no {other!r} tensor, found one of shape {list(extra.shape)}")
    return {want: t.detach().to(device="cpu", dtype=torch.float32).contiguous()}


def write_durably(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write and fsync, so a later rename publishes complete bytes."""
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def encode_tensors(spec: PromptSpec, tensors: PromptTensors | None) -> bytes | None:
    """The bytes of prompt.safetensors (None for hard prompts)."""
    data = tensors_to_dict(spec, tensors)
    if not data:
        return None
    return st_save(data, metadata={"format": "promptserve", "kind": spec.kind.value,
                                   "format_version": str(FORMAT_VERSION)})


def write_artifact(directory: Path, manifest: TaskManifest, tensors: PromptTensors | None,
                   fsync: bool = True) -> TaskManifest:
    """Write task.json and prompt.safetensors (fp32; "virtual" [T, D] or "prefix" [L, 2, H_kv, T, Dh]), each
    fsynced, and return the manifest with tensors_sha256 filled in. The caller makes it atomic (temp dir + rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = encode_tensors(manifest.spec(), tensors)
    sha = hashlib.sha256(blob).hexdigest() if blob is not None else None
    manifest = replace(manifest, tensors_sha256=sha)
    manifest.check()
    if blob is not None:
        write_durably(directory / TENSORS_NAME, blob, fsync)
    write_durably(directory / MANIFEST_NAME, (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode(),
                  fsync)
    return manifest


def read_manifest(directory: Path) -> TaskManifest:
    """Only the metadata; cheap (one small JSON file)."""
    path = Path(directory) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidPrompt(f"expected {MANIFEST_NAME} in the artifact, found none") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidPrompt(f"{MANIFEST_NAME} is not valid JSON: {e}") from None
    return TaskManifest.from_dict(data)


def decode_tensors(blob: bytes, spec: PromptSpec, *, expected_sha256: str | None = None,
                   source: str = TENSORS_NAME) -> PromptTensors:
    """Parse prompt.safetensors bytes, checking the sha256, tensor names, rank and dtype (fp32 only)."""
    if expected_sha256 is not None:
        found = hashlib.sha256(blob).hexdigest()
        if found != expected_sha256:
            raise CorruptArtifact(f"{source}: sha256 mismatch, expected {expected_sha256}, found {found}")
    try:
        data = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise InvalidPrompt(f"{source} is not a valid safetensors file: {e}") from None
    want = "prefix" if spec.kind is PromptKind.PREFIX_TUNING else "virtual"
    if spec.kind is PromptKind.HARD:
        raise InvalidPrompt(f"a hard prompt has no tensors, found {source}")
    if set(data) != {want}:
        raise InvalidPrompt(f"{source}: expected exactly one tensor {want!r} for {spec.kind.value}, "
                            f"found {sorted(data)}")
    t = data[want]
    if t.dtype != torch.float32:
        raise InvalidPrompt(f"{source}: tensor {want!r} expected dtype float32, found {str(t.dtype).split('.')[-1]}")
    if t.dim() != TENSOR_NAMES[want]:
        raise InvalidPrompt(f"{source}: tensor {want!r} expected rank {TENSOR_NAMES[want]}, "
                            f"found shape {list(t.shape)}")
    return PromptTensors(**{want: t})


def read_artifact(directory: Path, *, load_tensors: bool = True) -> tuple[TaskManifest, PromptTensors | None]:
    """Read a native artifact; tensors are checked against the manifest's sha256 (a mismatch is CorruptArtifact)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    spec = manifest.spec()
    if not load_tensors or spec.kind is PromptKind.HARD:
        return manifest, None
    path = directory / TENSORS_NAME
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise InvalidPrompt(f"expected {TENSORS_NAME} for a {spec.kind.value} prompt, found none") from None
    return manifest, decode_tensors(blob, spec, expected_sha256=manifest.tensors_sha256)

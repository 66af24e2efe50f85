"""Importing an upload: what a directory holds (PEFT adapter or native artifact) and the metadata applied to it."""

from __future__ import annotations

from pathlib import Path

from prompt_core.fingerprint import ModelFingerprint
from prompt_core.spec import Label, PromptSpec, PromptTensors, make_labels

from . import peft_io
from .archive import detect_layout
from .errors import CorruptArtifact, InvalidPrompt, PayloadTooLarge
from .format import read_artifact
from .validate import check_fingerprint

METADATA_KEYS = {"visibility", "description", "generation", "template", "labels", "task_type"}


def normalize_labels(labels) -> list[dict]:
    """Accept ["pos", "neg"], {"pos": " positive"} or [{"name": ..., "verbalizer": ...}]."""
    if not labels:
        return []
    if isinstance(labels, list) and all(isinstance(x, dict) for x in labels):
        try:
            labels = {str(x["name"]): str(x["verbalizer"]) for x in labels}
        except KeyError as e:
            raise InvalidPrompt("labels expected objects with 'name' and 'verbalizer', "
                                f"found one without {e}") from None
    if not isinstance(labels, (list, dict)):
        raise InvalidPrompt(f"labels expected a list or an object, found {type(labels).__name__}")
    try:
        return [{"name": lab.name, "verbalizer": lab.verbalizer} for lab in make_labels(labels)]
    except ValueError as e:
        raise InvalidPrompt(str(e)) from None


def read_source(src: Path, fingerprint: ModelFingerprint, max_file_bytes: int
                ) -> tuple[PromptSpec, PromptTensors | None, dict]:
    """An uploaded directory: a PEFT adapter or a native artifact, checked file by file (no symlinks, sizes,
    no pickles) and against the model's fingerprint. Returns (spec, tensors, metadata the artifact carries)."""
    if not src.is_dir():
        raise InvalidPrompt(f"expected an artifact directory, found {src.name!r} is not one")
    for p in src.iterdir():
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise InvalidPrompt(f"expected regular files in the upload, found {p.name!r} is not one")
        if p.is_file() and p.stat().st_size > max_file_bytes:
            raise PayloadTooLarge(f"{p.name}: expected at most {max_file_bytes} bytes, "
                                  f"found {p.stat().st_size}")
    pickles = peft_io.find_pickles(src)
    if pickles:
        raise InvalidPrompt(f"refusing {pickles}: {peft_io.PICKLE_REFUSAL}")
    if detect_layout(src) == "peft":
        spec, tensors, _cfg = peft_io.import_peft(src, fingerprint)
        return spec, tensors, {}
    try:
        manifest, tensors = read_artifact(src)
    except CorruptArtifact as e:  # in an upload a bad checksum is the uploader's problem, not ours
        raise InvalidPrompt(str(e)) from None
    check_fingerprint(manifest.fingerprint, fingerprint)
    base = {"visibility": manifest.visibility, "description": manifest.description,
            "generation": manifest.generation, "task_type": manifest.task_type}
    return manifest.spec(), tensors, base


def final_spec(spec: PromptSpec, meta: dict) -> PromptSpec:
    """The spec with the upload's metadata applied (template, labels), checked."""
    template = meta.get("template", spec.template)
    labels = normalize_labels(meta["labels"]) if "labels" in meta else \
        [{"name": lab.name, "verbalizer": lab.verbalizer} for lab in spec.labels]
    if meta.get("visibility", "private") not in ("private", "public"):
        raise InvalidPrompt(f"visibility expected 'private' or 'public', found {meta['visibility']!r}")
    if "generation" in meta and not isinstance(meta["generation"], dict):
        raise InvalidPrompt(f"generation expected an object, found {type(meta['generation']).__name__}")
    try:
        return PromptSpec(kind=spec.kind, num_virtual_tokens=spec.num_virtual_tokens, template=template,
                          labels=tuple(Label(x["name"], x["verbalizer"]) for x in labels))
    except ValueError as e:
        raise InvalidPrompt(str(e)) from None

"""Score a JSONL file with a stored artifact or a hard prompt: the `eval` command's work, kept out of the CLI so
scripts and tests call it directly. Both go through the same harness (evaluate.py) the trainer uses per epoch."""

from __future__ import annotations

from pathlib import Path

from prompt_core.fingerprint import ModelFingerprint, fingerprint
from prompt_core.spec import PromptKind, PromptSpec
from prompt_store.format import read_artifact

from .data import load_jsonl
from .evaluate import evaluate
from .objective import make_rows


def hard_prompt_eval(template: str, task: str, labels, data: str, lm, batch_size: int = 16,
                     max_new_tokens: int = 32) -> dict:
    """The zero-shot baseline through the very harness the soft prompts are scored with."""
    spec = PromptSpec(kind=PromptKind.HARD, template=template, labels=labels)
    names = {lab.name for lab in labels} if task == "classify" else None
    rows = make_rows(spec, lm.tokenizer, load_jsonl(data, task, names), task, with_outputs=False)
    return _named(evaluate(lm.model, lm.tokenizer, rows, task, None, None, batch_size, max_new_tokens), spec)


def artifact_eval(directory: str, data: str, lm, batch_size: int = 16, max_new_tokens: int = 32) -> dict:
    """Score a trained artifact exactly as stored: read back through prompt_store, checked against the model."""
    manifest, tensors = read_artifact(Path(directory))
    if manifest.fingerprint:
        diffs = ModelFingerprint.from_dict(manifest.fingerprint).differences(fingerprint(lm.model))
        if diffs:
            raise ValueError(f"{directory} was trained on another base model: " + "; ".join(diffs))
    spec = manifest.spec()
    names = {lab.name for lab in spec.labels} if manifest.task_type == "classify" else None
    rows = make_rows(spec, lm.tokenizer, load_jsonl(data, manifest.task_type, names), manifest.task_type,
                     with_outputs=False)
    dev = lm.model.get_input_embeddings().weight.device
    virtual = tensors.virtual.to(dev) if tensors and tensors.virtual is not None else None
    prefix = tensors.prefix.to(dev) if tensors and tensors.prefix is not None else None
    return _named(evaluate(lm.model, lm.tokenizer, rows, manifest.task_type, virtual, prefix, batch_size,
                           max_new_tokens), spec)


def _named(metrics: dict, spec) -> dict:
    """Classify predictions as label names, for --json-out readers."""
    if spec.labels:
        metrics["predictions"] = [spec.labels[i].name for i in metrics["predictions"]]
    return metrics

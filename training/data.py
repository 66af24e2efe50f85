"""JSONL data sets: load with errors that name the file and line, split off a held-out set, resolve labels."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from prompt_core.spec import Label, make_labels


@dataclass(frozen=True)
class Example:
    input: str
    target: str      # the output text (generate) or the label name (classify)
    source: str      # "file:line", for messages


def _fail(path: Path, line: int, what: str) -> ValueError:
    return ValueError(f"{path}:{line}: {what}")


def load_jsonl(path: str | Path, task: str, label_names: set[str] | None = None) -> list[Example]:
    """Read `{"input", "output"}` (generate) or `{"input", "label"}` (classify) lines; blank lines are skipped.

    Every problem raises ValueError naming the file and line, because a bad line in a few hundred is otherwise
    hard to find."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such data file")
    key = "output" if task == "generate" else "label"
    out: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise _fail(path, n, f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise _fail(path, n, f"expected a JSON object, found {type(row).__name__}")
            for field in ("input", key):
                if field not in row:
                    raise _fail(path, n, f"missing field {field!r} (a {task} line needs 'input' and {key!r})")
                if not isinstance(row[field], str):
                    raise _fail(path, n, f"field {field!r} must be a string, found {type(row[field]).__name__}")
            if not row["input"].strip():
                raise _fail(path, n, "field 'input' is empty")
            if not row[key].strip():
                raise _fail(path, n, f"field {key!r} is empty")
            if label_names is not None and task == "classify" and row[key] not in label_names:
                raise _fail(path, n, f"label {row[key]!r} is not one of {sorted(label_names)}")
            out.append(Example(input=row["input"], target=row[key], source=f"{path}:{n}"))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def split_heldout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle, then the last `fraction` is held out (at least one example on each side)."""
    if len(examples) < 2:
        raise ValueError(f"{examples[0].source.rsplit(':', 1)[0]}: need at least 2 examples to hold some out; "
                         f"pass --eval")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = sorted(order[len(order) - n_held:])
    keep = sorted(order[: len(order) - n_held])
    return [examples[i] for i in keep], [examples[i] for i in held]


def resolve_labels(labels: str | None, verbalizers: str | Path | None,
                   examples: list[Example] | None = None) -> tuple[Label, ...]:
    """--labels a,b,c (verbalizers " a", " b", ...), --verbalizers FILE (a JSON object name -> verbalizer), or the
    sorted label names found in the data."""
    if labels and verbalizers:
        raise ValueError("give --labels or --verbalizers, not both")
    if verbalizers:
        path = Path(verbalizers)
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the verbalizers ({e})") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ValueError(f"{path}: expected a JSON object mapping label names to verbalizer text")
        return make_labels(mapping)
    if labels:
        names = [x.strip() for x in labels.split(",") if x.strip()]
        if len(names) < 2:
            raise ValueError(f"--labels needs at least two names, got {labels!r}")
        return make_labels(names)
    if examples:
        return make_labels(sorted({e.target for e in examples}))
    raise ValueError("classification needs --labels, --verbalizers, or labelled data")

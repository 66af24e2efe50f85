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


FORMATS = ("{'input', 'output'} (generate)", "{'input', 'label'} (classify)", "{'prompt', 'completion'}",
           "{'messages': [...]} (the last assistant message is the output or label)")


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, found {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field {name!r} is empty")
    return value


def _content(message: dict, i: int) -> str:
    """A chat message's text: a string, or OpenAI's list of parts of which the text parts count."""
    content = message.get("content")
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if not all(isinstance(t, str) for t in parts):
            raise ValueError(f"messages[{i}].content: a text part needs a string 'text'")
        content = "".join(parts)
    if not isinstance(content, str):
        raise ValueError(f"messages[{i}].content must be a string or a list of text parts, "
                         f"found {type(content).__name__}")
    return content


def _from_messages(messages) -> tuple[str, str]:
    """OpenAI's chat format: the last assistant message is the target; the messages before it, joined by newlines,
    are the input (a lone user message is its own text)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'role'")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("'messages' has no assistant message (it is the output to learn)")
    target = _content(messages[last], last)
    if not target.strip():
        raise ValueError(f"messages[{last}] (the last assistant message) is empty")
    before = [_content(m, i) for i, m in enumerate(messages[:last])]
    text = "\n".join(t for t in before if t.strip())
    if not text.strip():
        raise ValueError("'messages' has no non-empty message before the last assistant message")
    return text, target


def parse_record(row, task: str | None) -> tuple[str, str, str | None]:
    """(input, target, task the line fixes or None) of one JSONL line in any accepted format; ValueError without a
    location otherwise. task None accepts every format (file upload, before a job says what it trains). A classify
    target is the label name with surrounding whitespace removed."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, found {type(row).__name__}")
    if "input" in row:
        key = {"generate": "output", "classify": "label"}.get(task or "") or ("label" if "label" in row else "output")
        if key not in row:
            raise ValueError(f"missing field {key!r} (a {task or 'generate'} line needs 'input' and {key!r})")
        text, target = _text(row["input"], "input"), _text(row[key], key)
        fixed = "classify" if key == "label" else "generate"
    elif "prompt" in row or "completion" in row:
        for name in ("prompt", "completion"):
            if name not in row:
                raise ValueError(f"missing field {name!r} (a prompt/completion line needs both)")
        text, target, fixed = _text(row["prompt"], "prompt"), _text(row["completion"], "completion"), None
    elif "messages" in row:
        (text, target), fixed = _from_messages(row["messages"]), None
    else:
        raise ValueError(f"no known fields (found {sorted(row)[:5]}); expected one of: " + ", ".join(FORMATS))
    if task == "classify" or fixed == "classify":
        target = target.strip()
    return text, target, fixed


def read_lines(lines, source: str, task: str | None, label_names: set[str] | None = None) -> list[Example]:
    """Parse JSONL lines (str or bytes); blank lines are skipped; errors name `source:line`."""
    out: list[Example] = []
    for n, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{source}:{n}: not valid UTF-8") from None
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        try:
            text, target, _ = parse_record(row, task)
        except ValueError as e:
            raise ValueError(f"{source}:{n}: {e}") from None
        if label_names is not None and task == "classify" and target not in label_names:
            raise ValueError(f"{source}:{n}: label {target!r} is not one of {sorted(label_names)}")
        out.append(Example(input=text, target=target, source=f"{source}:{n}"))
    if not out:
        raise ValueError(f"{source}: no examples")
    return out


def load_jsonl(path: str | Path, task: str, label_names: set[str] | None = None) -> list[Example]:
    """Read a JSONL file in any accepted format (FORMATS); blank lines are skipped.

    Every problem raises ValueError naming the file and line, because a bad line in a few hundred is otherwise
    hard to find."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such data file")
    with path.open("rb") as f:
        return read_lines(f, str(path), task, label_names)


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

"""What a task prompt is, to the model: its kind, template, labels and tensors. No storage concerns here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep this module importable without torch for schema and scheduling code
    import torch

INPUT_SLOT = "{input}"
_VIRTUAL_MARK = re.compile(r"<v:(\d+)>")


class PromptKind(str, Enum):
    HARD = "hard"
    PROMPT_TUNING = "prompt_tuning"
    P_TUNING = "p_tuning"
    PREFIX_TUNING = "prefix_tuning"

    @classmethod
    def parse(cls, value: str) -> "PromptKind":
        try:
            return cls(value.lower().replace("-", "_"))
        except ValueError:
            raise ValueError(f"unknown prompt kind {value!r}; expected one of {[k.value for k in cls]}") from None


@dataclass(frozen=True)
class Label:
    name: str
    verbalizer: str  # the text whose tokens are scored after the prompt, e.g. " positive"


def make_labels(labels: list[str] | dict[str, str] | None) -> tuple[Label, ...]:
    """A list gets verbalizers " <name>" (a leading space, as a word following the prompt); a map is taken as is."""
    if not labels:
        return ()
    items = labels.items() if isinstance(labels, dict) else ((name, f" {name}") for name in labels)
    out = tuple(Label(str(name), str(verb)) for name, verb in items)
    names = [label.name for label in out]
    if len(set(names)) != len(names):
        raise ValueError(f"label names must be unique, got {names}")
    if any(not label.verbalizer for label in out):
        raise ValueError("every label needs a non-empty verbalizer")
    return out


@dataclass(frozen=True)
class TemplatePart:
    """A piece of a template: literal text (which may hold the input slot) or a run of virtual tokens."""
    text: str | None = None
    virtual: int = 0


def parse_template(template: str) -> list[TemplatePart]:
    """Split `<v:4> Review: {input} <v:4> Sentiment:` into text and virtual-token parts."""
    if template.count(INPUT_SLOT) != 1:
        raise ValueError(f"a template needs exactly one {INPUT_SLOT} slot, got {template.count(INPUT_SLOT)}: "
                         f"{template!r}")
    parts: list[TemplatePart] = []
    pos = 0
    for m in _VIRTUAL_MARK.finditer(template):
        if m.start() > pos:
            parts.append(TemplatePart(text=template[pos:m.start()]))
        n = int(m.group(1))
        if n <= 0:
            raise ValueError(f"virtual-token marker {m.group(0)!r} must count at least one token")
        parts.append(TemplatePart(virtual=n))
        pos = m.end()
    if pos < len(template):
        parts.append(TemplatePart(text=template[pos:]))
    return parts


@dataclass(frozen=True)
class PromptSpec:
    """The model-facing description of a task prompt.

    Kinds and where their virtual tokens go:
    - hard: none; the template is the whole prompt.
    - prompt_tuning: T virtual tokens in front of the (templated) input, as PEFT does.
    - p_tuning: T virtual tokens placed by `<v:N>` markers in the template; without markers they are prepended.
    - prefix_tuning: T key/value pairs per layer in front of the cache; nothing in the input.
    """
    kind: PromptKind
    num_virtual_tokens: int = 0
    template: str = INPUT_SLOT
    labels: tuple[Label, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        kind = PromptKind.parse(self.kind) if not isinstance(self.kind, PromptKind) else self.kind
        object.__setattr__(self, "kind", kind)
        parts = parse_template(self.template)
        marked = sum(p.virtual for p in parts)
        if kind is PromptKind.HARD and self.num_virtual_tokens:
            raise ValueError("a hard prompt has no virtual tokens")
        if kind is not PromptKind.HARD and self.num_virtual_tokens <= 0:
            raise ValueError(f"a {kind.value} prompt needs at least one virtual token")
        if marked and kind is not PromptKind.P_TUNING:
            raise ValueError(f"<v:N> markers place virtual tokens for p_tuning only, not {kind.value}")
        if marked and marked != self.num_virtual_tokens:
            raise ValueError(f"the template places {marked} virtual tokens but the prompt has "
                             f"{self.num_virtual_tokens}")

    @property
    def parts(self) -> list[TemplatePart]:
        """The template with the virtual tokens made explicit (prepended where no marker places them)."""
        parts = parse_template(self.template)
        if self.kind in (PromptKind.PROMPT_TUNING, PromptKind.P_TUNING) and not any(p.virtual for p in parts):
            parts = [TemplatePart(virtual=self.num_virtual_tokens), *parts]
        return parts

    @property
    def is_classifier(self) -> bool:
        return bool(self.labels)


@dataclass
class PromptTensors:
    """Device-ready tensors of a soft prompt.

    virtual: [T, D] input embeddings (prompt tuning, P-tuning), or None.
    prefix:  [L, 2, H_kv, T, Dh] raw keys (slot 0) and values (slot 1) per layer (prefix tuning), or None.
    """
    virtual: "torch.Tensor | None" = None
    prefix: "torch.Tensor | None" = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.virtual, self.prefix) if t is not None)

    def to(self, device, dtype=None) -> "PromptTensors":
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
        return PromptTensors(virtual=move(self.virtual), prefix=move(self.prefix))


def prefix_length(spec: PromptSpec) -> int:
    return spec.num_virtual_tokens if spec.kind is PromptKind.PREFIX_TUNING else 0

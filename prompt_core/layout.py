"""Turn a task prompt and an input text into the token layout of one row. Pure Python: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from .spec import INPUT_SLOT, PromptSpec, prefix_length


@dataclass
class RowPlan:
    """One request's prefill, before batching.

    ids:    token id per input position (0 where a virtual token goes)
    virt:   -1 for a real token, else the index of the row's virtual token (0..T-1)
    prefix: number of prefix key/value slots in front of the tokens (prefix tuning), else 0
    labels: the token ids of each label's verbalizer (classification), else empty
    input_span: [start, end) of the input's own tokens in `ids`, when the input was laid out apart from the
            template text (token-id inputs, echo); None when it was tokenized together with it
    """
    ids: list[int]
    virt: list[int]
    prefix: int = 0
    labels: list[list[int]] = field(default_factory=list)
    input_span: tuple[int, int] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    @property
    def num_label_queries(self) -> int:
        """Label tokens fed as queries: all but the last of each verbalizer (its score comes from the one before)."""
        return sum(len(lab) - 1 for lab in self.labels)

    @property
    def num_queries(self) -> int:
        return self.num_tokens + self.num_label_queries


def _leading_specials(tokenizer) -> list[int]:
    """Tokens the tokenizer puts in front of any text (a BOS for some models, nothing for others)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(plain) and with_special[-len(plain):] == plain:
        return list(with_special[: len(with_special) - len(plain)])
    return []


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def plan_row(spec: PromptSpec, tokenizer, text: str, *, with_labels: bool = False,
             label_ids: list[list[int]] | None = None, input_ids: list[int] | None = None,
             separate_input: bool = False) -> RowPlan:
    """Lay out the template around the input. Each text part is tokenized as one string, so a hard prompt gives
    exactly the tokens of the filled-in template; virtual tokens are placed as the template says (in front by
    default, as PEFT does). Special tokens the tokenizer adds go in front of the first text, after any leading
    virtual tokens, again as PEFT does.

    With `input_ids` (or `separate_input`), the input is not merged into the template text: the text before
    `{input}` and the text after it are tokenized on their own, and the input's tokens (the ids as given, or the
    text tokenized alone) go between them, so the plan holds exactly the caller's tokens at `input_span`. Leading
    special tokens then go in front of the first non-empty piece, unless the ids already start with them."""
    ids: list[int] = []
    virt: list[int] = []
    specials = _leading_specials(tokenizer)
    next_virtual = 0
    span = None
    separate = separate_input or input_ids is not None
    for part in spec.parts:
        if part.virtual:
            ids.extend([0] * part.virtual)
            virt.extend(range(next_virtual, next_virtual + part.virtual))
            next_virtual += part.virtual
            continue
        if separate and INPUT_SLOT in part.text:
            before, after = part.text.split(INPUT_SLOT)
            mine = list(input_ids) if input_ids is not None else encode(tokenizer, text)
            pieces = [encode(tokenizer, before) if before else [], mine, encode(tokenizer, after) if after else []]
        else:
            pieces = [encode(tokenizer, part.text.replace(INPUT_SLOT, text)), None, None]
        for k, toks in enumerate(pieces):
            if toks is None:
                continue
            if specials and toks:
                if not (k == 1 and toks[:len(specials)] == specials):
                    toks = specials + toks
                specials = []
                if k == 1:
                    ids.extend(toks[:len(toks) - len(mine)])
                    virt.extend([-1] * (len(toks) - len(mine)))
                    toks = mine
            if k == 1:
                span = (len(ids), len(ids) + len(toks))
            ids.extend(toks)
            virt.extend([-1] * len(toks))
    if not ids:
        raise ValueError("the prompt and input give no tokens at all")
    labels: list[list[int]] = []
    if with_labels:
        labels = label_ids if label_ids is not None else [encode(tokenizer, lab.verbalizer) for lab in spec.labels]
        if not labels or any(not lab for lab in labels):
            raise ValueError("classification needs labels whose verbalizers give at least one token each")
    return RowPlan(ids=ids, virt=virt, prefix=prefix_length(spec), labels=labels, input_span=span)

"""Requests in: check an EngineRequest against the server's limits and lay it out as a Sequence.

Safe to call from any thread (tokenizer calls take the tokenizer's lock), so bad input fails in the caller, with
InvalidRequest or InputTooLong, before it reaches the engine loop.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from dataclasses import dataclass
from typing import Callable

from prompt_core.layout import plan_row
from prompt_core.spec import INPUT_SLOT, PromptSpec

from .block_manager import BlockTables
from .config import EngineConfig
from .constraints import GrammarCache
from .request import EngineRequest, InputTooLong, InvalidRequest, PromptRef, Sequence
from .tokenizer import SharedTokenizer


@dataclass(frozen=True)
class TaskTokens:
    """What every request of one task version shares, tokenized once per prompt key."""
    head_len: int              # leading tokens every request shares (see task_tokens)
    labels: list[list[int]]    # each label's verbalizer tokens (empty without labels)


def task_tokens(spec: PromptSpec, tokenizer: SharedTokenizer) -> TaskTokens:
    """The head is the task's leading virtual tokens and the template text before the input, less that text's last
    token, which may merge with the input under BPE."""
    head = 0
    for part in spec.parts:
        if part.virtual:
            head += part.virtual
            continue
        text = part.text.split(INPUT_SLOT)[0]
        if text:
            head += max(len(tokenizer.encode(text)) - 1, 0)
        break
    return TaskTokens(head_len=head, labels=[tokenizer.encode(lab.verbalizer) for lab in spec.labels])


class SequenceBuilder:
    MAX_TASKS = 16384  # TaskTokens kept; task versions come and go, so the cache starts over when full

    def __init__(self, config: EngineConfig, tokenizer: SharedTokenizer, grammars: GrammarCache, *,
                 vocab_size: int, logits_size: int, max_positions: int | None,
                 on_constrained: Callable[[str], None] | None = None,
                 kv_refusal: Callable[[int], str | None] = lambda slots: None, kv_groups: int = 1):
        self.config, self.tokenizer, self.grammars = config, tokenizer, grammars
        self.kv_refusal = kv_refusal        # (slots a request may hold) -> why the cache can never hold it, or None
        self.kv_groups = kv_groups          # block tables per sequence (one per attention window)
        self.vocab_size = vocab_size        # token ids an input may use (input embeddings)
        self.logits_size = logits_size      # token ids logit_bias may name (output embeddings)
        self.max_positions = max_positions  # the model's context length, if it has one
        self.on_constrained = on_constrained  # (constraint kind) per constrained request: metrics
        self._tasks: dict[str, TaskTokens] = {}

    def task(self, prompt: PromptRef) -> TaskTokens:
        tokens = self._tasks.get(prompt.key)
        if tokens is None:
            tokens = task_tokens(prompt.spec, self.tokenizer)
            if len(self._tasks) >= self.MAX_TASKS:
                self._tasks.clear()
            self._tasks[prompt.key] = tokens
        return tokens

    def head_len(self, prompt: PromptRef) -> int:
        return self.task(prompt).head_len

    def make(self, req: EngineRequest) -> Sequence:
        """Validate and tokenize a request. Raises InvalidRequest / InputTooLong for bad input."""
        cfg = self.config
        if req.mode == "classify" and not req.prompt.spec.labels:
            raise InvalidRequest(f"task {req.prompt.key} has no labels, so it cannot classify")
        if req.sampling.max_new_tokens > cfg.max_new_tokens:
            raise InputTooLong(f"max_new_tokens is {req.sampling.max_new_tokens}; this server allows at most "
                               f"{cfg.max_new_tokens}")
        if len(req.text) > 32 * cfg.max_input_tokens:  # cheap bound before tokenizing a huge text
            raise InputTooLong(f"input has {len(req.text)} characters; the limit is {cfg.max_input_tokens} tokens")
        self._check_logprob_fields(req)
        task = self.task(req.prompt)
        try:
            with self.tokenizer.lock:
                plan = plan_row(req.prompt.spec, self.tokenizer.tokenizer, req.text,
                                with_labels=req.mode == "classify",
                                label_ids=task.labels if req.mode == "classify" else None,
                                input_ids=list(req.input_ids) if req.input_ids is not None else None,
                                separate_input=req.echo)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        if plan.prefix + plan.num_tokens > cfg.max_input_tokens:
            raise InputTooLong(f"the prompt has {plan.prefix + plan.num_tokens} tokens (virtual tokens included); the "
                               f"limit is {cfg.max_input_tokens}")
        longest = plan.prefix + plan.num_queries + req.sampling.max_new_tokens
        if self.max_positions and longest > self.max_positions:
            raise InputTooLong(f"prefix, prompt and max_new_tokens make {longest} positions; the model has "
                               f"{self.max_positions}")
        seed = req.sampling.seed if req.sampling.seed is not None else random.getrandbits(63)
        seq = Sequence(request=req, plan=plan, seed=seed, head_len=task.head_len,
                       blocks=BlockTables([[] for _ in range(self.kv_groups)]))
        refusal = self.kv_refusal(seq.max_slots)
        if refusal:
            raise InputTooLong(refusal)
        if req.mode == "generate":
            self._check_processing(seq)
        return seq

    def _check_logprob_fields(self, req: EngineRequest) -> None:
        """Token-id inputs, echo, logprobs and score mode: what fits together, within the server's limits."""
        limit = self.config.max_input_tokens
        if req.logprobs is not None and not 0 <= req.logprobs <= self.config.max_logprobs:
            raise InvalidRequest(f"logprobs asks for {req.logprobs} alternatives per token; this server returns "
                                 f"between 0 and {self.config.max_logprobs}")
        if req.mode == "score" and not req.echo:
            raise InvalidRequest("scoring without generating (max_tokens 0) needs echo")
        if req.mode == "classify" and (req.echo or req.logprobs is not None):
            raise InvalidRequest("classify returns label scores; echo and logprobs are for generate and score")
        if req.input_ids is not None:
            if not req.input_ids:
                raise InvalidRequest("a token-id input needs at least one token")
            if len(req.input_ids) > limit:
                raise InputTooLong(f"the input has {len(req.input_ids)} tokens; the limit is {limit}")
            bad = [t for t in req.input_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequest(f"token id {bad[0]} is outside the model's vocabulary (0..{self.vocab_size - 1})")

    def _check_processing(self, seq: Sequence) -> None:
        """Token ids of logit_bias must exist; a constraint is compiled here (cached), in the caller's thread, so a
        schema the grammar library refuses is an InvalidRequest before the request is queued."""
        sp = seq.request.sampling
        bad = [tok for tok, _ in sp.logit_bias if tok >= self.logits_size]
        if bad:
            raise InvalidRequest(f"logit_bias has token ids {bad[:8]} beyond the vocabulary (ids 0.."
                                 f"{self.logits_size - 1})")
        if sp.constraint is not None:
            seq.matcher = self.grammars.matcher(sp.constraint)
            if self.on_constrained is not None:
                self.on_constrained(sp.constraint.kind)


def cache_limit(seq: Sequence) -> int:
    """How many leading slots may come from the prefix cache: never the prompt's last token (its logits are the
    first output), and with echo nothing from the query before the input's first token on (it scores that token)."""
    plan = seq.plan
    limit = plan.prefix + plan.num_tokens - 1
    if seq.request.echo and plan.input_span is not None:
        limit = min(limit, plan.prefix + plan.input_span[0] - 1)
    return max(0, limit)


_PREFIX_SLOT = -(1 << 40)


def block_keys(seq: Sequence, block_size: int) -> list[bytes]:
    """The prefix-cache keys of the sequence's full prompt blocks: a chain of 128-bit digests over what each slot
    holds (a prefix slot, a virtual token, a token id), rooted at the task's prompt key and content, so that only
    requests of the same task version can share a block. A block that holds any of the request's own input (past the
    task's shared head) is keyed by the tenant as well: no tenant's text is shared with, or timed by, another."""
    plan, prompt = seq.plan, seq.request.prompt
    P = plan.prefix
    head = P + seq.head_len
    key = hashlib.blake2b(repr((prompt.key, prompt.content, prompt.spec)).encode(), digest_size=16).digest()
    keys = []
    for j in range((P + plan.num_tokens) // block_size):
        lo, hi = j * block_size, (j + 1) * block_size
        desc = array("q", (_PREFIX_SLOT - s if s < P else
                           (-1 - plan.virt[s - P] if plan.virt[s - P] >= 0 else plan.ids[s - P])
                           for s in range(lo, hi)))
        salt = b"" if hi <= head else seq.tenant.encode()
        key = hashlib.blake2b(key + len(salt).to_bytes(4, "little") + salt + desc.tobytes(), digest_size=16).digest()
        keys.append(key)
    return keys

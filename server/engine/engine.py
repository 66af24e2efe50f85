"""The engine: add requests, then `step()` until they finish. One step = admit, prefill the newcomers, decode all.

Not thread-safe by itself: AsyncEngine drives it from one thread. `make_sequence` (validation and tokenization) is
safe to call from any thread, so bad input fails in the caller before it reaches the loop.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from typing import Protocol

from prompt_core.forward import logits_width
from prompt_core.layout import plan_row
from prompt_core.model import LoadedModel
from prompt_core.spec import INPUT_SLOT, PromptTensors

from .config import EngineConfig
from .constraints import GrammarCache
from .logits_processors import LogitsProcessor
from .model_runner import ModelRunner
from .request import EngineRequest, InputTooLong, InvalidRequest, RequestOutput, Sequence
from .scheduler import Scheduler

log = logging.getLogger(__name__)


class EngineObserver(Protocol):
    def step_done(self, batch_size: int, running: int, waiting: int) -> None: ...
    def request_finished(self, out: RequestOutput, tenant: str, task_key: str) -> None: ...
    # optional: grammar_compiled(kind, seconds), grammar_masked(seconds, rows), constrained_request(kind)


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None,
                 observer: EngineObserver | None = None):
        self.config = config or EngineConfig()
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.observer = observer
        self.logits_size = logits_width(loaded.model)
        self.processor = LogitsProcessor(self.logits_size, on_mask=self._hook("grammar_masked"))
        self.runner = ModelRunner(loaded.model, loaded.device, loaded.dtype, self.config.scheduler.max_batch_size,
                                  self.config.head_cache_bytes, processor=self.processor)
        self.scheduler = Scheduler(self.config.scheduler)
        eos = loaded.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        self.grammars = GrammarCache(self.tokenizer, self.logits_size, self.eos_ids,
                                     on_compile=self._hook("grammar_compiled"))
        self.max_positions = getattr(loaded.model.config, "max_position_embeddings", None)
        self.vocab_size = loaded.model.get_input_embeddings().weight.shape[0]
        self._tok_lock = threading.Lock()
        self._labels: dict[str, list[list[int]]] = {}  # verbalizer tokens per prompt key
        self._heads: dict[str, int] = {}               # static head length per prompt key

    @property
    def eos_ids(self) -> frozenset[int]:
        """Tokens that end a request (unless it asks ignore_eos) and that min_tokens holds back."""
        return self._eos_ids

    @eos_ids.setter
    def eos_ids(self, ids) -> None:
        self._eos_ids = frozenset(ids)
        self.processor.eos_ids = sorted(self._eos_ids)

    # ---- requests in
    def make_sequence(self, req: EngineRequest) -> Sequence:
        """Validate and tokenize a request. Raises InvalidRequest / InputTooLong for bad input."""
        spec = req.prompt.spec
        if req.mode == "classify" and not spec.labels:
            raise InvalidRequest(f"task {req.prompt.key} has no labels, so it cannot classify")
        if req.sampling.max_new_tokens > self.config.max_new_tokens:
            raise InputTooLong(f"max_new_tokens is {req.sampling.max_new_tokens}; this server allows at most "
                               f"{self.config.max_new_tokens}")
        if len(req.text) > 32 * self.config.max_input_tokens:  # cheap bound before tokenizing a huge text
            raise InputTooLong(f"input has {len(req.text)} characters; the limit is {self.config.max_input_tokens} "
                               f"tokens")
        self._check_logprob_fields(req)
        with self._tok_lock:
            labels = None
            if req.mode == "classify":
                labels = self._labels.get(req.prompt.key)
                if labels is None:
                    labels = [self.tokenizer(lab.verbalizer, add_special_tokens=False)["input_ids"]
                              for lab in spec.labels]
                    if len(self._labels) >= 16384:  # bounded: task versions come and go
                        self._labels.clear()
                    self._labels[req.prompt.key] = labels
            try:
                plan = plan_row(spec, self.tokenizer, req.text, with_labels=req.mode == "classify", label_ids=labels,
                                input_ids=list(req.input_ids) if req.input_ids is not None else None,
                                separate_input=req.echo)
            except ValueError as e:
                raise InvalidRequest(str(e)) from None
        if plan.prefix + plan.num_tokens > self.config.max_input_tokens:
            raise InputTooLong(f"the prompt has {plan.prefix + plan.num_tokens} tokens (virtual tokens included); the "
                               f"limit is {self.config.max_input_tokens}")
        longest = plan.prefix + plan.num_queries + req.sampling.max_new_tokens
        if self.max_positions and longest > self.max_positions:
            raise InputTooLong(f"prefix, prompt and max_new_tokens make {longest} positions; the model has "
                               f"{self.max_positions}")
        seed = req.sampling.seed if req.sampling.seed is not None else random.getrandbits(63)
        head_len = self._head_len(req.prompt)
        if req.echo and plan.input_span is not None:
            # the query before the input's first token predicts it: it must be computed, not taken from the head
            head_len = max(0, min(head_len, plan.input_span[0] - 1))
        elif req.share_prompt and req.mode == "generate" and self.config.head_cache_bytes > 0:
            # one of n choices: all of the prompt but its last token is computed once for all of them
            head_len = max(head_len, plan.num_tokens - 1)
        seq = Sequence(request=req, plan=plan, seed=seed, head_len=head_len)
        if req.mode == "generate":
            self._check_processing(seq)
        return seq

    def _check_logprob_fields(self, req: EngineRequest) -> None:
        """Token-id inputs, echo, logprobs and score mode: what fits together, within the server's limits."""
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
            if len(req.input_ids) > self.config.max_input_tokens:
                raise InputTooLong(f"the input has {len(req.input_ids)} tokens; the limit is "
                                   f"{self.config.max_input_tokens}")
            bad = [t for t in req.input_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequest(f"token id {bad[0]} is outside the model's vocabulary (0..{self.vocab_size - 1})")

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token's own text (special tokens as written), for log-probability listings."""
        with self._tok_lock:
            return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    def decode_ids(self, ids: list[int]) -> str:
        """The text of a token-id input, special tokens kept (what echo returns for it)."""
        with self._tok_lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=False)

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
            hook = self._hook("constrained_request")
            if hook is not None:
                hook(sp.constraint.kind)

    def _hook(self, name: str):
        """The observer's optional method `name`, or None."""
        return getattr(self.observer, name, None) if self.observer is not None else None

    def _head_len(self, prompt) -> int:
        """How many leading tokens every request of a task shares: its leading virtual tokens and the template
        text before the input, less the last text token, which may merge with the input under BPE."""
        n = self._heads.get(prompt.key)
        if n is None:
            n = 0
            for part in prompt.spec.parts:
                if part.virtual:
                    n += part.virtual
                    continue
                text = part.text.split(INPUT_SLOT)[0]
                if text:
                    with self._tok_lock:
                        n += max(len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) - 1, 0)
                break
            if len(self._heads) >= 16384:
                self._heads.clear()
            self._heads[prompt.key] = n
        return n

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def add_request(self, req: EngineRequest) -> Sequence:
        seq = self.make_sequence(req)
        self.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Cancel a request; it leaves the batch at the next step."""
        seq.cancelled = True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step
    def step(self) -> list[RequestOutput]:
        outputs = self._reap_cancelled()
        schedule = self.scheduler.schedule()
        if schedule.preempted:
            self.runner.release(schedule.preempted)
        if schedule.admitted:
            outputs += self._prefill(schedule.admitted)
        if self.runner.num_rows:
            outputs += self._decode()
        if self.observer:
            self.observer.step_done(self.runner.num_rows, self.scheduler.num_running, self.scheduler.num_waiting)
        return outputs

    def _prefill(self, seqs: list[Sequence]) -> list[RequestOutput]:
        now = time.monotonic()
        for s in seqs:
            s.scheduled_at = s.scheduled_at or now
        ready, outputs = [], []
        tensors: list[PromptTensors | None] = []
        for s in seqs:  # a prompt that fails to load fails its own request only
            try:
                tensors.append(s.request.prompt.load())
                ready.append(s)
            except Exception as e:  # noqa: BLE001 - reported to that request
                log.warning("prompt %s failed to load: %s", s.request.prompt.key, e)
                outputs.append(self._finish(s, "error", error=f"task prompt could not be loaded: {e}"))
        results = []
        for group in self._length_groups(ready):
            results += self._run_prefill([ready[i] for i in group], [tensors[i] for i in group], outputs)
        for s, res in results:
            if s.is_classify:
                outputs.append(self._classified(s, res))
            elif s.request.mode == "score":  # the prompt's log-probabilities are all it asked for
                outputs.append(self._finish(s, "length"))
            else:
                outputs.append(self._append_token(s, res))
        for s in ready:  # the shared prompt of n choices served the choices admitted with it; free its key/values
            if s.request.share_prompt and s.head_len > self._head_len(s.request.prompt):
                self.runner.heads.discard((s.request.prompt.key, min(s.head_len, s.prefill_plan.num_tokens - 1)))
        self._release_finished(seqs)  # finished at prefill (classified, EOS, failed) leave at once
        return outputs

    @staticmethod
    def _length_groups(seqs: list[Sequence], waste: float = 0.25) -> list[list[int]]:
        """Split a prefill into forwards of similar lengths, so padding stays under `waste` of the computed
        queries (rows are padded to the longest; one forward costs little more than its queries)."""
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].cost_tokens - seqs[i].head_len)
        groups: list[list[int]] = []
        real = 0
        for i in order:
            n = max(seqs[i].cost_tokens - seqs[i].head_len, 1)
            if groups and (len(groups[-1]) + 1) * n <= (1 + waste) * (real + n):
                groups[-1].append(i)
                real += n
            else:
                groups.append([i])
                real = n
        return groups

    def _run_prefill(self, seqs, tensors, outputs) -> list[tuple[Sequence, object]]:
        """Prefill together; if the batch fails, retry one by one so a bad request fails alone."""
        if not seqs:
            return []
        try:
            return list(zip(seqs, self.runner.prefill(seqs, tensors)))
        except Exception as e:  # noqa: BLE001
            if len(seqs) == 1:
                log.exception("prefill failed for %s", seqs[0].request_id)
                outputs.append(self._finish(seqs[0], "error", error=f"internal error: {type(e).__name__}"))
                return []
            return [r for s, t in zip(seqs, tensors) for r in self._run_prefill([s], [t], outputs)]

    def _decode(self) -> list[RequestOutput]:
        seqs = list(self.runner.seqs)
        kv_len = max(s.plan.prefix + s.plan.num_tokens + len(s.output_ids) for s in seqs)
        try:
            tokens = self.runner.decode(kv_len)
        except Exception as e:  # noqa: BLE001 - the batch state is unknown: end its requests, keep serving
            log.exception("decode step failed")
            outputs = [self._finish(s, "error", error=f"internal error: {type(e).__name__}") for s in seqs]
            self.runner.release(seqs)
            return outputs
        outputs = [self._append_token(s, t) for s, t in zip(seqs, tokens)]
        self._release_finished(seqs)
        return outputs

    # ---- post-processing
    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        self.scheduler.charge_output(seq)
        sampling = seq.request.sampling
        if seq.error is not None:  # set by the logits processor: the grammar refused the sampled token
            return self._finish(seq, "error", error=seq.error)
        if token in self.eos_ids and not sampling.ignore_eos:
            return self._finish(seq, "stop")
        seq.output_ids.append(token)
        delta = self._detokenize(seq)
        if sampling.stop and len(seq.output_ids) >= sampling.min_tokens:
            window = max(map(len, sampling.stop)) + len(delta)
            start = max(0, len(seq.text) - window)
            hits = [i for i in (seq.text.find(stop, start) for stop in sampling.stop) if i >= 0]
            if hits:
                cut = min(hits)
                delta = delta[: max(0, len(delta) - (len(seq.text) - cut))]
                seq.text = seq.text[:cut]
                return self._finish(seq, "stop", new_tokens=[token], new_text=delta, truncated=True)
        if len(seq.output_ids) >= sampling.max_new_tokens:
            return self._finish(seq, "length", new_tokens=[token], new_text=delta)
        return self._attach_logprobs(seq, RequestOutput(seq.request_id, [token], delta, finished=False))

    @staticmethod
    def _attach_logprobs(seq: Sequence, out: RequestOutput) -> RequestOutput:
        """Hand out the log-probabilities the runner recorded since the last output: the prompt's (echo) on the
        first output and again on the final one, each sampled token's (EOS included) as it comes, all on the final."""
        req = seq.request
        if seq.prompt_logprobs is not None and (out.finished or not seq.prompt_sent):
            out.prompt_logprobs = seq.prompt_logprobs
            seq.prompt_sent = True
        if req.logprobs is not None:
            out.new_logprobs = seq.output_logprobs[seq.sent_logprobs:]
            seq.sent_logprobs = len(seq.output_logprobs)
            if out.finished:
                out.logprobs = list(seq.output_logprobs)
        return out

    def _detokenize(self, seq: Sequence) -> str:
        """Incremental detokenization: only text that can no longer change is emitted (no split characters)."""
        with self._tok_lock:
            prefix = self.tokenizer.decode(seq.output_ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
            full = self.tokenizer.decode(seq.output_ids[seq.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.output_ids)
            seq.text += delta
            return delta
        return ""

    def _classified(self, seq: Sequence, scores: list[float]) -> RequestOutput:
        top = max(scores)
        exp = [math.exp(s - top) for s in scores]
        total = sum(exp)
        seq.label_scores = scores
        out = self._finish(seq, "stop")
        out.labels = [lab.name for lab in seq.request.prompt.spec.labels]
        out.label_probs = [e / total for e in exp]
        return out

    def _finish(self, seq: Sequence, reason: str, *, error: str | None = None, new_tokens: list[int] | None = None,
                new_text: str = "", truncated: bool = False) -> RequestOutput:
        seq.finish_reason, seq.error = reason, error
        if seq.output_ids and not truncated:  # flush text held back for a split character
            with self._tok_lock:
                full = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            if seq.read_offset < len(seq.output_ids) and full.endswith("\ufffd"):
                # the last character was cut by the end (max_new_tokens, EOS): its bytes are no text, so they go,
                # and only the complete characters held back with them are flushed
                full = full[:-1]
            if full.startswith(seq.text) and len(full) > len(seq.text):
                new_text += full[len(seq.text):]
                seq.text = full
        now = time.monotonic()
        out = RequestOutput(seq.request_id, new_tokens or [], new_text, finished=True, finish_reason=reason,
                            text=seq.text, prompt_tokens=seq.prompt_tokens, completion_tokens=len(seq.output_ids),
                            error=error,
                            queue_wait_s=(seq.scheduled_at or now) - seq.arrival,
                            ttft_s=(seq.first_token_at - seq.arrival) if seq.first_token_at else None)
        self._attach_logprobs(seq, out)
        if self.observer:
            self.observer.request_finished(out, seq.tenant, seq.request.prompt.key)
        return out

    def _release_finished(self, seqs) -> None:
        done = [s for s in seqs if s.finish_reason is not None]
        if done:
            self.runner.release(done)
            self.scheduler.finish(done)

    def _reap_cancelled(self) -> list[RequestOutput]:
        waiting, running = self.scheduler.cancelled()
        outputs = [self._finish(s, "cancelled") for s in waiting + running]
        self._release_finished(running)
        return outputs

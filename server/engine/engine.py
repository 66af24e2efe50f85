"""The engine: add requests, then `step()` until they finish. One step = admit, prefill the newcomers, decode all.

Requests come in through sequences.py (validation, tokenization) and tokens go out through outputs.py (text,
stop strings, finishing); the scheduler picks rows and the model runner does all tensor work. Not thread-safe by
itself: AsyncEngine drives it from one thread. `make_sequence` is safe to call from any thread, so bad input fails
in the caller before it reaches the loop.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from prompt_core.arch import UnsupportedModel
from prompt_core.forward import logits_width
from prompt_core.model import LoadedModel
from prompt_core.spec import PromptKind, PromptSpec, PromptTensors

from .compiled_decode import compile_refusal
from .config import EngineConfig
from .constraints import GrammarCache
from .logits_processors import LogitsProcessor
from .model_runner import ModelRunner
from .outputs import OutputProcessor
from .request import EngineRequest, PromptRef, RequestOutput, SamplingParams, Sequence
from .scheduler import Scheduler
from .sequences import SequenceBuilder
from .tokenizer import SharedTokenizer

log = logging.getLogger(__name__)


class EngineObserver(Protocol):
    def step_done(self, batch_size: int, running: int, waiting: int) -> None: ...
    def request_finished(self, out: RequestOutput, tenant: str, task_key: str) -> None: ...
    # optional: grammar_compiled(kind, seconds), grammar_masked(seconds, rows), constrained_request(kind)


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None,
                 observer: EngineObserver | None = None):
        self.config = config or EngineConfig()
        self.tokenizer = loaded.tokenizer
        self.observer = observer
        model = loaded.model
        if self.config.compile_decode and (reason := compile_refusal(loaded.device, loaded.quantization)):
            raise UnsupportedModel(reason)
        logits_size = logits_width(model)
        self.processor = LogitsProcessor(logits_size, on_mask=self._hook("grammar_masked"))
        self.runner = ModelRunner(model, loaded.device, loaded.dtype, self.config.scheduler.max_batch_size,
                                  self.config.head_cache_bytes, processor=self.processor,
                                  compile=self.config.compile_decode)
        self.scheduler = Scheduler(self.config.scheduler)
        self.tokens = SharedTokenizer(loaded.tokenizer)
        self.output_processor = OutputProcessor(self.tokens, on_finish=self._finished)
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        self.grammars = GrammarCache(self.tokenizer, logits_size, self.eos_ids,
                                     on_compile=self._hook("grammar_compiled"))
        self.sequence_builder = SequenceBuilder(
            self.config, self.tokens, self.grammars, vocab_size=model.get_input_embeddings().weight.shape[0],
            logits_size=logits_size, max_positions=getattr(model.config, "max_position_embeddings", None),
            on_constrained=self._constrained)

    @property
    def eos_ids(self) -> frozenset[int]:
        """Tokens that end a request (unless it asks ignore_eos) and that min_tokens holds back."""
        return self._eos_ids

    @eos_ids.setter
    def eos_ids(self, ids) -> None:
        self._eos_ids = frozenset(ids)
        self.output_processor.eos_ids = self._eos_ids
        self.processor.eos_ids = sorted(self._eos_ids)

    def warm_up(self) -> float:
        """Compile the decode step before the first request (a no-op when it runs eagerly): one request alone,
        then two together, a few tokens each. Returns the seconds it took."""
        if self.runner.compiled is None:
            return 0.0
        ref = PromptRef("warm-up", PromptSpec(PromptKind.HARD, 0, "{input}"))
        sampling = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)

        def run(batch: int) -> None:
            for i in range(batch):
                self.add_request(EngineRequest(f"warm-up-{batch}-{i}", ref, "warm up" + " again" * i,
                                               sampling=sampling))
            while self.has_work():
                self.step()

        observer, self.observer = self.observer, None  # warm-up requests are no one's traffic
        try:
            return self.runner.compiled.warm_up(run)
        finally:
            self.observer = observer

    # ---- requests in
    def make_sequence(self, req: EngineRequest) -> Sequence:
        """Validate and tokenize a request. Raises InvalidRequest / InputTooLong for bad input."""
        return self.sequence_builder.make(req)

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token's own text (special tokens as written), for log-probability listings."""
        return self.tokens.token_strings(ids)

    def decode_ids(self, ids: list[int]) -> str:
        """The text of a token-id input, special tokens kept (what echo returns for it)."""
        return self.tokens.decode(list(ids), skip_special_tokens=False)

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
                outputs.append(self.output_processor.finish(s, "error", error=f"task prompt could not be loaded: {e}"))
        results = []
        for group in self._length_groups(ready):
            results += self._run_prefill([ready[i] for i in group], [tensors[i] for i in group], outputs)
        for s, res in results:
            if s.is_classify:
                outputs.append(self.output_processor.classified(s, res))
            elif s.request.mode == "score":  # the prompt's log-probabilities are all it asked for
                outputs.append(self.output_processor.finish(s, "length"))
            else:
                outputs.append(self._sampled(s, res))
        for s in ready:  # the shared prompt of n choices served the choices admitted with it; free its key/values
            if s.request.share_prompt and s.head_len > self.sequence_builder.head_len(s.request.prompt):
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
        except Exception as e:
            if len(seqs) == 1:
                log.exception("prefill failed for %s", seqs[0].request_id)
                outputs.append(self._failed(seqs[0], e))
                return []
            return [r for s, t in zip(seqs, tensors) for r in self._run_prefill([s], [t], outputs)]

    def _decode(self) -> list[RequestOutput]:
        seqs = list(self.runner.seqs)
        kv_len = max(s.plan.prefix + s.plan.num_tokens + len(s.output_ids) for s in seqs)
        try:
            tokens = self.runner.decode(kv_len)
        except Exception as e:  # the batch state is unknown: end its requests, keep serving
            log.exception("decode step failed")
            outputs = [self._failed(s, e) for s in seqs]
            self.runner.release(seqs)
            return outputs
        outputs = [self._sampled(s, t) for s, t in zip(seqs, tokens)]
        self._release_finished(seqs)
        return outputs

    # ---- bookkeeping
    def _sampled(self, seq: Sequence, token: int) -> RequestOutput:
        """A generated token: its tenant pays for it, then it becomes output."""
        self.scheduler.charge_output(seq)
        return self.output_processor.append_token(seq, token)

    def _failed(self, seq: Sequence, e: Exception) -> RequestOutput:
        """An engine fault ends the request; the client sees its kind, the log has the traceback."""
        return self.output_processor.finish(seq, "error", error=f"internal error: {type(e).__name__}")

    def _release_finished(self, seqs) -> None:
        done = [s for s in seqs if s.finish_reason is not None]
        if done:
            self.runner.release(done)
            self.scheduler.finish(done)

    def _reap_cancelled(self) -> list[RequestOutput]:
        waiting, running = self.scheduler.cancelled()
        outputs = [self.output_processor.finish(s, "cancelled") for s in waiting + running]
        self._release_finished(running)
        return outputs

    def _finished(self, seq: Sequence, out: RequestOutput) -> None:
        if self.observer:
            self.observer.request_finished(out, seq.tenant, seq.request.prompt.key)

    def _constrained(self, kind: str) -> None:
        hook = self._hook("constrained_request")
        if hook is not None:
            hook(kind)

    def _hook(self, name: str):
        """The observer's optional method `name`, or None."""
        return getattr(self.observer, name, None) if self.observer is not None else None

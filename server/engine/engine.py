"""The engine: add requests, then `step()` until they finish. One step = schedule, run one forward, hand out tokens.

Requests come in through sequences.py (validation, tokenization) and tokens go out through outputs.py (text,
stop strings, finishing); the scheduler picks rows and the model runner does all tensor work. Not thread-safe by
itself: AsyncEngine drives it from one thread. `make_sequence` is safe to call from any thread, so bad input fails
in the caller before it reaches the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

import torch

from prompt_core.arch import UnsupportedModel, mask_layout
from prompt_core.fingerprint import model_dims
from prompt_core.forward import logits_width
from prompt_core.invariant import make_batch_invariant
from prompt_core.model import LoadedModel

from . import attention
from .attention import StepAbandoned
from .block_manager import BlockManager
from .config import CPU_KV_CACHE_BYTES, GPU_KV_CACHE_SHARE, EngineConfig
from .constraints import GrammarCache
from .kv_cache import CacheShape, PagedKVCache, plan_groups
from .logits_processors import LogitsProcessor
from .model_runner import ModelRunner
from .outputs import OutputProcessor
from .request import EngineRequest, RequestOutput, Sequence
from .scheduler import Schedule, Scheduled, Scheduler
from .sequences import SequenceBuilder
from .tokenizer import SharedTokenizer

log = logging.getLogger(__name__)


class EngineObserver(Protocol):
    def step_done(self, batch_size: int, running: int, waiting: int) -> None: ...
    def request_finished(self, out: RequestOutput, tenant: str, task_key: str) -> None: ...
    # optional: grammar_compiled(kind, seconds), grammar_masked(seconds, rows), constrained_request(kind),
    # preempted(reason), step_abandoned()


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None,
                 observer: EngineObserver | None = None):
        self.config = config or EngineConfig()
        self.tokenizer = loaded.tokenizer
        self.observer = observer
        model = loaded.model
        if self.config.compile_decode:
            raise UnsupportedModel("--compile is not available with the paged key/value cache (its compiled decode "
                                   "step was built for the slot cache, which is gone); serve without it")
        logits_size = logits_width(model)
        self.processor = LogitsProcessor(logits_size, on_mask=self._hook("grammar_masked"))
        intercept = attention.install(model)
        # every row of a step gets the bits it would get alone: the attention kernel by construction, the linear
        # layers by fixed tiles (prompt_core/invariant.py); what cannot be made so is listed here
        self.invariance_gaps = batch_invariance(loaded) if self.config.batch_invariant else ["turned off"]
        windows = layer_windows(model)
        _, layers, _, kv_heads, head_dim = model_dims(model)
        shape = CacheShape(kv_heads, head_dim, self.config.kv_block_size, loaded.dtype)
        sched = self.config.scheduler
        self.kv_budget = kv_budget(self.config, loaded.device, shape, layers)
        groups = plan_groups(windows, self.kv_budget, shape, sched.max_batch_size, sched.max_prefill_tokens)
        self.blocks = BlockManager(groups, shape.block_size, prefix_caching=self.config.prefix_caching)
        self.cache = PagedKVCache(groups, layers, shape, loaded.device)
        self.runner = ModelRunner(model, loaded.device, loaded.dtype, self.cache, shape.block_size,
                                  [g.window or 0 for g in groups], processor=self.processor,
                                  intercept_sdpa=intercept)
        self.scheduler = Scheduler(sched, self.blocks)
        # set (from any thread) when interactive work arrives: a step of batch rows alone stops at its next layer
        self.interrupt = threading.Event()
        self.abandoned_steps = 0
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
            on_constrained=self._constrained, kv_refusal=self._kv_refusal, kv_groups=len(groups))

    @property
    def eos_ids(self) -> frozenset[int]:
        """Tokens that end a request (unless it asks ignore_eos) and that min_tokens holds back."""
        return self._eos_ids

    @eos_ids.setter
    def eos_ids(self, ids) -> None:
        self._eos_ids = frozenset(ids)
        self.output_processor.eos_ids = self._eos_ids
        self.processor.eos_ids = sorted(self._eos_ids)

    @property
    def compiled(self):
        """The compiled step, or None: steps run eagerly (no compiled step with the paged cache yet)."""
        return self.runner.compiled

    @property
    def batch_invariant(self) -> bool:
        """Whether every request's tokens and log-probabilities are bit-identical whatever else is batched."""
        return not self.invariance_gaps

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Run the largest step the limits allow once before serving: a full prefill chunk, then sampling for a full
        batch with temperature and top-p. The memory their temporaries take is then part of the replica's footprint
        when it reports ready, not a surprise under the first burst. Returns the seconds it took."""
        from prompt_core.spec import PromptKind, PromptSpec

        from .request import PromptRef, SamplingParams
        from .sampler import sample

        t = time.perf_counter()
        sched = self.config.scheduler
        n = max(1, min(sched.max_prefill_tokens, self.config.max_input_tokens,
                       self.blocks.max_slots(0) - 2 * self.blocks.block_size))
        ref = PromptRef("warm-up", PromptSpec(PromptKind.HARD, 0, "{input}"))
        seq = self.make_sequence(EngineRequest("warm-up", ref, "x",
                                               sampling=SamplingParams(max_new_tokens=1, temperature=0.0)))
        seq.plan.ids, seq.plan.virt = [100 + i % 1000 for i in range(n)], [-1] * n
        observer, self.observer = self.observer, None  # warm-up work is no one's traffic
        try:
            self.add(seq)
            while self.has_work():
                self.step()
        finally:
            self.observer = observer
        rows = sched.max_batch_size
        logits = torch.randn(rows, self.processor.vocab_size, device=self.runner.device)
        full = lambda v, dt: torch.full((rows,), v, dtype=dt, device=self.runner.device)  # noqa: E731
        sample(logits, full(1.0, torch.float32), full(0, torch.long), full(0.9, torch.float32), full(1, torch.long),
               full(0, torch.long))
        return time.perf_counter() - t

    def _kv_refusal(self, slots: int) -> str | None:
        if self.blocks.fits_ever(slots, self.config.scheduler.max_prefill_tokens):
            return None
        return (f"the request can hold up to {slots} key/value slots (prompt and max_new_tokens); this server's "
                f"key/value cache holds {self.blocks.max_slots(0)} (--kv-cache-mb)")

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
        self._preempted(schedule)
        if schedule.scheduled:
            outputs += self._run(schedule.scheduled, self.interrupt.is_set if schedule.background else None)
        if self.observer:
            self.observer.step_done(len(schedule.scheduled), self.scheduler.num_running, self.scheduler.num_waiting)
        return outputs

    def _run(self, scheduled: list[Scheduled], abandon=None) -> list[RequestOutput]:
        now = time.monotonic()
        ready, outputs = [], []
        for item in scheduled:  # a prompt that fails to load fails its own request only
            s = item.seq
            s.scheduled_at = s.scheduled_at or now
            if s.tensors is None and item.start < s.plan.num_tokens:
                try:
                    s.tensors = s.request.prompt.load()
                except Exception as e:  # noqa: BLE001 - reported to that request
                    log.warning("prompt %s failed to load: %s", s.request.prompt.key, e)
                    outputs.append(self.output_processor.finish(s, "error",
                                                                error=f"task prompt could not be loaded: {e}"))
                    continue
            ready.append(item)
        try:
            results = self._forward(ready, outputs, abandon)
        except StepAbandoned:  # batch rows only, and interactive work arrived: they run again at a later step
            self.abandoned_steps += 1
            if (hook := self._hook("step_abandoned")) is not None:
                hook()
            return outputs
        for item, res in results:
            s = item.seq
            self.scheduler.advance(s, item.count)
            if s.computed >= s.plan.num_tokens:
                s.tensors = None  # the prompt is in the cache now
            if res.scores is not None:
                outputs.append(self.output_processor.classified(s, res.scores))
            elif item.completes and s.request.mode == "score":  # the prompt's log-probabilities were all it asked
                outputs.append(self.output_processor.finish(s, "length"))
            elif res.token is not None:
                outputs.append(self._sampled(s, res.token))
        self._release_finished([item.seq for item in scheduled])
        return outputs

    def _forward(self, items: list[Scheduled], outputs: list[RequestOutput], abandon=None):
        """Run together; if the step fails, run each sequence alone so a bad request fails alone."""
        if not items:
            return []
        try:
            return list(zip(items, self.runner.run(items, abandon)))
        except StepAbandoned:
            raise
        except Exception as e:
            if len(items) == 1:
                log.exception("step failed for %s", items[0].seq.request_id)
                outputs.append(self._failed(items[0].seq, e))
                return []
            return [r for item in items for r in self._forward([item], outputs)]

    def _preempted(self, schedule: Schedule) -> None:
        hook = self._hook("preempted")
        for seq, reason in schedule.preempted:
            seq.tensors = None
            if not seq.prompt_lp_done:
                seq.prompt_logprobs = None  # recomputed from the start
            if hook is not None:
                hook(reason)

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

    # ---- numbers
    def kv_stats(self) -> dict[str, int]:
        """The key/value cache in bytes (capacity, used, held by several sequences at once), the prefix cache in
        tokens (looked up, served), and preemptions by reason."""
        used = shared = 0
        for spec, pool in zip(self.blocks.groups, self.blocks.pools):
            block = self.cache.shape.block_bytes(len(spec.layers))
            used += pool.used() * block
            shared += pool.shared() * block
        st = self.blocks.stats()
        return {"capacity_bytes": self.cache.bytes(), "used_bytes": used, "shared_bytes": shared,
                "blocks": st["blocks"], "used_blocks": st["used"], "cached_blocks": st["cached"],
                "block_size": self.blocks.block_size, "prefix_queries": self.blocks.queries,
                "prefix_hits": self.blocks.hits,
                **{f"preempted_{k}": v for k, v in self.scheduler.preemptions.items()}}


def batch_invariance(loaded: LoadedModel) -> list[str]:
    """Make the model's linear layers batch-invariant where they can be; return what is not (empty: all is)."""
    from prompt_core.model import cache_root

    gaps = []
    if loaded.dtype not in attention.kernel_dtypes(loaded.device):
        gaps.append(f"attention in {str(loaded.dtype).removeprefix('torch.')} on {loaded.device.type}")
    if loaded.device.type != "cpu":
        return gaps + [f"linear layers on {loaded.device.type}"]
    return gaps + make_batch_invariant(loaded.model, cache_root() / "invariance.json")


def layer_windows(model) -> list[int | None]:
    """Each layer's attention window (None: full), as the model's own masks apply them."""
    layout = mask_layout(model.config)
    n = model.config.num_hidden_layers
    if layout.keys == (None,):
        return [layout.windows[0]] * n
    types = model.config.layer_types
    return [layout.windows[layout.keys.index(t)] for t in types]


def kv_budget(config: EngineConfig, device: torch.device, shape: CacheShape, layers: int) -> int:
    """The key/value cache's bytes: the operator's, else a share of free GPU memory, else a fixed CPU default,
    never more than the configured limits could ever fill."""
    if config.kv_cache_bytes:
        return config.kv_cache_bytes
    per_slot = shape.block_bytes(layers) // shape.block_size
    worst = config.scheduler.max_batch_size * (config.max_input_tokens + config.max_new_tokens) * per_slot
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(worst, int(free * GPU_KV_CACHE_SHARE))
    return min(worst, CPU_KV_CACHE_BYTES)

"""The engine's limits: each one defined, defaulted and validated here, once.

Settings (server/config.py) takes its defaults from these classes and builds them by name, and the scheduler and
the engine read them from here. Plain dataclasses with no imports beyond the standard library, so that parsing
the command line does not load torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

CPU_KV_CACHE_BYTES = 2 << 30   # the key/value budget on a CPU unless set (the default model: 22.5 KiB a token in bf16)
GPU_KV_CACHE_SHARE = 0.8       # on a GPU: this share of the memory free once the model is loaded


def batch_rows(share: float, max_batch_size: int) -> int:
    """Rows of batch work that may run beside interactive work, from --batch-share (the batch gate's bound and the
    scheduler's)."""
    return math.floor(share * max_batch_size)


@dataclass
class SchedulerConfig:
    max_batch_size: int = 64         # rows decoded together
    max_prefill_tokens: int = 1024   # tokens one step computes: decoding rows, then prompt chunks (longer
    #                                  prompts are split over steps, so newcomers never stall the rows that decode)
    tenant_weights: dict[str, float] = field(default_factory=dict)
    input_cost: float = 1.0
    output_cost: float = 2.0
    preempt: bool = True             # free a row for a tenant with nothing running when the batch is full
    batch_rows: int = 0              # batch-priority rows that run beside interactive ones (0: batch rows pause,
    #                                  keeping their blocks, whenever an interactive request runs or waits)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_prefill_tokens < 1:
            raise ValueError("max_batch_size and max_prefill_tokens must be positive")
        if self.batch_rows < 0:
            raise ValueError("batch_rows must be >= 0")
        if any(w <= 0 for w in self.tenant_weights.values()):
            raise ValueError("tenant weights must be positive")


@dataclass
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # batch size, prefill budget, tenants
    max_input_tokens: int = 2048    # prompt tokens of one request (template, virtual tokens and input)
    max_new_tokens: int = 1024      # the largest max_new_tokens a request may ask for
    kv_cache_bytes: int = 0            # the key/value cache's budget, allocated once at start; 0: the default
    #                                    (CPU: CPU_KV_CACHE_BYTES, capped by what the limits can use; GPU: a share of
    #                                    free memory)
    kv_block_size: int = 16            # slots per key/value block (a multiple of 16 on a CPU)
    prefix_caching: bool = True        # share full prompt blocks between requests of one task (and its static head)
    batch_invariant: bool = True       # fixed-shape linear layers: every row gets the bits it gets alone (off: plain
    #                                    torch matmuls, whose rounding depends on the batch)
    max_logprobs: int = 20             # most alternatives (top-N) a request may ask for per token
    compile_decode: bool = False       # decode through the compiled step (compiled_decode.py), after warm_up()

    def __post_init__(self) -> None:
        if self.kv_cache_bytes < 0:
            raise ValueError("kv_cache_bytes must be >= 0")
        if self.kv_block_size < 1 or self.kv_block_size % 16:
            raise ValueError("kv_block_size must be a positive multiple of 16")
        if self.max_logprobs < 0:
            raise ValueError("max_logprobs must be >= 0")
        for name in ("max_input_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")

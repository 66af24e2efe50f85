"""The engine's limits: each one defined, defaulted and validated here, once.

Settings (server/config.py) takes its defaults from these classes and builds them by name, and the scheduler and
the engine read them from here. Plain dataclasses with no imports beyond the standard library, so that parsing
the command line does not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SchedulerConfig:
    max_batch_size: int = 64         # rows decoded together
    max_prefill_tokens: int = 4096   # queries admitted into one prefill (at least one request always fits)
    tenant_weights: dict[str, float] = field(default_factory=dict)
    input_cost: float = 1.0
    output_cost: float = 2.0
    preempt: bool = True             # free a row for a tenant with nothing running when the batch is full

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_prefill_tokens < 1:
            raise ValueError("max_batch_size and max_prefill_tokens must be positive")
        if any(w <= 0 for w in self.tenant_weights.values()):
            raise ValueError("tenant weights must be positive")


@dataclass
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # batch size, prefill budget, tenants
    max_input_tokens: int = 2048    # prompt tokens of one request (template, virtual tokens and input)
    max_new_tokens: int = 1024      # the largest max_new_tokens a request may ask for
    head_cache_bytes: int = 1 << 30    # cached key/values of prompt heads (virtual tokens, fixed text); 0 disables
    max_logprobs: int = 20             # most alternatives (top-N) a request may ask for per token
    compile_decode: bool = False       # decode through the compiled step (compiled_decode.py), after warm_up()

    def __post_init__(self) -> None:
        if self.head_cache_bytes < 0:
            raise ValueError("head_cache_bytes must be >= 0")
        if self.max_logprobs < 0:
            raise ValueError("max_logprobs must be >= 0")
        for name in ("max_input_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")

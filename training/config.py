"""Training settings in one dataclass, validated once, so the loop and the CLI agree on what a run is."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from prompt_core.spec import Label

METHODS = ("prompt-tuning", "p-tuning", "prefix-tuning")
AUTO = "auto"  # search the methods and learning rates (training/search.py)
TASKS = ("generate", "classify")
INITS = ("random", "sample-vocab", "text")
ENCODERS = ("mlp", "lstm")

# Learning rates that train each method well on the 135M default model (PEFT's examples use the same order).
DEFAULT_LR = {"prompt-tuning": 3e-2, "p-tuning": 1e-3, "prefix-tuning": 1e-2}
# Through the reparameterization MLP every step moves all L*2*H*Dh outputs at once: 1e-2 left the emotion example at
# chance, 1e-3 reached 91% held-out accuracy in one epoch.
PREFIX_PROJECTION_LR = 1e-3


@dataclass
class TrainConfig:
    method: str
    task: str
    data: Path
    out: Path
    eval_data: Path | None = None
    model: str | None = None
    labels: tuple[Label, ...] = ()
    template: str = "{input}"
    virtual_tokens: int | None = None     # None: from the template's <v:N> markers, else 8
    epochs: int = 10
    lr: float | None = None               # None: DEFAULT_LR[method] (PREFIX_PROJECTION_LR with the MLP)
    batch_size: int = 8
    seed: int = 0
    init: str = "text"                    # prompt tuning (and the prefix without reparameterization)
    init_text: str | None = None          # None: the template's text with the input removed
    encoder: str = "mlp"                  # p-tuning
    encoder_hidden: int = 128             # p-tuning encoder / prefix reparameterization width
    prefix_projection: bool = False       # prefix tuning with PEFT's Embedding->Linear->Tanh->Linear
    init_from: Path | None = None         # a trained prompt.safetensors to continue (prompt or prefix tuning)
    time_budget_s: float = 1800.0         # --method auto: no new candidate once this is spent
    eval_fraction: float = 0.2            # held out of --data when --eval is absent
    patience: int = 3                     # epochs without a better held-out score before stopping
    max_steps: int | None = None          # stop (and checkpoint) after this many optimizer steps in total
    resume: bool = False
    max_new_tokens: int = 32
    device: str | None = None
    dtype: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS + (AUTO,):
            raise ValueError(f"--method must be one of {METHODS + (AUTO,)}, got {self.method!r}")
        if self.method == AUTO:
            if self.lr is not None or self.init_from is not None or self.prefix_projection:
                raise ValueError("--method auto chooses the method and learning rate itself: drop --lr, "
                                 "--init-from and --prefix-projection")
            if "<v:" in self.template:
                raise ValueError("--method auto needs a template without <v:N> anchors (only P-tuning places them)")
            if self.time_budget_s <= 0:
                raise ValueError(f"--time-budget must be positive, got {self.time_budget_s}")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.init not in INITS:
            raise ValueError(f"--init must be one of {INITS}, got {self.init!r}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"--encoder must be one of {ENCODERS}, got {self.encoder!r}")
        for name in ("epochs", "batch_size", "encoder_hidden", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        if self.lr is None and self.method == AUTO:
            pass
        elif self.lr is None:
            projected = self.method == "prefix-tuning" and self.prefix_projection
            self.lr = PREFIX_PROJECTION_LR if projected else DEFAULT_LR[self.method]
        if self.init_from is not None:
            self.init_from = Path(self.init_from)
            if self.method == "p-tuning" or self.prefix_projection:
                raise ValueError("--init-from continues a served tensor, which P-tuning's encoder and the prefix MLP "
                                 "cannot start from; use prompt-tuning or prefix-tuning without --prefix-projection")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        self.data, self.out = Path(self.data), Path(self.out)
        self.eval_data = Path(self.eval_data) if self.eval_data else None

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(data=str(self.data), out=str(self.out), eval_data=str(self.eval_data) if self.eval_data else None,
                 init_from=str(self.init_from) if self.init_from else None,
                 labels=[[lab.name, lab.verbalizer] for lab in self.labels])
        return d

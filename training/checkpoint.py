"""Resumable checkpoints in safetensors (never pickle): the method's full state, encoders included (PEFT's format
drops them), the optimizer's moments, the best prompt so far, and where in the data the run stopped."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoint"
TENSORS = "trainer.safetensors"
STATE = "state.json"


@dataclass
class TrainState:
    """Where a run stands; enough, with the seed, to continue it exactly."""
    epoch: int = 0                 # epoch in progress (or next to start)
    step_in_epoch: int = 0         # optimizer steps already done in that epoch
    global_step: int = 0
    best_score: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0            # epochs since the best held-out score (early stopping)
    finished: bool = False
    history: list[dict] = field(default_factory=list)  # per-epoch metrics


def save_checkpoint(out: Path, method: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                    best: dict[str, torch.Tensor], config: dict) -> None:
    """Written to a temporary folder and renamed, so a kill mid-write leaves the previous checkpoint intact."""
    tensors: dict[str, torch.Tensor] = {f"method.{k}": v.detach().cpu().contiguous()
                                        for k, v in method.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, pstate in opt["state"].items():
        for name, value in pstate.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    for name, value in best.items():
        tensors[f"best.{name}"] = value.detach().cpu().contiguous()
    final = Path(out) / CHECKPOINT_DIR
    tmp = final.with_name(CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / TENSORS))
    meta = {"state": asdict(state), "param_groups": opt["param_groups"], "config": config}
    (tmp / STATE).write_text(json.dumps(meta, indent=1) + "\n")
    old = final.with_name(CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


RESUME_KEYS = ("method", "task", "template", "virtual_tokens", "encoder", "encoder_hidden", "prefix_projection",
               "labels", "seed", "batch_size", "data", "eval_data", "eval_fraction")


def check_resumable(out: Path, config: dict) -> None:
    """A checkpoint continues only the run that wrote it: other settings would silently train something else."""
    path = Path(out) / CHECKPOINT_DIR / STATE
    if not path.is_file():
        raise ValueError(f"--resume: no checkpoint in {path.parent}")
    saved = json.loads(path.read_text())["config"]
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run {config.get(k)!r}"
             for k in RESUME_KEYS if saved.get(k) != config.get(k)]
    if diffs:
        raise ValueError(f"--resume: {path.parent} belongs to another run ({'; '.join(diffs)})")


def load_checkpoint(out: Path, method: torch.nn.Module, optimizer: torch.optim.Optimizer
                    ) -> tuple[TrainState, dict[str, torch.Tensor], dict]:
    """Restore method and optimizer in place; returns the state, the best tensors and the saved config."""
    folder = Path(out) / CHECKPOINT_DIR
    if not (folder / STATE).is_file():
        raise ValueError(f"--resume: no checkpoint in {folder}")
    meta = json.loads((folder / STATE).read_text())
    tensors = load_file(str(folder / TENSORS))
    device = next(method.parameters()).device
    method.load_state_dict({k[len("method."):]: v.to(device) for k, v in tensors.items() if k.startswith("method.")})
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v if name == "step" else v.to(device)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
    return TrainState(**meta["state"]), best, meta["config"]

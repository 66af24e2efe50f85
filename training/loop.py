"""The training run: data, method, optimizer, epochs with held-out scoring, early stopping, checkpoints, export.

Distribution goes through accelerate's `Accelerator` (so `accelerate launch` and `torchrun` work unchanged): each
process takes its slice of every global batch, DDP averages the prompt's gradients, every process scores the whole
held-out set (identical results, so early stopping agrees) and only the main process writes files.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from prompt_core.fingerprint import fingerprint
from prompt_core.model import load_model
from prompt_core.spec import PromptSpec
from prompt_store.peft_io import base_model_name

from .checkpoint import TrainState, check_resumable, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .curves import RunLog, plot_curves
from .data import Example, load_jsonl, split_heldout
from .evaluate import evaluate
from .export import default_task_id, export_all, make_manifest, stored_bytes
from .methods import SoftPrompt, build_method, make_spec
from .objective import Row, loss_fn, make_rows

RESULTS_NAME = "results.json"


def load_splits(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    names = {lab.name for lab in cfg.labels} if cfg.task == "classify" else None
    train = load_jsonl(cfg.data, cfg.task, names)
    if cfg.eval_data:
        return train, load_jsonl(cfg.eval_data, cfg.task, names)
    return split_heldout(train, cfg.eval_fraction, cfg.seed)


def epoch_batches(n: int, batch: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the same data."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    size = batch * world
    return [order[i:i + size] for i in range(0, n, size)]


def local_slice(global_batch: list[int], rank: int, world: int) -> list[int]:
    """This process's share; a short final batch is padded cyclically so no process gets none (DDP needs all)."""
    if len(global_batch) < world:
        global_batch = (global_batch * world)[:world]
    return global_batch[rank::world]


class Control:
    """Hooks a job runner hands the loop (the CLI passes none). The server's runner uses them to yield to serving
    between steps, checkpoint often enough to resume after a crash, report progress, and cancel (by raising from
    `before_step`)."""

    def before_step(self, run: "Run") -> bool:
        """Called before every optimizer step; False checkpoints and stops the run (to be resumed later)."""
        return True

    def after_step(self, run: "Run", loss: float) -> bool:
        """Called after every optimizer step; True writes a checkpoint now."""
        return False

    def after_epoch(self, run: "Run", record: dict) -> None:
        """Called with each epoch's held-out record, after it was checkpointed."""

    micro_batch: int | None = None     # split each batch into micro-batches of this many rows (None: one pass)

    def between_micro_batches(self, run: "Run") -> None:
        """Called between the micro-batches of one step (only when `micro_batch` splits it)."""


@dataclass
class Run:
    """What one training run holds between its phases."""
    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    tokenizer: object
    spec: PromptSpec
    method: SoftPrompt                 # the prompt module itself (state, export)
    wrapped: torch.nn.Module           # the same module as accelerate prepared it (DDP when distributed)
    optimizer: torch.optim.Optimizer
    train_rows: list[Row]
    held_rows: list[Row]
    state: TrainState
    best: dict[str, torch.Tensor]      # the method's state at the best held-out epoch
    log: RunLog
    quiet: bool
    base_model: str = ""               # what the model was loaded from: exports name it for PEFT
    control: Control = None            # hooks of a job runner (None: the CLI)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, text: str) -> None:
        if self.main and not self.quiet:
            print(text)

    def checkpoint(self) -> None:
        if self.main:
            save_checkpoint(self.cfg.out, self.method, self.optimizer, self.state, self.best, self.cfg.to_json())
        self.accelerator.wait_for_everyone()


def setup(cfg: TrainConfig, lm, accelerator: Accelerator | None, quiet: bool) -> Run:
    """Model, data, method and optimizer; restored from DIR/checkpoint with --resume."""
    accelerator = accelerator or Accelerator(cpu=cfg.device == "cpu")
    torch.manual_seed(cfg.seed)
    if lm is None:
        lm = load_model(cfg.model, device=str(accelerator.device), dtype=cfg.dtype)
    train_ex, held_ex = load_splits(cfg)
    spec = make_spec(cfg, cfg.labels)
    method = build_method(cfg, spec, lm.model, lm.tokenizer).to(accelerator.device)
    optimizer = torch.optim.AdamW(method.parameters(), lr=cfg.lr, weight_decay=0.0)
    wrapped, optimizer = accelerator.prepare(method, optimizer)
    state, best = TrainState(), {}
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        check_resumable(cfg.out, cfg.to_json())
        state, best, _ = load_checkpoint(cfg.out, method, optimizer)
    main = accelerator.is_main_process
    if main and not cfg.resume:
        (cfg.out / "config.json").write_text(json.dumps(cfg.to_json(), indent=1, default=str) + "\n")
    run = Run(cfg=cfg, accelerator=accelerator, model=lm.model, tokenizer=lm.tokenizer, spec=spec, method=method,
              wrapped=wrapped, optimizer=optimizer,
              train_rows=make_rows(spec, lm.tokenizer, train_ex, cfg.task, with_outputs=True),
              held_rows=make_rows(spec, lm.tokenizer, held_ex, cfg.task, with_outputs=False),
              state=state, best=best, log=RunLog(cfg.out, fresh=not cfg.resume, enabled=main), quiet=quiet,
              base_model=lm.source)
    world = accelerator.num_processes
    run.say(f"{cfg.method} {cfg.task}: {len(run.train_rows)} train / {len(run.held_rows)} held-out examples, "
            f"{method.num_trainable():,} trained parameters, {world} process(es)"
            + (f" ({accelerator.state.backend})" if world > 1 else ""))
    return run


def train_epoch(run: Run) -> list[float] | None:
    """The optimizer steps of the current epoch (from where a resumed run stopped). Returns the step losses, or
    None when --max-steps stopped the run mid-epoch (after checkpointing)."""
    cfg, state, acc = run.cfg, run.state, run.accelerator
    world, rank = acc.num_processes, acc.process_index
    batches = epoch_batches(len(run.train_rows), cfg.batch_size, world, cfg.seed, state.epoch)
    total_steps = len(batches) * cfg.epochs
    compute = loss_fn(cfg.task)
    losses: list[float] = []
    bar = tqdm(total=len(batches), initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
               disable=not run.main or run.quiet, leave=False)
    try:
        for b in range(state.step_in_epoch, len(batches)):
            if run.control is not None and not run.control.before_step(run):
                run.checkpoint()
                return None
            rows = [run.train_rows[i] for i in local_slice(batches[b], rank, world)]
            for group in run.optimizer.param_groups:  # linear decay, a function of the step alone: resumes exactly
                group["lr"] = cfg.lr * (1.0 - state.global_step / total_steps)
            loss = step_loss(run, rows, compute)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            value = acc.reduce(loss.detach(), reduction="mean").item()
            losses.append(value)
            state.step_in_epoch, state.global_step = b + 1, state.global_step + 1
            run.log.write(type="step", epoch=state.epoch + 1, step=state.global_step, loss=value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if run.control is not None and run.control.after_step(run, value):
                run.checkpoint()
            if cfg.max_steps is not None and state.global_step >= cfg.max_steps and b + 1 < len(batches):
                run.checkpoint()
                return None
    finally:
        bar.close()
    return losses


def step_loss(run: Run, rows: list[Row], compute) -> torch.Tensor:
    """Forward and backward of one batch. A job runner may split it into micro-batches (`control.micro_batch`
    rows each, gradients accumulated, each weighted by its share of the batch's loss terms: rows for classify,
    output tokens for generate), so that serving waits for at most one micro-batch; the CLI does one pass."""
    size = getattr(run.control, "micro_batch", None)
    if not size or len(rows) <= size:
        virtual, prefix = run.wrapped()
        loss = compute(run.model, rows, virtual, prefix)
        run.accelerator.backward(loss)
        return loss
    weights = [r.num_output if run.cfg.task == "generate" else 1 for r in rows]
    total = float(sum(weights))
    loss_sum = None
    for i in range(0, len(rows), size):
        if i:
            run.control.between_micro_batches(run)
        virtual, prefix = run.wrapped()
        part = compute(run.model, rows[i:i + size], virtual, prefix) * (sum(weights[i:i + size]) / total)
        run.accelerator.backward(part)
        loss_sum = part.detach() if loss_sum is None else loss_sum + part.detach()
    return loss_sum


def end_epoch(run: Run, losses: list[float]) -> None:
    """Score the held-out set, keep the best prompt, decide on early stopping, checkpoint."""
    cfg, state = run.cfg, run.state
    with torch.no_grad():
        virtual, prefix = run.method()
        metrics = evaluate(run.model, run.tokenizer, run.held_rows, cfg.task, virtual, prefix, cfg.batch_size * 2,
                           cfg.max_new_tokens)
    state.epoch, state.step_in_epoch = state.epoch + 1, 0
    record = {k: v for k, v in metrics.items() if k != "predictions"}
    record.update(epoch=state.epoch, step=state.global_step,
                  train_loss=sum(losses) / len(losses) if losses else float("nan"))
    state.history.append(record)
    run.log.write(type="epoch", **record)
    if state.best_score is None or metrics["score"] > state.best_score:
        state.best_score, state.best_epoch, state.bad_epochs = metrics["score"], state.epoch, 0
        run.best = {k: v.detach().cpu().clone() for k, v in run.method.state_dict().items()}
    else:
        state.bad_epochs += 1
    shown = ", ".join(f"{k} {v:.1f}" for k, v in record.items() if k in ("accuracy", "exact_match", "token_f1"))
    run.say(f"epoch {state.epoch}: train loss {record['train_loss']:.4f}, held-out {shown}")
    state.finished = state.bad_epochs >= cfg.patience or state.epoch >= cfg.epochs
    run.checkpoint()
    if run.control is not None:
        run.control.after_epoch(run, record)


def export(run: Run, seconds: float) -> dict:
    """Write the best epoch's prompt (encoders applied once, then dropped), results.json and the curves."""
    cfg, state, method = run.cfg, run.state, run.method
    method.load_state_dict({k: v.to(run.accelerator.device) for k, v in run.best.items()})
    tensors = method.export_tensors()
    result: dict = {}
    if run.main:
        fp = fingerprint(run.model)
        manifest = make_manifest(run.spec, cfg.task, fp, cfg.extra.get("task_id") or default_task_id(cfg.out),
                                 cfg.extra.get("description") or f"{cfg.method} ({cfg.task})", cfg.max_new_tokens)
        export_all(cfg.out, manifest, tensors, method.peft_representable, fp,
                   base_model=base_model_name(run.base_model))
        result = {
            "method": cfg.method, "task": cfg.task, "best_epoch": state.best_epoch, "best_score": state.best_score,
            "history": state.history, "stopped_early": state.bad_epochs >= cfg.patience, "epochs_run": state.epoch,
            "train_seconds": round(seconds, 1), "trained_parameters": method.num_trainable(),
            "stored_bytes": stored_bytes(cfg.out), "peft_export": method.peft_representable,
            "train_examples": len(run.train_rows), "heldout_examples": len(run.held_rows), "finished": True,
            "resumed": cfg.resume,  # a resumed run's time is only its own part
        }
        (cfg.out / RESULTS_NAME).write_text(json.dumps(result, indent=1) + "\n")
        plot_curves(cfg.out, f"{cfg.method} on {cfg.data.parent.name}/{cfg.data.name}")
    run.accelerator.wait_for_everyone()
    return result


def train(cfg: TrainConfig, *, lm=None, accelerator: Accelerator | None = None, quiet: bool = False,
          control: Control | None = None) -> dict:
    """Run (or resume) training and export the best prompt. `lm` lets tests (and the server) pass a loaded model.
    Returns the results (empty on processes other than the main one), or {"stopped_at_step", "finished": False}
    after --max-steps or when `control` paused the run."""
    t_start = time.perf_counter()
    run = setup(cfg, lm, accelerator, quiet)
    run.control = control
    while not run.state.finished and run.state.epoch < cfg.epochs:
        losses = train_epoch(run)
        if losses is None:
            return {"stopped_at_step": run.state.global_step, "finished": False}
        end_epoch(run, losses)
        if cfg.max_steps is not None and run.state.global_step >= cfg.max_steps and not run.state.finished:
            return {"stopped_at_step": run.state.global_step, "finished": False}
    return export(run, time.perf_counter() - t_start)

"""The training run: data, method, optimizer, epochs with held-out scoring, early stopping, checkpoints, export.

Distribution goes through accelerate's `Accelerator` (so `accelerate launch` and `torchrun` work unchanged): each
process takes its slice of every global batch, DDP averages the prompt's gradients, every process scores the whole
held-out set (identical results, so early stopping agrees) and only the main process writes files.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from prompt_core.fingerprint import fingerprint
from prompt_core.model import load_model

from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .curves import RunLog, plot_curves
from .data import Example, load_jsonl, split_heldout
from .evaluate import evaluate
from .export import default_task_id, export_all, make_manifest, stored_bytes
from .methods import build_method, make_spec
from .objective import loss_fn, make_rows

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


def train(cfg: TrainConfig, *, lm=None, accelerator: Accelerator | None = None, quiet: bool = False) -> dict:
    """Run (or resume) training and export the best prompt. `lm` lets tests pass a tiny model."""
    t_start = time.perf_counter()
    accelerator = accelerator or Accelerator(cpu=cfg.device == "cpu")
    main = accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    if lm is None:
        lm = load_model(cfg.model, device=str(accelerator.device), dtype=cfg.dtype)
    model, tokenizer = lm.model, lm.tokenizer
    train_ex, held_ex = load_splits(cfg)
    spec = make_spec(cfg, cfg.labels)
    train_rows = make_rows(spec, tokenizer, train_ex, cfg.task, with_outputs=True)
    held_rows = make_rows(spec, tokenizer, held_ex, cfg.task, with_outputs=False)
    method = build_method(cfg, spec, model, tokenizer).to(accelerator.device)
    optimizer = torch.optim.AdamW(method.parameters(), lr=cfg.lr, weight_decay=0.0)
    wrapped, optimizer = accelerator.prepare(method, optimizer)

    state, best = TrainState(), {}
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        state, best, _ = load_checkpoint(cfg.out, method, optimizer)
    log = RunLog(cfg.out, fresh=not cfg.resume, enabled=main)
    if main and not cfg.resume:
        (cfg.out / "config.json").write_text(json.dumps(cfg.to_json(), indent=1, default=str) + "\n")
    compute = loss_fn(cfg.task)
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = math.ceil(len(train_rows) / (cfg.batch_size * world))
    total_steps = steps_per_epoch * cfg.epochs
    if main and not quiet:
        print(f"{cfg.method} {cfg.task}: {len(train_rows)} train / {len(held_rows)} held-out examples, "
              f"{method.num_trainable():,} trained parameters, {world} process(es)"
              + (f" ({accelerator.state.backend})" if world > 1 else ""))

    def score(tag: str) -> dict:
        with torch.no_grad():
            virtual, prefix = method()
            return evaluate(model, tokenizer, held_rows, cfg.task, virtual, prefix, cfg.batch_size * 2,
                            cfg.max_new_tokens)

    def checkpoint() -> None:
        if main:
            save_checkpoint(cfg.out, method, optimizer, state, best, cfg.to_json())
        accelerator.wait_for_everyone()

    stopped_early = False
    while state.epoch < cfg.epochs and not state.finished:
        batches = epoch_batches(len(train_rows), cfg.batch_size, world, cfg.seed, state.epoch)
        losses: list[float] = []
        bar = tqdm(total=len(batches), initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
                   disable=not main or quiet, leave=False)
        for b in range(state.step_in_epoch, len(batches)):
            rows = [train_rows[i] for i in local_slice(batches[b], rank, world)]
            for group in optimizer.param_groups:  # linear decay, a function of the step alone: resumes exactly
                group["lr"] = cfg.lr * (1.0 - state.global_step / total_steps)
            virtual, prefix = wrapped()
            loss = compute(model, rows, virtual, prefix)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = accelerator.reduce(loss.detach(), reduction="mean").item()
            losses.append(value)
            state.step_in_epoch, state.global_step = b + 1, state.global_step + 1
            log.write(type="step", epoch=state.epoch + 1, step=state.global_step, loss=value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if cfg.max_steps is not None and state.global_step >= cfg.max_steps and b + 1 < len(batches):
                bar.close()
                checkpoint()
                return {"stopped_at_step": state.global_step, "finished": False}
        bar.close()
        metrics = score("held-out")
        state.epoch += 1
        state.step_in_epoch = 0
        record = {k: v for k, v in metrics.items() if k != "predictions"}
        record.update(epoch=state.epoch, step=state.global_step,
                      train_loss=sum(losses) / max(1, len(losses)) if losses else float("nan"))
        state.history.append(record)
        log.write(type="epoch", **record)
        if state.best_score is None or metrics["score"] > state.best_score:
            state.best_score, state.best_epoch, state.bad_epochs = metrics["score"], state.epoch, 0
            best = {k: v.detach().cpu().clone() for k, v in method.state_dict().items()}
        else:
            state.bad_epochs += 1
        if main and not quiet:
            shown = ", ".join(f"{k} {v:.1f}" for k, v in record.items() if k in ("accuracy", "exact_match", "token_f1"))
            print(f"epoch {state.epoch}: train loss {record['train_loss']:.4f}, held-out {shown}")
        if state.bad_epochs >= cfg.patience:
            stopped_early = True
            state.finished = True
        if cfg.max_steps is not None and state.global_step >= cfg.max_steps and state.epoch < cfg.epochs:
            checkpoint()
            return {"stopped_at_step": state.global_step, "finished": False}
        checkpoint()
    state.finished = True
    checkpoint()

    # Export the best epoch's prompt: encoders applied once, then dropped.
    method.load_state_dict({k: v.to(accelerator.device) for k, v in best.items()})
    tensors = method.export_tensors()
    fp = fingerprint(model)
    result: dict = {}
    if main:
        manifest = make_manifest(spec, cfg.task, fp, cfg.extra.get("task_id") or default_task_id(cfg.out),
                                 cfg.extra.get("description", f"{cfg.method} ({cfg.task})"), cfg.max_new_tokens)
        export_all(cfg.out, manifest, tensors, method.peft_representable, fp, base_model=str(cfg.model or ""))
        result = {
            "method": cfg.method, "task": cfg.task, "best_epoch": state.best_epoch, "best_score": state.best_score,
            "history": state.history, "stopped_early": stopped_early, "epochs_run": state.epoch,
            "train_seconds": round(time.perf_counter() - t_start, 1), "trained_parameters": method.num_trainable(),
            "stored_bytes": stored_bytes(cfg.out), "peft_export": method.peft_representable,
            "train_examples": len(train_rows), "heldout_examples": len(held_rows), "finished": True,
        }
        if cfg.resume:  # a resumed run's wall time is only its own part
            result["resumed"] = True
        (cfg.out / RESULTS_NAME).write_text(json.dumps(result, indent=1) + "\n")
        plot_curves(cfg.out, f"{cfg.method} on {cfg.data.name}")
    accelerator.wait_for_everyone()
    return result

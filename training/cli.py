"""`python -m training train ...` and `python -m training eval ...`: the contract scripts depend on (docs/training.md).

User errors (bad data, bad flags, a failed push) print one line `error: ...` and exit with status 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import AUTO, ENCODERS, INITS, METHODS, TASKS, TrainConfig
from .data import load_jsonl, resolve_labels


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a soft prompt and write DIR (artifact, DIR/peft, log, curves)")
    p.add_argument("--method", required=True, choices=METHODS + (AUTO,),
                   help="auto: try the methods and a few learning rates, keep the best on the held-out split")
    p.add_argument("--time-budget", type=float, default=1800.0,
                   help="seconds for --method auto: no new candidate starts once they are spent")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--eval", dest="eval_data", help="held-out JSONL (default: a split carried off --data)")
    p.add_argument("--out", required=True, help="output folder DIR")
    p.add_argument("--model", help="base model path or id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--labels", help="comma-separated label names (verbalizer ' <name>')")
    p.add_argument("--verbalizers", help="JSON file mapping label name -> verbalizer text")
    p.add_argument("--template", default="{input}", help="template with one {input}; <v:N> anchors for p-tuning")
    p.add_argument("--virtual-tokens", type=int, help="T (default: the template's <v:N> total, else 8)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, help="default 3e-2 prompt tuning, 1e-3 p-tuning, 1e-2 prefix tuning "
                                             "(1e-3 with --prefix-projection)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", choices=INITS, default="text", help="prompt tuning / prefix init (default text)")
    p.add_argument("--init-text", help="text for --init text (default: the template's words)")
    p.add_argument("--encoder", choices=ENCODERS, default="mlp", help="p-tuning prompt encoder")
    p.add_argument("--encoder-hidden", type=int, default=128, help="encoder / reparameterization width")
    p.add_argument("--prefix-projection", action="store_true", help="prefix tuning through PEFT's MLP")
    p.add_argument("--init-from", help="prompt.safetensors of a trained prompt to continue (prompt or prefix tuning)")
    p.add_argument("--eval-fraction", type=float, default=0.2, help="held-out share of --data without --eval")
    p.add_argument("--patience", type=int, default=3, help="epochs without improvement before stopping")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (resume later)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy decoding length for generate eval")
    p.add_argument("--device", help="cpu, cuda, ... (default: what accelerate picks)")
    p.add_argument("--dtype", help="float32, bfloat16, ... (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--description", default="")
    p.add_argument("--push", metavar="URL", help="upload DIR to URL/v1/tasks when training ends")
    p.add_argument("--api-key")
    p.add_argument("--task-id", help="task id in the manifest and for --push (default: DIR's name)")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a trained DIR, or a hard prompt (--template alone), on a JSONL file")
    p.add_argument("--prompt", help="a trained DIR (native artifact)")
    p.add_argument("--template", help="hard-prompt baseline: the template, with one {input}")
    p.add_argument("--data", required=True)
    p.add_argument("--task", choices=TASKS, help="hard prompt only (default: guessed from --labels and the data)")
    p.add_argument("--labels")
    p.add_argument("--verbalizers")
    p.add_argument("--model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--json-out", help="also write the metrics (and predictions) to this JSON file")


def _worker_parser(sub) -> None:
    import os

    env = lambda name: os.environ.get(f"PROMPTSERVE_{name}") or None  # noqa: E731 - the server's variables
    p = sub.add_parser("worker", help="train the queued fine-tuning jobs of a shared store (scale-out)",
                       description="Defaults come from the server's PROMPTSERVE_STORE, _MODEL, _DEVICE, _DTYPE and "
                                   "_THREADS variables, so a worker can share the servers' configuration.")
    p.add_argument("--store", default=env("STORE"), help="the servers' prompt store directory (shared)")
    p.add_argument("--model", default=env("MODEL"), help="base model path or id (default: the embedded model)")
    p.add_argument("--device", default=env("DEVICE"))
    p.add_argument("--dtype", default=env("DTYPE"))
    p.add_argument("--threads", type=int, default=int(env("THREADS") or 0), help="torch CPU threads (0: default)")
    p.add_argument("--lease-s", type=float, default=60.0, help="a job whose worker is silent this long moves on")
    p.add_argument("--checkpoint-s", type=float, default=30.0, help="checkpoint a job at least this often")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _worker_parser(sub)
    return parser


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    labels = ()
    if a.task == "classify":
        examples = None if (a.labels or a.verbalizers) else load_jsonl(a.data, "classify")
        labels = resolve_labels(a.labels, a.verbalizers, examples)
    elif a.labels or a.verbalizers:
        raise ValueError("--labels/--verbalizers are for --task classify")
    if a.push and not (a.api_key and a.push.startswith(("http://", "https://"))):
        raise ValueError("--push needs an http(s) URL and --api-key")
    extra = {"task_id": a.task_id, "description": a.description}
    return TrainConfig(method=a.method, task=a.task, data=a.data, out=a.out, eval_data=a.eval_data, model=a.model,
                       labels=labels, template=a.template, virtual_tokens=a.virtual_tokens, epochs=a.epochs,
                       lr=a.lr, batch_size=a.batch_size, seed=a.seed, init=a.init, init_text=a.init_text,
                       encoder=a.encoder, encoder_hidden=a.encoder_hidden, prefix_projection=a.prefix_projection,
                       init_from=a.init_from, time_budget_s=a.time_budget,
                       eval_fraction=a.eval_fraction, patience=a.patience, max_steps=a.max_steps, resume=a.resume,
                       max_new_tokens=a.max_new_tokens, device=a.device, dtype=a.dtype, extra=extra)


def cmd_train(a: argparse.Namespace) -> int:
    from .export import default_task_id
    from .loop import train
    from .push import metadata_from_manifest, push

    cfg = config_from_args(a)
    if cfg.method == AUTO:
        from prompt_core.model import load_model

        from .search import search
        result = search(cfg, lm=load_model(cfg.model, device=cfg.device, dtype=cfg.dtype))
    else:
        result = train(cfg)
    if not result:  # not the main process
        return 0
    if not result.get("finished"):
        print(f"stopped at step {result['stopped_at_step']}; continue with --resume")
        if a.push:  # nothing is exported before training ends, so there is nothing to push yet: say so
            print(f"not pushed: training stopped at step {result['stopped_at_step']} before its end; the same "
                  f"command with --resume pushes to {a.push} when it finishes", file=sys.stderr)
        return 0
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=1))
    if a.push:
        task_id = a.task_id or default_task_id(cfg.out)
        manifest = json.loads((cfg.out / "task.json").read_text())
        answer = push(cfg.out, a.push, a.api_key, task_id, metadata=metadata_from_manifest(manifest))
        print(f"pushed {task_id} to {a.push}: {json.dumps(answer)}")
    return 0


def _guess_task(a: argparse.Namespace) -> str:
    if a.task:
        return a.task
    if a.labels or a.verbalizers:
        return "classify"
    with open(a.data, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        return "classify" if "label" in json.loads(first) else "generate"
    except json.JSONDecodeError:
        raise ValueError(f"{a.data}:1: not valid JSON") from None


def cmd_eval(a: argparse.Namespace) -> int:
    from prompt_core.model import load_model

    from .score import artifact_eval, hard_prompt_eval

    if bool(a.prompt) == bool(a.template):
        raise ValueError("eval needs --prompt DIR or --template (a hard prompt), exactly one")
    if not Path(a.data).is_file():
        raise ValueError(f"{a.data}: no such data file")
    lm = load_model(a.model, device=a.device, dtype=a.dtype)
    t0 = time.perf_counter()
    if a.prompt:
        metrics = artifact_eval(a.prompt, a.data, lm, a.batch_size, a.max_new_tokens)
    else:
        task = _guess_task(a)
        labels = ()
        if task == "classify":
            labels = resolve_labels(a.labels, a.verbalizers,
                                    None if (a.labels or a.verbalizers) else load_jsonl(a.data, "classify"))
        metrics = hard_prompt_eval(a.template, task, labels, a.data, lm, a.batch_size, a.max_new_tokens)
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({k: v for k, v in metrics.items() if k != "predictions"}))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(metrics, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        import logging

        if not args.store:
            print("error: worker needs --store DIR (or PROMPTSERVE_STORE)", file=sys.stderr)
            return 2
        from .worker import run_worker
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run_worker(Path(args.store), args.model, args.device, args.dtype, args.threads, args.lease_s,
                   args.checkpoint_s)
        return 0
    try:
        return cmd_train(args) if args.command == "train" else cmd_eval(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

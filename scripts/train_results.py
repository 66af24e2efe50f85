"""Regenerate the results table in docs/training.md: every method and the zero-shot hard prompt on the two example
data sets, on the default model, through `python -m training` exactly as a user runs it.

    .venv/bin/python -m scripts.train_results [--tasks emotion,people] [--methods prompt-tuning,p-tuning,...]

Runs go to ~/.cache/promptserve/train-results/<task>/<method>/ ($PROMPTSERVE_RESULTS overrides); each soft prompt is
trained on train.jsonl (with the held-out split carried off it for early stopping) and scored once on test.jsonl; the
hard prompt is scored on the same test.jsonl in the same harness. The table is written between the RESULTS markers in
docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "training" / "examples"
DOC = ROOT / "docs" / "training.md"
RUNS = Path(os.environ.get("PROMPTSERVE_RESULTS", Path.home() / ".cache" / "promptserve" / "train-results"))

TASKS = {
    "emotion": dict(task="classify", metric="accuracy", labels="joy,anger,fear,sadness",
                    hard="Sentence: {input}\nEmotion (joy, anger, fear or sadness):",
                    soft="Sentence: {input}\nEmotion:", anchored="<v:4> Sentence: {input}\n<v:4> Emotion:",
                    train=["--epochs", "2", "--batch-size", "8"]),
    "people": dict(task="generate", metric="exact_match", labels=None,
                   hard="<|im_start|>user\nRewrite the text as: Name | City | Age\nText: {input}<|im_end|>\n"
                        "<|im_start|>assistant\n",
                   soft="Text: {input}\nAnswer:", anchored="<v:4> Text: {input}\n<v:4> Answer:",
                   train=["--epochs", "3", "--batch-size", "8", "--max-new-tokens", "12"]),
}
METHODS = {  # name -> extra train arguments
    "prompt-tuning": ["--method", "prompt-tuning", "--virtual-tokens", "8", "--init", "text"],
    "p-tuning": ["--method", "p-tuning", "--virtual-tokens", "8", "--encoder", "mlp"],
    "p-tuning-lr5e-3": ["--method", "p-tuning", "--virtual-tokens", "8", "--encoder", "mlp", "--lr", "5e-3"],
    "p-tuning-anchors-lstm": ["--method", "p-tuning", "--encoder", "lstm", "--template", "{anchored}", "--lr", "5e-3"],
    "prefix-tuning": ["--method", "prefix-tuning", "--virtual-tokens", "8"],
    "prefix-tuning-mlp": ["--method", "prefix-tuning", "--virtual-tokens", "8", "--prefix-projection"],
}
DEFAULT_METHODS = "prompt-tuning,p-tuning,prefix-tuning"
HARD = "hard prompt (zero-shot)"
PY = [sys.executable, "-m", "training"]
THREADS = 1  # one thread per process: on a shared 2-core machine, two spinning threads per op cost 10x


def run(cmd: list[str]) -> dict:
    """Run one CLI command; return the last JSON object it printed."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    text = proc.stdout.strip()
    start = text.rfind("\n{")
    return json.loads(text[start + 1:] if start >= 0 else text[text.find("{"):])


def eval_args(name: str) -> list[str]:
    t = TASKS[name]
    args = ["--data", str(EXAMPLES / name / "test.jsonl"), "--batch-size", "32"]
    return args + (["--labels", t["labels"]] if t["labels"] else ["--max-new-tokens", "12"])


def hard_artifact_bytes(name: str) -> int:
    """The stored size of the hard prompt: its task.json, written by prompt_store as for any task."""
    import tempfile

    from prompt_store.format import MANIFEST_NAME, TaskManifest, write_artifact

    t = TASKS[name]
    labels = [{"name": x, "verbalizer": f" {x}"} for x in (t["labels"] or "").split(",") if x]
    manifest = TaskManifest(id=name, version=1, tenant="", visibility="private", kind="hard", num_virtual_tokens=0,
                            template=t["hard"], labels=labels, task_type=t["task"])
    with tempfile.TemporaryDirectory() as tmp:
        write_artifact(Path(tmp), manifest, None)
        return (Path(tmp) / MANIFEST_NAME).stat().st_size


def one_task(name: str, methods: list[str]) -> list[dict]:
    t = TASKS[name]
    rows = []
    t0 = time.perf_counter()
    hard = run(PY + ["eval", "--template", t["hard"], "--task", t["task"]] + eval_args(name))
    rows.append(dict(method=HARD, score=hard["score"], f1=hard.get("token_f1"), seconds=0.0,
                     params=0, bytes=hard_artifact_bytes(name), eval_s=time.perf_counter() - t0))
    print(name, rows[-1], flush=True)
    for m in methods:
        out = RUNS / name / m
        args = [a.replace("{anchored}", t["anchored"]) for a in METHODS[m]]
        cmd = PY + ["train", "--task", t["task"], "--data", str(EXAMPLES / name / "train.jsonl"), "--out", str(out),
                    "--template", t["soft"]] + args + t["train"]
        if t["labels"]:
            cmd += ["--labels", t["labels"]]
        t0 = time.perf_counter()
        result = run(cmd)
        seconds = time.perf_counter() - t0
        test = run(PY + ["eval", "--prompt", str(out)] + eval_args(name))
        rows.append(dict(method=m, score=test["score"], f1=test.get("token_f1"), seconds=seconds,
                         params=result["trained_parameters"], bytes=result["stored_bytes"],
                         heldout=result["best_score"], epochs=result["epochs_run"]))
        print(name, rows[-1], flush=True)
    return rows


def merged(name: str, rows: list[dict]) -> list[dict]:
    """New rows replace stored ones of the same method, so variants can be measured in a later, separate run."""
    path = RUNS / f"{name}.json"
    old = json.loads(path.read_text()) if path.is_file() else []
    by_method = {r["method"]: r for r in old} | {r["method"]: r for r in rows}
    order = [HARD] + list(METHODS)
    out = sorted(by_method.values(), key=lambda r: order.index(r["method"]) if r["method"] in order else 99)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


def table(name: str, rows: list[dict]) -> str:
    t = TASKS[name]
    metric = "accuracy %" if t["task"] == "classify" else "exact match % (token F1 %)"
    lines = [f"**{name}** ({t['task']}; test.jsonl, {metric})", "",
             "| method | test score | best held-out score | training time | trained parameters | stored size |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        score = f"{r['score']:.1f}" + (f" ({r['f1']:.1f})" if r.get("f1") is not None else "")
        held = f"{r['heldout']:.1f} (epochs {r['epochs']})" if "heldout" in r else "n/a"
        secs = f"{r['seconds']:.0f} s" if r["seconds"] else "none"
        lines.append(f"| {r['method']} | {score} | {held} | {secs} | {r['params']:,} | {r['bytes'] / 1024:.1f} KiB |")
    return "\n".join(lines)


def legend() -> str:
    lines = ["Flags per method (besides `--task`, `--data`, `--out`, `--labels` and the per-task ones: emotion "
             f"`{' '.join(TASKS['emotion']['train'])}`, people `{' '.join(TASKS['people']['train'])}`; "
             "the soft prompts' template is `--template` below or the task's plain one):", ""]
    for name, args in METHODS.items():
        lines.append(f"- {name}: `{' '.join(a if a != '{anchored}' else '<anchored template>' for a in args)}`")
    lines += ["", "Templates (JSON strings):", ""]
    for name, t in TASKS.items():
        lines.append(f"- {name}: hard `{json.dumps(t['hard'])}`, soft `{json.dumps(t['soft'])}`, "
                     f"anchored `{json.dumps(t['anchored'])}`")
    return "\n".join(lines)


def write_doc(sections: list[str]) -> None:
    doc = DOC.read_text()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = (f"<!-- RESULTS START -->\nMeasured {stamp} on this machine (2 shared CPU cores, fp32), default model.\n\n"
             + "\n\n".join(sections) + "\n\n" + legend() + "\n<!-- RESULTS END -->")
    new, n = re.subn(r"<!-- RESULTS START -->.*?<!-- RESULTS END -->", lambda _: block, doc, flags=re.S)
    DOC.write_text(new if n else doc + "\n" + block + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="emotion,people")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"any of {sorted(METHODS)}")
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads per run (OMP_NUM_THREADS)")
    a = p.parse_args()
    globals()["THREADS"] = a.threads
    for name in a.tasks.split(","):
        merged(name, one_task(name, a.methods.split(",")))
        write_doc([table(n, json.loads((RUNS / f"{n}.json").read_text())) for n in TASKS
                   if (RUNS / f"{n}.json").is_file()])


if __name__ == "__main__":
    main()

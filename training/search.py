"""`--method auto` (and a job's `method.type: "auto"`): try the methods and a small learning-rate range on the same
held-out split within a time budget, keep the best by the held-out metric, and record every candidate's score.

Each candidate is an ordinary run of training.loop.train in DIR/candidates/<n>-<method>-lr<rate>, so it checkpoints
and resumes like any run: a finished candidate (its results.json) is never trained again, and a paused search
continues with the candidate it was in. Candidates are tried in order of how well they did on the shipped examples
(docs/training.md); a candidate is not started once the budget is spent or too small for one more candidate
of the average length so far (the first always runs). The winner's artifact is copied to DIR, so DIR looks like any
run's output, with the search in results.json.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from .config import TrainConfig
from .export import ARTIFACT_FILES, PEFT_DIR
from .loop import RESULTS_NAME, Control, train

# (method, learning rate), best first: prefix tuning led generation on the examples, all methods tie on classify
CANDIDATES = {
    "classify": [("prompt-tuning", 3e-2), ("prefix-tuning", 1e-2), ("prompt-tuning", 1e-1), ("p-tuning", 5e-3),
                 ("prefix-tuning", 3e-3), ("prompt-tuning", 1e-2)],
    "generate": [("prefix-tuning", 1e-2), ("prompt-tuning", 3e-2), ("prefix-tuning", 3e-3), ("prompt-tuning", 1e-1),
                 ("p-tuning", 5e-3), ("prefix-tuning", 3e-2)],
}
CANDIDATES_DIR = "candidates"


def candidate_name(i: int, method: str, lr: float) -> str:
    return f"{i + 1}-{method}-lr{lr:g}"


def search(cfg: TrainConfig, *, lm=None, quiet: bool = False, control: Control | None = None,
           on_candidate=None) -> dict:
    """Returns the winner's results plus {"method": "auto", "winner", "candidates", "search_seconds"}, or
    {"finished": False, ...} when `control` paused it (resume by calling again with the same DIR)."""
    budget = cfg.time_budget_s
    out = Path(cfg.out)
    rows: list[dict] = []
    spent = 0.0            # seconds of finished candidates (from their results, so it survives a resume)
    for i, (method, lr) in enumerate(CANDIDATES[cfg.task]):
        name = candidate_name(i, method, lr)
        cdir = out / CANDIDATES_DIR / name
        done = cdir / RESULTS_NAME
        if done.is_file():
            result = json.loads(done.read_text())
        else:
            finished = [r for r in rows if r["status"] == "done"]
            mean = sum(r["seconds"] for r in finished) / len(finished) if finished else 0.0
            if finished and spent + mean > budget:
                rows.append({"name": name, "method": method, "lr": lr, "status": "skipped (time budget)",
                             "score": None, "seconds": 0.0})
                continue
            resume = (cdir / "checkpoint" / "state.json").is_file()
            sub = replace(cfg, method=method, lr=lr, out=cdir, resume=resume, prefix_projection=False,
                          time_budget_s=budget)
            t0 = time.perf_counter()
            result = train(sub, lm=lm, quiet=True, control=control)
            if not result.get("finished"):
                return {"finished": False, "stopped_at_step": result.get("stopped_at_step"), "candidate": name}
            result["train_seconds"] = round(result.get("train_seconds") or (time.perf_counter() - t0), 1)
            done.write_text(json.dumps(result, indent=1) + "\n")
        row = {"name": name, "method": method, "lr": lr, "status": "done", "score": result["best_score"],
               "best_epoch": result["best_epoch"], "seconds": result["train_seconds"]}
        spent += row["seconds"]
        rows.append(row)
        if on_candidate is not None:
            on_candidate(row)
        if not quiet:
            print(f"candidate {name}: held-out score {row['score']:.1f} (epoch {row['best_epoch']}, "
                  f"{row['seconds']:.0f} s)")
    ran = [r for r in rows if r["status"] == "done"]
    best = max(ran, key=lambda r: r["score"])  # the first of equals: the earlier (preferred) candidate
    src = out / CANDIDATES_DIR / best["name"]
    for name in ARTIFACT_FILES:
        shutil.copyfile(src / name, out / name)
    shutil.rmtree(out / PEFT_DIR, ignore_errors=True)
    if (src / PEFT_DIR).is_dir():
        shutil.copytree(src / PEFT_DIR, out / PEFT_DIR)
    result = json.loads((src / RESULTS_NAME).read_text())
    result.update(method="auto", winner=best["name"], winner_method=best["method"], winner_lr=best["lr"],
                  candidates=rows, search_seconds=round(spent, 1), time_budget_s=budget, finished=True)
    (out / RESULTS_NAME).write_text(json.dumps(result, indent=1) + "\n")
    if not quiet:
        print(f"auto: {best['name']} wins with held-out score {best['score']:.1f} after {spent:.0f} s")
    return result

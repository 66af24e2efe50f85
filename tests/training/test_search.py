"""`--method auto`: every candidate on the same held-out split, the best kept, every score recorded; the time budget
stops new candidates; a finished candidate is never trained again; continuing a trained prompt with --init-from."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from training.cli import main as cli_main
from training.config import TrainConfig
from training.data import load_jsonl
from training.loop import train
from training.search import CANDIDATES, search

from .conftest import GENERATE_ROWS, write_jsonl


def test_cli_auto_keeps_the_best_candidate_and_records_all(tiny_dir, tmp_path, classify_file, capsys):
    out = tmp_path / "auto"
    rc = cli_main(["train", "--method", "auto", "--task", "classify", "--data", str(classify_file), "--out", str(out),
                   "--model", str(tiny_dir), "--epochs", "1", "--batch-size", "8", "--template", "W: {input}\nV:"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    rows = result["candidates"]
    assert [(r["method"], r["lr"]) for r in rows] == CANDIDATES["classify"]
    assert all(r["status"] == "done" and r["score"] is not None for r in rows)
    best = max(rows, key=lambda r: r["score"])
    assert result["winner"] == best["name"] and result["best_score"] == best["score"]
    manifest = json.loads((out / "task.json").read_text())
    assert manifest["kind"] == best["method"].replace("-", "_")
    winner = load_file(str(out / "candidates" / best["name"] / "prompt.safetensors"))
    assert all(torch.equal(v, load_file(str(out / "prompt.safetensors"))[k]) for k, v in winner.items())
    assert "wins with held-out score" in capsys.readouterr().out


def test_budget_stops_new_candidates_and_a_rerun_trains_nothing_again(tiny_lm, tmp_path):
    data = write_jsonl(tmp_path / "gen.jsonl", GENERATE_ROWS)
    cfg = TrainConfig(method="auto", task="generate", data=data, out=tmp_path / "out", epochs=1, batch_size=8,
                      time_budget_s=1e-6, max_new_tokens=6, device="cpu")
    result = search(cfg, lm=tiny_lm, quiet=True)
    status = [r["status"] for r in result["candidates"]]
    assert status[0] == "done" and set(status[1:]) == {"skipped (time budget)"}
    assert result["winner"] == result["candidates"][0]["name"]
    stamp = (tmp_path / "out" / "candidates" / result["winner"] / "prompt.safetensors").stat().st_mtime_ns
    again = search(cfg, lm=tiny_lm, quiet=True)  # the finished candidate is read back, not retrained
    assert again["candidates"][0] == result["candidates"][0]
    assert (tmp_path / "out" / "candidates" / result["winner"] / "prompt.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("flags, message", [
    (["--lr", "0.1"], "chooses the method and learning rate"),
    (["--template", "<v:4> {input}"], "without <v:N> anchors"),
    (["--time-budget", "0"], "--time-budget must be positive"),
])
def test_auto_refuses_what_it_chooses_itself(flags, message, tmp_path, classify_file, capsys):
    rc = cli_main(["train", "--method", "auto", "--task", "classify", "--data", str(classify_file), "--out",
                   str(tmp_path / "o"), *flags])
    assert rc == 2 and message in capsys.readouterr().err


def test_init_from_continues_a_trained_prompt(tiny_lm, tmp_path, classify_file):
    base = dict(method="prefix-tuning", task="classify", data=classify_file, epochs=1, batch_size=8,
                virtual_tokens=3, device="cpu")
    labels = load_jsonl(classify_file, "classify")
    from prompt_core.spec import make_labels
    names = make_labels(sorted({e.target for e in labels}))
    train(TrainConfig(out=tmp_path / "a", labels=names, **base), lm=tiny_lm, quiet=True)
    start = tmp_path / "a" / "prompt.safetensors"
    train(TrainConfig(out=tmp_path / "b", labels=names, lr=1e-12, init_from=start, **base), lm=tiny_lm, quiet=True)
    continued = load_file(str(tmp_path / "b" / "prompt.safetensors"))["prefix"]
    assert torch.allclose(load_file(str(start))["prefix"], continued, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        train(TrainConfig(out=tmp_path / "c", labels=names, init_from=start, **{**base, "virtual_tokens": 4}),
              lm=tiny_lm, quiet=True)
    with pytest.raises(ValueError, match="P-tuning"):
        TrainConfig(out=tmp_path / "d", labels=names, init_from=start, **{**base, "method": "p-tuning"})

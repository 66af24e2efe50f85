"""The benchmark CLIs start as `python -m scripts.NAME` (no sys.path edits), and the engine benchmark's profile
runs end to end on a tiny random model through the engine's public API: the page renders what it writes. The
real runs take minutes on the default model; these take seconds."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.bench.page import profile as profile_section
from scripts.bench.workload import StepTimer, make_requests, make_tasks, run_engine
from server.engine.config import EngineConfig, SchedulerConfig
from server.engine.engine import LLMEngine
from tests.server.engine.test_architectures import build, saved

ROOT = Path(__file__).resolve().parents[1]
CLIS = sorted(p.stem for p in (ROOT / "scripts").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def test_every_script_with_a_main_is_found():
    assert {"bench_engine", "bench_report", "bench_latency", "bench_http"} <= set(CLIS)


@pytest.mark.parametrize("name", CLIS)
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # other tests imported it already
def test_help_runs_as_a_module(name, monkeypatch, capsys):
    """`python -m scripts.NAME --help`, in this process: the imports resolve and argparse prints the usage."""
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module(f"scripts.{name}", run_name="__main__", alter_sys=True)
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


@pytest.fixture(scope="module")
def tiny():
    return build("llama")


def test_step_timer_tells_the_prefill_step_from_decode_only_steps(tiny):
    """4 requests of 5 tokens at batch 4: one step prefills them all (and decodes), then every later step decodes
    the 4 rows and nothing else, until they finish together."""
    engine = LLMEngine(tiny, EngineConfig(scheduler=SchedulerConfig(max_batch_size=4)))
    for r in make_requests(make_tasks(tiny, 4, 4, seed=0), 4, 5):
        engine.add_request(r)
    timer, steps = StepTimer(), 0
    while engine.has_work():
        timer.step(engine)
        steps += 1
    assert len(timer.prefill) == 1 and len(timer.seen) == 4
    assert [n for n, _, _ in timer.decode] == [4] * (steps - 1) and steps >= 3


def test_run_engine_counts_every_token_and_splits_its_time(tiny):
    tasks = make_tasks(tiny, 4, 4, seed=0)  # one task of each kind
    res = run_engine(tiny, make_requests(tasks, 8, 6), "tiny", max_batch=4)
    e = res.extra
    assert res.tokens == 8 * 6 and len(res.latencies) == 8 and len(res.ttfts) == 8
    assert e["step_timing"] == "whole steps" and e["decode_full_batch_steps"] > 0
    assert 0 < e["prefill_s"] + e["decode_s"] <= res.wall_s
    assert e["prefill_s"] + e["decode_s"] + e["other_s"] == pytest.approx(res.wall_s)


def test_profile_runs_from_the_cli_and_renders(tmp_path):
    model = saved("llama", tmp_path / "model")
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "-m", "scripts.bench_engine", "--model", model, "--device", "cpu",
                           "--dtype", "float32", "--profile-only", "--batch", "4", "--tasks", "4",
                           "--virtual-tokens", "4", "--threads", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})  # nothing but `-m` puts scripts/ in reach
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = json.loads(out.read_text())
    assert run["env"]["argv"].startswith("-m scripts.bench_engine --model")
    prof = run["profile"]
    assert prof["api"] == "public" and prof["decode_only_steps"] == prof["steps"] == 8
    assert prof["rows"] == [4] * 8                       # every profiled step decoded the whole batch
    assert prof["prefill"]["rows"] == 4 and prof["prefill"]["steps"] == 1
    top = prof["ops"][0]["name"]                  # the operator with the most self time (aten::, mkldnn::, ...)
    assert "::" in top and 0 < prof["ops_self_ms"] < prof["step_ms"]
    page = "\n".join(profile_section({"profile": prof, "config": {"virtual_tokens": 4}}))
    assert "public API only" in page and f"| {top} |" in page and "**Prefill** (4 requests over 1 engine" in page

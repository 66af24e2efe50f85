"""What a benchmark run records about where it ran (the commit measured, the machine, torch, the command), and the
small guards every run needs: warnings off while loading, a device sync before reading a clock, and a warning
when the machine is too busy for the threads torch uses."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import subprocess

import torch

from scripts.common import REPO, invocation, load_avg


@contextlib.contextmanager
def warnings_off():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_info() -> dict:
    """The commit measured: HEAD, the last commit touching the engine or prompt_core, and uncommitted changes there."""

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - not a checkout
            return ""
    return {"head": git("rev-parse", "--short", "HEAD"),
            "engine_commit": git("log", "-1", "--format=%h %s", "--", "server/engine", "prompt_core"),
            "engine_dirty": bool(git("status", "--porcelain", "--", "server/engine", "prompt_core"))}


def env_info() -> dict:
    return {"git": git_info(), "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "argv": invocation()}


def warn_if_oversubscribed() -> None:
    """More runnable processes than CPUs and several torch threads: OpenMP barriers make every op much slower."""
    if os.getloadavg()[0] > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print(f"WARNING: load average {load_avg()} exceeds {os.cpu_count()} CPUs and torch uses "
              f"{torch.get_num_threads()} threads: expect very noisy, much slower numbers (try --threads 1)")

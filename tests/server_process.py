"""A server started as operators start it (`python -m server --port 0 ...`) in a subprocess, for the tests that
send it signals or kill it."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


class ServerProcess:
    """`python -m server --port 0` as operators run it; its log is read on a thread (bounded), the port parsed."""

    def __init__(self, store: Path, *args: str, env: dict | None = None, start_timeout_s: float = 180,
                 python_code: str | None = None):
        full_env = {**os.environ, "PROMPTSERVE_STORE": str(store), "PROMPTSERVE_DEVICE": "cpu",
                    "PROMPTSERVE_DTYPE": "float32", **(env or {})}
        cmd = [sys.executable, "-c", python_code] if python_code else [sys.executable, "-m", "server"]
        self.proc = subprocess.Popen([*cmd, "--port", "0", *args], cwd=REPO, env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: deque[str] = deque(maxlen=500)
        threading.Thread(target=self._read, daemon=True).start()
        port = self.wait_for(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", start_timeout_s).group(1)
        self.url = f"http://127.0.0.1:{port}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            m = rx.search(line)
            if m:
                return m
        raise AssertionError(f"no log line matching {pattern!r} within {timeout_s} s:\n{''.join(self.log)}")

    def client(self, key: str | None = None, timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

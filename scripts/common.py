"""What the scripts (and the tests that start a real server) share: one percentile definition, so every report's
p50/p95/p99 is the same statistic; a free loopback port; the load average as reports print it; the command line
a report records; an auth file; a prompt artifact zipped for upload; and `python -m server` in a subprocess.

Scripts and tests alike import it as `scripts.common` (scripts run as `python -m scripts.NAME`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (q in 0..100), linear between the two nearest ranks; nan for no data."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_avg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded as every report prints them."""
    return [round(x, 2) for x in os.getloadavg()]


def invocation() -> str:
    """How this process was started, as run from the repository root: `-m scripts.x --flag ...`, or
    `scripts/x.py --flag ...` for a file run by its path (recorded in reports)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = f"-m {spec.name}" if spec is not None else os.path.relpath(sys.argv[0], REPO)
    return " ".join([head] + sys.argv[1:])


def command_line() -> str:
    """The whole command a report records: `python -m scripts.x --flag ...`."""
    return "python " + invocation()


def write_auth_file(path: Path, tenants: dict[str, str]) -> Path:
    """An `--auth-file` giving each raw key (key -> tenant) its tenant; the file holds only the keys' sha256."""
    path.write_text(json.dumps({"keys": {f"sha256:{hashlib.sha256(key.encode()).hexdigest()}": {"tenant": tenant}
                                         for key, tenant in tenants.items()}}))
    return path


def artifact_zip(manifest, tensors) -> bytes:
    """A native prompt artifact (prompt_store.format: a TaskManifest and its PromptTensors) as an upload: a .zip
    holding adapter/<each file>."""
    import io
    import tempfile
    import zipfile

    from prompt_store.format import write_artifact

    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as d:
        write_artifact(Path(d), manifest, tensors)
        with zipfile.ZipFile(buf, "w") as zf:
            for p in Path(d).iterdir():
                zf.writestr(f"adapter/{p.name}", p.read_bytes())
    return buf.getvalue()


class ServerProcess:
    """`python -m server --port 0` on loopback as operators run it (CPU, float32, the store at `store`).

    Its output is read on a thread: `log` keeps the last lines, `errors` the first 50 ERROR/Traceback lines, and
    `wait_for(pattern)` waits for a line not yet waited past. The port is parsed from uvicorn's start-up line.
    `python_code` runs that code (`python -c`) instead of `-m server`, with the same arguments."""

    READY = r"Uvicorn running on http://127\.0\.0\.1:(\d+)"

    def __init__(self, store: Path, *args: str, env: dict | None = None, start_timeout_s: float = 180,
                 python_code: str | None = None, log_lines: int = 2000):
        full_env = {**os.environ, "PROMPTSERVE_STORE": str(store), "PROMPTSERVE_DEVICE": "cpu",
                    "PROMPTSERVE_DTYPE": "float32", **(env or {})}
        cmd = [sys.executable, "-c", python_code] if python_code else [sys.executable, "-m", "server"]
        self.proc = subprocess.Popen([*cmd, "--port", "0", *args], cwd=REPO, env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pid = self.proc.pid
        self.log: collections.deque[str] = collections.deque(maxlen=log_lines)
        self.errors: list[str] = []
        self._unread: collections.deque[str] = collections.deque(maxlen=10_000)  # bounded: nobody may read them
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            port = self.wait_for(self.READY, start_timeout_s).group(1)
        except AssertionError as e:
            self.close()
            raise RuntimeError(f"server did not start: {e}") from None
        self.url = f"http://127.0.0.1:{port}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            if ("Traceback" in line or " ERROR " in line) and len(self.errors) < 50:
                self.errors.append(line)
            self._unread.append(line)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        """The first unread line matching `pattern` (lines before it are read past); AssertionError with the log
        when none comes within `timeout_s` or the process ends first."""
        deadline = time.monotonic() + timeout_s
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            try:
                line = self._unread.popleft()
            except IndexError:
                if not self._reader.is_alive() and not self._unread:  # output closed: the process is gone
                    break
                time.sleep(0.05)
                continue
            m = rx.search(line)
            if m:
                return m
        raise AssertionError(f"no log line matching {pattern!r} within {timeout_s} s:\n{''.join(self.log)}")

    def client(self, key: str | None = None, timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self, grace_s: float = 0) -> None:
        """Stop it: SIGKILL at once (grace_s = 0), or SIGTERM and SIGKILL only past `grace_s` seconds."""
        if self.proc.poll() is None:
            if grace_s > 0:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            else:
                self.proc.kill()
        self.proc.wait(timeout=30)

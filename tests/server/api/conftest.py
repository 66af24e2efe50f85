"""A live uvicorn server on loopback per test module, with a tmp store and an auth file of three tenants.

The server runs in a thread of the test process (so tests can look at its engine and limiter directly, e.g. to
see a cancelled request's slot freed); the shutdown test uses a subprocess instead, since it sends SIGTERM.
"""

from __future__ import annotations

import io
import json
import socket
import tarfile
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import uvicorn

from server.auth import hash_key
from server.config import Settings
from server.main import create_app

ACME = "acme-key-0123456789abcdef"        # tenant acme, stored in plain text in the auth file
GLOBEX = "globex-key-0123456789abcdef"    # tenant globex, stored hashed
ADMIN = "admin-key-0123456789abcdef"      # tenant ops, admin, stored hashed
METERED = "metered-key-0123456789abcdef"  # tenant metered: a tiny token rate (see auth_file)

START_TIMEOUT_S = 90


def write_auth_file(path: Path, tenants: dict | None = None) -> Path:
    path.write_text(json.dumps({
        "keys": {ACME: {"tenant": "acme"}, hash_key(GLOBEX): {"tenant": "globex"},
                 hash_key(ADMIN): {"tenant": "ops", "admin": True}, hash_key(METERED): {"tenant": "metered"}},
        "tenants": tenants or {},
    }))
    return path


class LiveServer:
    """uvicorn serving create_app(settings) on a free loopback port, in a daemon thread."""

    def __init__(self, settings: Settings):
        self.app = create_app(settings)
        self.runtime = self.app.state.runtime
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the live server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self._sock.close()

    def client(self, key: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 60), **kw)

    def wait_idle(self, timeout_s: float = 15) -> None:
        """Bounded wait until the engine has no request in flight (running, waiting or undelivered)."""
        engine = self.runtime.engine
        deadline = time.monotonic() + timeout_s
        while engine.in_flight or engine.stats().running or engine.stats().waiting:
            if time.monotonic() > deadline:
                raise AssertionError(f"engine still busy after {timeout_s} s: {engine.stats()}")
            time.sleep(0.02)


@contextmanager
def live_server(tmp: Path, *, auth: bool = True, tenants: dict | None = None, **overrides) -> Iterator[LiveServer]:
    tmp.mkdir(parents=True, exist_ok=True)
    settings = Settings(**{"store": tmp / "store", "model": "default", "device": "cpu", "dtype": "float32",
                           "auth_file": write_auth_file(tmp / "auth.json", tenants) if auth else None, **overrides})
    server = LiveServer(settings).start()
    try:
        yield server
    finally:
        server.stop()


# ---- artifacts

def native_soft_prompt(kind: str = "prompt_tuning", T: int = 4, seed: int = 0, template: str = "{input}",
                       labels: list[dict] | None = None) -> dict[str, bytes]:
    """Files of a native artifact (task.json + prompt.safetensors) for the default model, small random tensors."""
    import torch

    from prompt_core.spec import PromptTensors
    from prompt_store.format import TaskManifest, write_artifact

    g = torch.Generator().manual_seed(seed)
    if kind == "prefix_tuning":
        tensors = PromptTensors(prefix=torch.randn(30, 2, 3, T, 64, generator=g) * 0.05)   # [L, 2, H_kv, T, Dh]
    else:
        tensors = PromptTensors(virtual=torch.randn(T, 576, generator=g) * 0.05)           # [T, D]
    manifest = TaskManifest(id="artifact", version=1, tenant="", visibility="private", kind=kind,
                            num_virtual_tokens=T, template=template, labels=labels or [],
                            task_type="classify" if labels else "generate")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        write_artifact(Path(d), manifest, tensors)
        return {p.name: p.read_bytes() for p in Path(d).iterdir()}


def pack(files: dict[str, bytes], fmt: str = "zip", folder: str = "adapter") -> bytes:
    """A .zip or .tar.gz holding `folder/<files>`, as users make them from a saved directory."""
    buf = io.BytesIO()
    if fmt == "zip":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                zf.writestr(f"{folder}/{name}", data)
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def unpack(data: bytes, fmt: str) -> dict[str, bytes]:
    """name (without the top folder) -> bytes."""
    out = {}
    if fmt == "zip":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    out[info.filename.split("/", 1)[-1]] = zf.read(info)
    else:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
            for m in tf.getmembers():
                if m.isfile():
                    out[m.name.split("/", 1)[-1]] = tf.extractfile(m).read()
    return out


def upload(client: httpx.Client, task_id: str, archive: bytes, metadata: dict | None = None,
           filename: str = "adapter.zip") -> httpx.Response:
    data = {"task_id": task_id}
    if metadata is not None:
        data["metadata"] = json.dumps(metadata)
    return client.post("/v1/tasks", data=data, files={"adapter": (filename, archive, "application/octet-stream")})


def hard_task(client: httpx.Client, task_id: str, template: str = "Q: {input}\nA:", **extra) -> httpx.Response:
    return client.post("/v1/tasks", json={"task_id": task_id, "kind": "hard", "template": template, **extra})


# ---- Server-Sent Events

def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) per SSE event; `event` is "message" when the event has no name. Comments are skipped."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    if data:
        yield event, "\n".join(data)


def assert_error(r: httpx.Response, status: int, type_: str | None = None) -> dict:
    """The one error shape: {"error": {"type", "message"}} and nothing else."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if type_ is not None:
        assert body["error"]["type"] == type_, body
    return body["error"]


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])

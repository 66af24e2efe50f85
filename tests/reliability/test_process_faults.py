"""Faults that need a real `python -m server` process: kill -9 during an upload, and SIGTERM draining.

kill -9 is tried at the two moments that matter: while the multipart body is still arriving (slowly), and after the
new version's files are fully staged on disk but before the publishing rename (a hook holds the writer there). After
each kill a restarted server on the same store shows no partial task, serves the previous version, leaves no staging
debris, and accepts the same upload as the next version.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from .conftest import ServerProcess, native_soft_prompt, pack, sse_events

LABELS = [{"name": "yes", "verbalizer": " yes"}, {"name": "no", "verbalizer": " no"}]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"

# `python -m server`, with a hook that parks the store's writer between staging and publish while ROOT/hold exists
HOLDING_SERVER = """
import sys, time
import prompt_store.store as st
def hold(self):
    if (self.root / "hold").exists():
        print("HOLDING-BEFORE-PUBLISH", flush=True)
        time.sleep(300)
st.PromptStore._before_publish = hold
from server.__main__ import main
sys.exit(main())
"""


def multipart(task_id: str, archive: bytes, padding: int = 0) -> tuple[bytes, str]:
    boundary = "reliability-boundary-1234"
    parts = [(b'name="task_id"', task_id.encode()),
             (b'name="adapter"; filename="adapter.zip"\r\nContent-Type: application/zip', archive)]
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Disposition: form-data; " + h + b"\r\n\r\n" + v
                    + b"\r\n" for h, v in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f"multipart/form-data; boundary={boundary}"


def slow_upload(url: str, body: bytes, ctype: str, sent_half: threading.Event) -> dict:
    """Send `body` in small chunks with pauses; `sent_half` is set once half of it is on the wire."""
    result: dict = {}

    def chunks():
        step = max(1, len(body) // 40)
        for i in range(0, len(body), step):
            if i >= len(body) // 2:
                sent_half.set()
            yield body[i:i + step]
            time.sleep(0.1)

    def run():
        try:
            r = httpx.post(f"{url}/v1/tasks", content=chunks(), headers={"Content-Type": ctype}, timeout=60)
            result["status"] = r.status_code
        except Exception as e:  # noqa: BLE001 - the server is killed under it: expected
            result["error"] = e
        finally:
            sent_half.set()

    result["thread"] = threading.Thread(target=run, daemon=True)
    result["thread"].start()
    return result


def staged_files(store) -> list[str]:
    return sorted(p.relative_to(store).as_posix() for p in (store / "tmp").rglob("*") if p.is_file())


def test_kill_9_during_an_upload_then_restart(tmp_path):
    store = tmp_path / "store"
    v1 = pack(native_soft_prompt("prompt_tuning", T=2, seed=1, labels=LABELS))
    v2 = pack(native_soft_prompt("prompt_tuning", T=2, seed=2, labels=LABELS))

    srv = ServerProcess(store, python_code=HOLDING_SERVER)
    try:
        with srv.client() as c:
            r = c.post("/v1/tasks", data={"task_id": "t"}, files={"adapter": ("a.zip", v1, "application/zip")})
            assert r.status_code == 201 and r.json()["version"] == 1, r.text
            served_v1 = c.post("/v1/tasks/t/generate", json={"input": "x", "max_new_tokens": 4}).json()["text"]
        # 1. killed while the body is still arriving
        body, ctype = multipart("t", v2)
        half = threading.Event()
        up = slow_upload(srv.url, body, ctype, half)
        assert half.wait(60)
        srv.proc.kill()
        srv.proc.wait(timeout=30)
        up["thread"].join(timeout=30)
        assert "status" not in up, up  # it never completed
    finally:
        srv.close()

    srv = ServerProcess(store, python_code=HOLDING_SERVER)
    try:
        with srv.client() as c:
            assert [v["version"] for v in c.get("/v1/tasks/t/versions").json()["data"]] == [1]
            # 2. killed with the new version fully staged, just before the publishing rename
            (store / "hold").touch()
            done = threading.Event()
            up = slow_upload(srv.url, *multipart("t", v2), done)
            srv.wait_for("HOLDING-BEFORE-PUBLISH", 90)
            staged = staged_files(store)
            assert any(name.endswith("prompt.safetensors") for name in staged) and \
                any(name.endswith("task.json") for name in staged), staged  # the partial state is really there
            srv.proc.kill()
            srv.proc.wait(timeout=30)
            up["thread"].join(timeout=30)
            assert "status" not in up, up
            (store / "hold").unlink()
    finally:
        srv.close()

    srv = ServerProcess(store)  # plain `python -m server`
    try:
        with srv.client() as c:
            versions = c.get("/v1/tasks/t/versions").json()["data"]
            assert [v["version"] for v in versions] == [1], versions
            assert c.get("/v1/tasks/t").json()["version"] == 1
            assert [t["id"] for t in c.get("/v1/tasks").json()["data"]] == ["t"]
            r = c.post("/v1/tasks/t/generate", json={"input": "x", "max_new_tokens": 4})
            assert r.status_code == 200 and r.json()["text"] == served_v1 and r.json()["task"] == "t@1"
            assert c.post("/v1/tasks/t/classify", json={"input": "x"}).status_code == 200
            # the killed writer's staged version and its extracted upload were removed at start-up
            assert list((store / "tmp").iterdir()) == []
            assert sorted(p.name for p in (store / "tasks" / "t").iterdir()) == ["v1"]
            r = c.post("/v1/tasks", data={"task_id": "t"}, files={"adapter": ("a.zip", v2, "application/zip")})
            assert r.status_code == 201 and r.json()["version"] == 2, r.text
            assert c.post("/v1/tasks/t@2/generate", json={"input": "x", "max_new_tokens": 2}).status_code == 200
    finally:
        srv.close()


def test_restart_removes_the_extraction_debris_of_a_killed_upload(tmp_path):
    """An upload is extracted into ROOT/tmp/upload-XXXX before it is staged; a process killed there leaves it."""
    import subprocess
    import sys

    from prompt_store.store import PromptStore

    from .conftest import REPO
    store = tmp_path / "store"
    (store / "tmp").mkdir(parents=True)
    archive = tmp_path / "a.zip"
    archive.write_bytes(pack(native_soft_prompt("prompt_tuning", T=2, seed=1)))
    code = ("import os, sys, pathlib; from prompt_store.archive import extract_archive; "
            "extract_archive(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(archive), str(store / "tmp")], cwd=REPO, check=True, timeout=120)
    debris = list((store / "tmp").iterdir())
    assert len(debris) == 1  # what a kill -9 mid-upload leaves
    PromptStore(store).close()  # what a restarted server does first
    assert list((store / "tmp").iterdir()) == [], "a dead process's extracted upload is left in ROOT/tmp"


def test_sigterm_drains_in_flight_refuses_new_and_exits_0(tmp_path):
    srv = ServerProcess(tmp_path / "store", "--shutdown-grace-s", "60")
    try:
        with srv.client() as c:
            assert c.post("/v1/tasks", json={"task_id": "count", "kind": "hard", "template": "{input}"}
                          ).status_code == 201
        events: list = []
        first = threading.Event()
        status: dict = {}

        def stream():
            try:
                with httpx.Client(base_url=srv.url, timeout=120) as c:
                    with c.stream("POST", "/v1/tasks/count/generate",
                                  json={"input": COUNTING, "max_new_tokens": 40, "stream": True}) as r:
                        status["code"] = r.status_code
                        for ev in sse_events(r.iter_lines()):
                            events.append(ev)
                            first.set()
            except Exception as e:  # noqa: BLE001
                status["error"] = e
            finally:
                first.set()

        # a kept-alive connection opened before the signal: new work on it must get 503, not run
        keep = httpx.Client(base_url=srv.url, timeout=30)
        assert keep.get("/health").status_code == 200
        t = threading.Thread(target=stream, daemon=True)
        t.start()
        assert first.wait(60) and events and events[0][0] == "token", (events, status)
        srv.proc.send_signal(signal.SIGTERM)
        srv.wait_for("draining", 30)
        try:
            r = keep.post("/v1/tasks/count/generate", json={"input": "x", "max_new_tokens": 1})
            assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable", r.text
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            pass  # the connection was closed instead: refused as well
        try:
            r = httpx.post(f"{srv.url}/v1/tasks/count/generate", json={"input": "x", "max_new_tokens": 1}, timeout=10)
            assert r.status_code == 503, r.text
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            pass  # the listening socket is closed
        keep.close()
        t.join(timeout=120)
        assert not t.is_alive() and "error" not in status, status
        assert events[-1][0] == "done", events[-3:]
        done = json.loads(events[-1][1])
        assert done["finish_reason"] in ("length", "stop") and done["usage"]["completion_tokens"] >= 1
        if done["finish_reason"] == "length":
            assert done["usage"]["completion_tokens"] == 40
        assert "".join(json.loads(d)["text"] for e, d in events if e == "token") == done["text"]
        assert srv.proc.wait(timeout=60) == 0
    finally:
        srv.close()

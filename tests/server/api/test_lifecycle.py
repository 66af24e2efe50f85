"""`python -m server` as operators run it: flags and env, the bind guard, graceful shutdown on SIGTERM, readiness.

The shutdown tests run the server as a subprocess (SIGTERM goes to a real process). Waits are bounded by
deadlines and keyed on observable events (a log line, a token, the process exiting), never on bare sleeps.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from scripts.common import ServerProcess
from server.auth import KeyRing, hash_key
from server.config import Settings
from server.engine.config import EngineConfig, SchedulerConfig

from .conftest import ACME, assert_error, hard_task, live_server, sse_events, write_auth_file

REPO = Path(__file__).resolve().parents[3]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"




def stream_in_thread(url: str, task: str, max_new_tokens: int, first_token: threading.Event) -> dict:
    """Run a streaming generate on a thread; `result` gets the events (or the exception that ended it)."""
    result: dict = {"events": []}

    def run() -> None:
        try:
            with httpx.Client(base_url=url, timeout=120) as c:
                with c.stream("POST", f"/v1/tasks/{task}/generate",
                              json={"input": COUNTING, "max_new_tokens": max_new_tokens, "stream": True}) as r:
                    result["status"] = r.status_code
                    for event in sse_events(r.iter_lines()):
                        result["events"].append(event)
                        first_token.set()
        except Exception as e:  # noqa: BLE001 - reported to the test
            result["error"] = e
        finally:
            first_token.set()

    result["thread"] = threading.Thread(target=run, daemon=True)
    result["thread"].start()
    return result


def refused(url: str) -> bool:
    """A new request is refused: the listening socket is closed, or the server answers 503 while draining."""
    try:
        r = httpx.post(f"{url}/v1/tasks/count/generate", json={"input": "x", "max_new_tokens": 1}, timeout=10)
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
        return True
    return r.status_code == 503


def test_sigterm_finishes_in_flight_refuses_new_and_exits(tmp_path):
    server = ServerProcess(tmp_path / "store", "--shutdown-grace-s", "60")
    try:
        # the ready log says where start-up time went: imports, model, the rest (docs/runbook.md)
        m = re.search(r"ready in ([\d.]+) s \(imports and app ([\d.]+) s, model ([\d.]+) s, "
                      r"fingerprint, store and engine ([\d.]+) s, start-up check ([\d.]+) s\)", "".join(server.log))
        assert m, "".join(server.log)
        total, *parts = map(float, m.groups())
        assert -0.3 <= total - sum(parts) <= 1.0 and parts[1] < parts[0]  # the rest: uvicorn starting, rounding
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.get("/ready").status_code == 200
            assert hard_task(c, "count", "{input}").status_code == 201
        started = threading.Event()
        inflight = stream_in_thread(server.url, "count", 24, started)
        assert started.wait(60) and inflight["events"], inflight
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for(r"draining", 10)
        assert refused(server.url)
        inflight["thread"].join(60)
        events = inflight["events"]
        assert "error" not in inflight, inflight.get("error")
        assert events[-1][0] == "done", events[-3:]
        done = json.loads(events[-1][1])
        assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 24
        assert server.proc.wait(timeout=60) == 0
        assert time.monotonic() - t0 < 60
    finally:
        server.close()


def test_sigterm_cancels_what_outlives_the_grace_period(tmp_path):
    server = ServerProcess(tmp_path / "store", "--shutdown-grace-s", "1")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert hard_task(c, "count", "{input}").status_code == 201
        started = threading.Event()
        inflight = stream_in_thread(server.url, "count", 1000, started)  # minutes of work on this CPU
        assert started.wait(60) and inflight["events"]
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 1 + 15  # the grace period, plus cancelling and closing
        inflight["thread"].join(30)
        assert not any(e == "done" for e, _ in inflight["events"])  # it was cut off, not completed
    finally:
        server.close()


def test_refuses_a_public_bind_without_an_auth_file(tmp_path):
    for args, env in ((["--host", "0.0.0.0"], {}), ([], {"PROMPTSERVE_HOST": "0.0.0.0"})):
        p = subprocess.run([sys.executable, "-m", "server", *args], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, **env, "PROMPTSERVE_STORE": str(tmp_path)}, timeout=120)
        assert p.returncode == 2 and "auth file" in p.stderr, p.stderr


def test_help_states_the_statuses_the_server_answers(capsys):
    from server.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "generate (413 above)" in text and "(422 above)" not in text  # as the server and docs/api.md answer
    assert "--auth-file PATH" in text and "{Path,null}" not in text


def test_settings_from_flags_env_and_defaults(monkeypatch, tmp_path):
    s = Settings()
    assert (s.host, s.port, s.model, s.auth_file, s.cors_origins, s.log_requests) == \
        ("127.0.0.1", 8000, "default", None, [], False)
    monkeypatch.setenv("PROMPTSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("PROMPTSERVE_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("PROMPTSERVE_ALLOW_INSECURE_BIND", "true")
    monkeypatch.setenv("PROMPTSERVE_PORT", "9000")
    s = Settings(_cli_parse_args=["--port", "9100", "--tokens-per-minute", "600", "--store", str(tmp_path)])
    assert s.max_batch_size == 7 and s.port == 9100 and s.tokens_per_minute == 600 and s.store == tmp_path
    assert s.cors_origins == ["https://a.example", "https://b.example"] and s.allow_insecure_bind
    Settings(host="0.0.0.0", allow_insecure_bind=True).check_bind()
    Settings(host="::1").check_bind()
    Settings(host="0.0.0.0", auth_file=tmp_path / "a.json").check_bind()
    with pytest.raises(ValueError, match="auth file"):
        Settings(host="0.0.0.0", allow_insecure_bind=False).check_bind()
    with pytest.raises(ValueError):
        Settings(max_batch_size=0)


def test_settings_give_the_engine_each_limit_by_name():
    """Defaults live in the engine's config; every limit flag lands in the field of the same name, once."""
    assert Settings().engine_config() == EngineConfig()
    s = Settings(max_batch_size=7, max_prefill_tokens=99, max_input_tokens=55, max_new_tokens=33, max_logprobs=4,
                 kv_cache_mb=2, kv_block_size=32, prefix_caching=False)
    assert s.engine_config({"gold": 3.0}) == EngineConfig(
        scheduler=SchedulerConfig(max_batch_size=7, max_prefill_tokens=99, tenant_weights={"gold": 3.0}),
        max_input_tokens=55, max_new_tokens=33, max_logprobs=4, kv_cache_bytes=2 << 20, kv_block_size=32,
        prefix_caching=False)
    for bad in (dict(max_prefill_tokens=0), dict(max_input_tokens=0), dict(max_new_tokens=0),
                dict(max_logprobs=-1), dict(kv_cache_mb=-1), dict(kv_block_size=24)):
        with pytest.raises(ValueError):
            Settings(**bad)
    with pytest.raises(ValueError, match="tenant weights"):
        Settings().engine_config({"gold": 0.0})


def test_auth_file_keys_plain_and_hashed(tmp_path):
    ring = KeyRing.load(write_auth_file(tmp_path / "auth.json", {"acme": {"weight": 2, "max_concurrent": 3}}))
    assert ring.authenticate(ACME).tenant == "acme"
    assert ring.authenticate("globex-key-0123456789abcdef").tenant == "globex"  # stored as sha256:<hex>
    assert ring.authenticate("admin-key-0123456789abcdef").admin
    assert ring.authenticate(hash_key(ACME)) is None and ring.authenticate("") is None
    assert ring.policy("acme").weight == 2 and ring.policy("acme").max_concurrent == 3
    for bad in ({"keys": {}}, {"keys": {"short": {"tenant": "a"}}}, {"keys": {"sha256:zz": {"tenant": "a"}}},
                {"keys": {ACME: {"tenant": "../x"}}}, {"keys": {ACME: {"tenant": "a", "admin": "yes"}}}):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="auth file"):
            KeyRing.load(tmp_path / "bad.json")


def test_cors_is_off_by_default_and_on_when_configured(tmp_path):
    for origins, allowed in (([], False), (["https://app.example"], True)):
        with live_server(tmp_path / str(allowed), cors_origins=origins) as server, server.client() as c:
            r = c.options("/v1/tasks", headers={"Origin": "https://app.example",
                                                "Access-Control-Request-Method": "GET"})
            assert (r.headers.get("access-control-allow-origin") == "https://app.example") is allowed


def test_ready_fails_when_the_engine_loop_dies(tmp_path):
    with live_server(tmp_path, auth=False) as server, server.client() as c:
        created = hard_task(c, "qa")
        assert created.status_code == 201
        # the open tenant has one name everywhere: task owner, model owner (and metrics' tenant label)
        assert created.json()["owner"] == "default"
        assert {m["id"]: m["owned_by"] for m in c.get("/v1/models").json()["data"]}["qa"] == "default"
        assert c.get("/ready").status_code == 200

        def boom():
            raise RuntimeError("injected engine failure")

        server.runtime.engine.engine.step = boom  # the loop thread's next step raises
        r = c.post("/v1/tasks/qa/generate", json={"input": "x", "max_new_tokens": 2})
        assert_error(r, 500)
        ready = c.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
        assert_error(c.post("/v1/tasks/qa/generate", json={"input": "x"}), 503, "unavailable")
        assert c.get("/health").status_code == 200  # alive, but out of rotation


@pytest.mark.parametrize("log_requests", [False, True])
def test_request_texts_are_logged_only_when_enabled(tmp_path, caplog, log_requests):
    secret = "my-customer-secret-4711"
    caplog.set_level(logging.DEBUG)
    with live_server(tmp_path, auth=False, log_requests=log_requests) as server, server.client() as c:
        assert hard_task(c, "qa").status_code == 201
        assert c.post("/v1/tasks/qa/generate", json={"input": secret, "max_new_tokens": 1}).status_code == 200
        assert c.post("/v1/tasks/qa/classify", json={"input": secret}).status_code == 422
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert (secret in logged) is log_requests

"""The runtime (server/runtime.py) before and around start-up, without a model: what create() holds, what routes see
while nothing is open (503s that say what is missing; /health alive, /ready not), a close() with nothing to close,
and what /ready reports of a running engine."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from server.config import Settings
from server.main import create_app
from server.runtime import Runtime


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(store=tmp_path / "store", auth_file=None)


def test_create_holds_keys_metrics_and_admission_and_loads_nothing(settings):
    rt = Runtime.create(settings, launched_at=1.0)
    assert rt.keyring.open and rt.limiter.limits("anyone") == (settings.max_concurrent, settings.tokens_per_minute)
    assert rt.loaded is rt.store is rt.engine is rt.job_runner is rt.batch_runner is None
    assert rt.tier_stats() == {} and rt.training_stats == {"tokens": 0.0, "tokens_per_s": 0.0}
    asyncio.run(rt.close())  # nothing opened: nothing to stop
    assert rt.draining


def test_a_bad_auth_file_is_refused_at_create(tmp_path):
    bad = tmp_path / "auth.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError):
        Runtime.create(Settings(store=tmp_path / "store", auth_file=bad))


def test_routes_say_what_is_not_open_yet(settings):
    client = TestClient(create_app(settings))  # no lifespan: the runtime never opens
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 503 and r.json() == {"status": "not_ready", "detail": "loading the model"}
    for path, what in (("/v1/tasks", "the prompt store"), ("/v1/files", "the file store"),
                       ("/v1/fine_tuning/jobs", "the job store"), ("/v1/batches", "the batch store")):
        r = client.get(path)
        assert r.status_code == 503 and r.json()["error"]["message"] == f"{what} is not open", path
    r = client.post("/v1/tasks/t/generate", json={"input": "x"})  # the store is asked for first
    assert r.status_code == 503 and r.headers["retry-after"] == "1"


def test_ready_info_is_the_model_as_served_and_the_engines_fixed_settings(settings):
    rt = Runtime.create(settings)
    llm = SimpleNamespace(compiled=None, batch_invariant=True, cache=SimpleNamespace(bytes=lambda: 4096),
                          blocks=SimpleNamespace(block_size=16))
    rt.engine = SimpleNamespace(engine=llm)
    rt.loaded = SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16, quantization="none")
    assert not rt.compiled and rt.batch_invariant
    assert rt.ready_info() == {"model": "default", "device": "cpu", "dtype": "bfloat16", "quantization": "none",
                               "compiled": False, "batch_invariant": True, "kv_cache_bytes": 4096, "kv_block_size": 16}

"""The README's serve command, run as written, answers generate for a hard-prompt and a soft-prompt task."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model

from tests.helpers import default_model

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    serve, test = readme_commands()
    assert "-m server" in serve and "pytest" in test
    port = free_port()
    env = {**os.environ, "PROMPTSERVE_PORT": str(port), "PROMPTSERVE_STORE": str(tmp_path_factory.mktemp("store"))}
    proc = subprocess.Popen(["bash", "-c", serve], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # the install step is a no-op when installed; allow a cold one
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the README's serve command never became ready"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def peft_zip(tmp_path) -> bytes:
    torch.manual_seed(0)
    loaded = default_model()
    model = get_peft_model(loaded.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4,
                                                            prompt_tuning_init="SAMPLE_VOCAB"))
    model.save_pretrained(tmp_path / "adapter")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in (tmp_path / "adapter").iterdir():
            zf.write(f, f.name)
    return buf.getvalue()


def test_readme_server_generates_for_hard_and_soft_tasks(served, tmp_path):
    with httpx.Client(base_url=served, timeout=120) as client:
        r = client.post("/v1/tasks", json={"task_id": "capitals", "kind": "hard",
                                           "template": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"})
        assert r.status_code == 201, r.text
        r = client.post("/v1/tasks/capitals/generate", json={"input": "What is the capital of France?",
                                                             "max_new_tokens": 12})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["text"]
        # the same question as a chat: the template is already a chat prompt, so it is not wrapped in another one
        chat = client.post("/v1/chat/completions", json={
            "model": "capitals", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["content"] == r.json()["text"]
        assert chat.json()["usage"]["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]

        r = client.post("/v1/tasks", data={"task_id": "soft"}, files={"adapter": ("a.zip", peft_zip(tmp_path))})
        assert r.status_code == 201, r.text
        assert r.json()["kind"] == "prompt_tuning" and r.json()["num_virtual_tokens"] == 4
        r = client.post("/v1/tasks/soft/generate", json={"input": "Hello", "max_new_tokens": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["prompt_tokens"] == 4 + 1  # the virtual tokens count as prompt tokens
        assert body["finish_reason"] in ("length", "stop") and body["usage"]["completion_tokens"] >= 1

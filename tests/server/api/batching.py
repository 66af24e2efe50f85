"""What the batch tests share: a tiny random Llama on disk, a soft prompt sized for it, batch lines, waiting for a
batch, reading its output, a gate that holds lines, and the fields of an answer that do not depend on when it ran."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import httpx
import openai
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from prompt_core.model import ensure_default_model_dir
from server.batches.gate import Gate

from .conftest import pack

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
ENDED = ("completed", "failed", "expired", "cancelled")
# what differs between two runs of one request: its id and its timestamp; everything else (text, tokens, usage,
# finish reasons, labels and scores) is a function of the request under greedy decoding
RUN_FIELDS = ("id", "created")


def save_tiny_model(path: Path) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path)
    AutoTokenizer.from_pretrained(ensure_default_model_dir()).save_pretrained(path)
    return path


def tiny_soft_prompt(T: int = 4, seed: int = 1, labels: list[dict] | None = None) -> bytes:
    """A prompt-tuning artifact for the tiny model (virtual tokens [T, 64]), zipped for upload."""
    from prompt_core.spec import PromptTensors
    from prompt_store.format import TaskManifest, write_artifact

    g = torch.Generator().manual_seed(seed)
    tensors = PromptTensors(virtual=torch.randn(T, TINY["hidden_size"], generator=g) * 0.05)   # [T, D]
    manifest = TaskManifest(id="artifact", version=1, tenant="", visibility="private", kind="prompt_tuning",
                            num_virtual_tokens=T, template="{input}", labels=labels or [],
                            task_type="classify" if labels else "generate")
    with tempfile.TemporaryDirectory() as d:
        write_artifact(Path(d), manifest, tensors)
        return pack({p.name: p.read_bytes() for p in Path(d).iterdir()})


def line(custom_id: str, url: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def completions(n: int, models: tuple[str, ...] = ("qa",), tokens: int = 4, prefix: str = "r") -> list[dict]:
    return [line(f"{prefix}{i}", "/v1/completions", {"model": models[i % len(models)], "prompt": f"item {i} is",
                                                     "max_tokens": tokens, "temperature": 0})
            for i in range(n)]


def submit(client: openai.OpenAI, rows, endpoint: str = "/v1/completions", window: str = "24h", **kw):
    f = client.files.create(file=("batch.jsonl", jsonl(rows)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window=window, **kw)


def wait_batch(client: openai.OpenAI, batch_id: str, until=ENDED, timeout_s: float = 120, **counts):
    """Poll until the batch's status is in `until` and its request_counts have at least `counts`."""
    deadline = time.monotonic() + timeout_s
    while True:
        b = client.batches.retrieve(batch_id)
        rc = b.request_counts
        if b.status in until and all(getattr(rc, k) >= v for k, v in counts.items()):
            return b
        assert time.monotonic() < deadline, f"batch still {b.status} {rc} after {timeout_s} s"
        time.sleep(0.1)


def read_file(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def by_custom_id(rows: list[dict]) -> dict[str, dict]:
    out = {r["custom_id"]: r for r in rows}
    assert len(out) == len(rows), "a custom_id appears twice"
    return out


def stable(body):
    """An answer without what changes from run to run (RUN_FIELDS)."""
    if isinstance(body, dict):
        return {k: v for k, v in body.items() if k not in RUN_FIELDS}
    return body


def live(http: httpx.Client, row: dict) -> httpx.Response:
    return http.post(row["url"], json=row["body"])


class Hold(Gate):
    """Lets the first `n` lines start and holds every later one (until `n` is raised)."""

    def __init__(self, n: int):
        self.n, self.passed = n, 0

    def open(self) -> bool:
        if self.passed < self.n:
            self.passed += 1
            return True
        return False

"""What the fine-tuning job tests share, here and over HTTP (tests/server/api/test_fine_tuning.py): the tiny model
on disk, example rows of both task types, and waiting for a job through the openai client."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from prompt_core.model import ensure_default_model_dir

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)

CLASSIFY = [{"input": f"{w} {i}", "label": lab} for i in range(6)
            for w, lab in (("sunny warm", "good"), ("rainy cold", "bad"), ("storm dark", "bad"),
                           ("bright day", "good"))]
GENERATE = [{"prompt": f"{n} is {a}", "completion": f" {n} | {a}"} for n in ("Ann", "Bob", "Eve", "Max")
            for a in (20, 31, 45, 52)]


def jsonl(rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def save_tiny_llama(path: Path) -> Path:
    """A tiny random Llama (seed 0) with the default model's tokenizer, saved for `--model PATH`."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path)
    AutoTokenizer.from_pretrained(ensure_default_model_dir()).save_pretrained(path)
    return path


def wait_job(client: openai.OpenAI, job_id: str, states=("succeeded", "failed", "cancelled"), timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in states:
            return job
        assert time.monotonic() < deadline, f"job still {job.status} after {timeout_s} s"
        time.sleep(0.2)

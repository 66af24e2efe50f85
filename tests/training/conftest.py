"""A tiny random Llama with grouped-query attention and the real tokenizer: fast enough for CI on two cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from prompt_core.model import LoadedModel, ensure_default_model_dir, freeze

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Saved to disk so `--model PATH` (the CLI) and peft load the very same weights."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(ensure_default_model_dir()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm(tiny_dir) -> LoadedModel:
    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    return LoadedModel(model=freeze(model), tokenizer=tok, source=str(tiny_dir), device=torch.device("cpu"),
                       dtype=torch.float32)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


CLASSIFY_ROWS = [{"input": f"{w} {i}", "label": lab} for i in range(6)
                 for w, lab in (("sunny warm", "good"), ("rainy cold", "bad"), ("storm dark", "bad"),
                                ("bright day", "good"))]
GENERATE_ROWS = [{"input": f"{n} is {a}", "output": f"{n} | {a}"} for n in ("Ann", "Bob", "Eve", "Max")
                 for a in (20, 31, 45, 52, 67)]


@pytest.fixture
def classify_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "cls.jsonl", CLASSIFY_ROWS)


@pytest.fixture
def generate_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "gen.jsonl", GENERATE_ROWS)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core CI box: a second torch thread only adds synchronisation waits (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

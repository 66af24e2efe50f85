"""Fixtures: the default tokenizer, a tiny GQA Llama and its fingerprint, and a store factory."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from prompt_core.fingerprint import fingerprint
from prompt_core.model import ensure_default_model_dir
from prompt_store.store import PromptStore, StoreConfig

from .helpers import tiny_llama


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_default_model_dir())


@pytest.fixture(scope="session")
def tiny():
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_fp(tiny):
    return fingerprint(tiny)


@pytest.fixture
def make_store(tmp_path, tiny_fp):
    """make_store(**config) -> a PromptStore on tmp_path/store for the tiny model; closed after the test."""
    opened = []

    def make(root=None, fp=tiny_fp, **cfg):
        store = PromptStore(root or tmp_path / "store", fp, config=StoreConfig(**cfg))
        opened.append(store)
        return store

    yield make
    for s in opened:
        s.close()


def rand_virtual(T: int = 4, D: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g)

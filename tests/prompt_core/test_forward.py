"""prompt_core/forward.py: the pieces around the decoder that need no real model: virtual tokens gathered into the
embeddings, label scores from hidden states, the prefix cache. A stub stands in for the model: an embedding, an
identity LM head and an empty config."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from prompt_core import forward as fwd
from prompt_core.batch import Readout, StepInputs


class Stub(torch.nn.Module):
    """Token i embeds as [i, 10 i]; the LM head is the identity, so logits are the hidden states (V = D = 2)."""
    base_model_prefix = "model"

    def __init__(self, dtype=torch.float32):
        super().__init__()
        weight = torch.tensor([[float(i), 10.0 * i] for i in range(5)], dtype=dtype)   # [V_in=5, D=2]
        self.embed = torch.nn.Embedding.from_pretrained(weight)
        self.head = torch.nn.Linear(2, 2, bias=False)
        self.head.weight.data = torch.eye(2, dtype=dtype)
        self.config = SimpleNamespace()

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def step_of(ids, virt, table) -> StepInputs:
    ids, virt = torch.tensor(ids), torch.tensor(virt)
    return StepInputs(ids=ids, virt=virt, virtual_table=table, positions=torch.zeros_like(ids), slots=ids,
                      mask=torch.zeros(1), key_positions=ids)


def test_virtual_tokens_replace_the_embeddings_at_their_positions():
    table = torch.tensor([[100.0, 200.0], [300.0, 400.0]])  # [V=2, D=2]
    out = fwd.embed(Stub(), step_of([[1, 0, 3], [0, 2, 0]], [[-1, 0, -1], [1, -1, -1]], table))
    assert out.tolist() == [[[1, 10], [100, 200], [3, 30]],
                            [[300, 400], [2, 20], [0, 0]]]


def test_without_virtual_tokens_embed_is_the_plain_lookup():
    assert fwd.embed(Stub(), step_of([[4]], [[-1]], None)).tolist() == [[[4, 40]]]


def test_label_scores_sum_each_verbalizers_token_log_probabilities():
    # row 0 scores label 0 = tokens (0, 1) and label 1 = token (1); row 1 is a generation row
    # query 1 predicts first tokens: logits [0, 0] -> log p = -ln 2 each
    # query 2 predicts label 0's second token: logits [ln 3, 0] -> p(1) = 1/4
    hidden = torch.zeros(2, 3, 2)
    hidden[0, 2, 0] = math.log(3.0)
    readout = Readout(last_q=torch.tensor([1, 0]), label_row=torch.tensor([0, 0, 0]), label_q=torch.tensor([1, 2, 1]),
                      label_tok=torch.tensor([0, 1, 1]), label_index=torch.tensor([0, 0, 1]), labels_per_row=[2, 0])
    scores = fwd.label_scores(Stub(), hidden, readout)
    assert scores[0].tolist() == pytest.approx([-3 * math.log(2), -math.log(2)])
    assert scores[1].shape == (0,)


def test_label_scores_of_generation_rows_only_are_empty():
    readout = Readout(last_q=torch.tensor([0]), label_row=torch.tensor([], dtype=torch.long),
                      label_q=torch.tensor([], dtype=torch.long), label_tok=torch.tensor([], dtype=torch.long),
                      label_index=torch.tensor([], dtype=torch.long), labels_per_row=[0])
    assert [s.shape for s in fwd.label_scores(Stub(), torch.zeros(1, 1, 2), readout)] == [(0,)]


def test_last_logits_read_each_rows_last_prompt_query():
    hidden = torch.arange(12, dtype=torch.float32).view(2, 3, 2)  # [n, Q, D]
    readout = Readout(last_q=torch.tensor([2, 0]), label_row=None, label_q=None, label_tok=None, label_index=None,
                      labels_per_row=[0, 0])
    assert fwd.last_logits(Stub(), hidden, readout).tolist() == [[4, 5], [6, 7]]


def test_half_precision_logits_come_back_as_fp32():
    assert fwd.logits(Stub(torch.bfloat16), torch.ones(1, 2, dtype=torch.bfloat16)).dtype is torch.float32


def test_prefix_cache_left_aligns_each_rows_prefix_and_zero_pads():
    p = torch.arange(1, 9, dtype=torch.float32).view(2, 2, 1, 2, 1)  # [L=2, 2, H=1, T=2, Dh=1]
    cache = fwd.prefix_cache(Stub(), [p, None], width=3)
    keys, values = cache.layers[1].keys, cache.layers[1].values     # [n=2, H=1, width=3, Dh=1]
    assert keys[:, 0, :, 0].tolist() == [[5, 6, 0], [0, 0, 0]]     # layer 1, slot 0 (keys) of p
    assert values[:, 0, :, 0].tolist() == [[7, 8, 0], [0, 0, 0]]
    assert cache.layers[0].keys[:, 0, :, 0].tolist() == [[1, 2, 0], [0, 0, 0]]


def test_no_prefix_width_gives_an_empty_cache():
    assert fwd.prefix_cache(Stub(), [None], width=0).get_seq_length() == 0

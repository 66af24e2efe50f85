"""The batched sampler: greedy rows take the argmax, seeds reproduce, filters restrict, rows stay independent."""

from __future__ import annotations

import torch

from server.engine.sampler import sample

V = 50


def params(n, temperature=1.0, top_k=0, top_p=1.0, seed=7, step=0):
    t = lambda v, dt: torch.full((n,), v, dtype=dt)  # noqa: E731
    return (t(temperature, torch.float32), t(top_k, torch.long), t(top_p, torch.float32), t(seed, torch.long),
            t(step, torch.long))


def test_greedy_rows_take_argmax():
    logits = torch.randn(4, V)
    assert torch.equal(sample(logits, *params(4, temperature=0.0)), logits.argmax(-1))


def test_same_seed_same_draw_regardless_of_batch_neighbours():
    torch.manual_seed(0)
    row = torch.randn(1, V)
    alone = sample(row, *params(1, seed=123, step=5))
    others = torch.randn(5, V)
    batch = torch.cat([others, row])
    temp, k, p, seed, step = params(6, seed=999, step=2)
    seed[-1], step[-1] = 123, 5
    assert sample(batch, temp, k, p, seed, step)[-1] == alone[0]


def test_seed_and_step_change_the_draw():
    logits = torch.zeros(1, V)  # uniform: every token equally likely
    draws = {int(sample(logits, *params(1, seed=s, step=0))[0]) for s in range(40)}
    assert len(draws) > 15
    steps = {int(sample(logits, *params(1, seed=1, step=s))[0]) for s in range(40)}
    assert len(steps) > 15


def test_draws_follow_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    n = 4000
    draws = torch.stack([sample(logits, *params(1, seed=s))[0] for s in range(n)])
    freq = torch.bincount(draws, minlength=4).float() / n
    assert torch.allclose(freq, logits.softmax(-1)[0], atol=0.03), freq


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0, -1.0, -2.0]])
    top_k = {int(sample(logits, *params(1, top_k=2, seed=s))[0]) for s in range(200)}
    assert top_k == {0, 1}
    # probabilities ~[0.36, 0.33, 0.30, 0.02, ...]: top_p 0.5 keeps the first two, 0.1 only the first
    top_p = {int(sample(logits, *params(1, top_p=0.5, seed=s))[0]) for s in range(200)}
    assert top_p == {0, 1}
    assert {int(sample(logits, *params(1, top_p=0.1, seed=s))[0]) for s in range(50)} == {0}


def test_top_alternatives_break_ties_by_token_id_whatever_the_rows():
    """Equal log-probabilities are listed lowest id first, and at the cut the lowest ids are kept, so a request's
    listing does not depend on how many rows were ranked together."""
    from server.engine.sampler import top_by_id

    row = torch.tensor([0.1, 0.5, 0.3, 0.5, 0.3, 0.3, -1.0])
    vals, ids = top_by_id(row[None], 3)
    assert ids.tolist() == [[1, 3, 2]] and torch.equal(vals, row[[1, 3, 2]][None])
    many = torch.cat([torch.randn(63, 7), row[None]])
    assert top_by_id(many, 3)[1][-1].tolist() == [1, 3, 2]
    vals, ids = top_by_id(torch.tensor([[0.0, 2.0, 1.0]]), 2)
    assert ids.tolist() == [[1, 2]]

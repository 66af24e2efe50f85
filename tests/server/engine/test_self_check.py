"""The start-up check (server/engine/self_check.py) on every architecture of the test matrix: it passes where the
engine serves the model exactly, and refuses the model when the engine gets a window or an output step wrong."""

from __future__ import annotations

import pytest

from prompt_core import forward as forward_mod
from prompt_core.arch import UnsupportedModel
from server.engine.self_check import probe_length, self_check
from tests.helpers import new_engine
from tests.server.engine.test_architectures import ARCHS, WINDOW, build


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    return request.param, build(request.param)


def test_the_probe_runs_past_the_smallest_window_within_its_bound():
    assert probe_length(build("mistral-window").model, 256) == WINDOW + 4
    assert probe_length(build("llama").model, 256) == 8  # no window: the shortest probe


def test_start_up_check_passes(arch):
    name, loaded = arch
    assert self_check(new_engine(loaded), max_tokens=64) < 1e-4


@pytest.mark.parametrize("name, break_it", [
    ("gemma2-window-softcap",
     lambda engine, mp: mp.setattr(forward_mod, "output_logits", lambda config, logits: logits)),
    ("mistral-window", lambda engine, mp: mp.setattr(engine.runner, "windows", [0] * len(engine.runner.windows))),
    ("gemma3-interleaved",
     lambda engine, mp: mp.setattr(engine.runner, "windows", [WINDOW] * len(engine.runner.windows))),
])
def test_start_up_check_refuses_what_the_engine_gets_wrong(name, break_it, monkeypatch):
    """Skip the softcapping, forget a window, or window every layer of an interleaved model: the check sees it."""
    engine = new_engine(build(name))
    break_it(engine, monkeypatch)
    with pytest.raises(UnsupportedModel, match="differ from the model's own forward"):
        self_check(engine, max_tokens=64)

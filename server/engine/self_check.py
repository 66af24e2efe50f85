"""A start-up proof that this model is served exactly: before the first user request, the engine batches probe
requests of different lengths (one behind a prefix, as prefix tuning places it) and every step's logits are
compared with the model's own forward on that request alone. Whatever the engine does not model of an architecture
(an attention window it reads differently, a step after the LM head, position handling) shows up here as a
difference, and the server refuses to start instead of answering wrong.

The probe is longer than the model's smallest attention window, up to `max_tokens` (a window longer than that is
covered by the test matrix in tests/server/engine/test_architectures.py, not here)."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from prompt_core.arch import UnsupportedModel, architecture, mask_layout
from prompt_core.quantize import quantization_of
from prompt_core.spec import PromptKind, PromptSpec, PromptTensors

from .engine import LLMEngine
from .request import EngineRequest, PromptRef, SamplingParams

# relative to the largest |logit|: what separates a correct batched path from the same request alone in each dtype
# (fp32: ~1e-6 measured; a wrong window or output step: 1e-2 and more)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
# Quantized layers: int4 multiplies in bf16, and int8 rounds each row's activations, so a last-bit difference
# upstream can move one rounding step (1/127 of the row's largest value); a wrong window still shows far above it.
QUANTIZED_TOLERANCE = 3e-2
STEPS = 3


def probe_length(model, max_tokens: int) -> int:
    window = mask_layout(model.config).smallest_window
    return max(8, min(max_tokens, (window or 0) + 4))


@torch.inference_mode()
def self_check(engine: LLMEngine, max_tokens: int = 256) -> float:
    """Run the probe; return the largest relative difference seen, or raise UnsupportedModel."""
    model, device = engine.runner.model, engine.runner.device
    arch = architecture(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    n = probe_length(model, max_tokens)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, vocab, (length,), generator=g).tolist() for length in (n, max(2, n // 2), 3)]
    prefix = _model_prefix(model, torch.randint(0, vocab, (1, 4), generator=g).to(device))  # [L, 2, H, 4, Dh]
    hard = PromptSpec(PromptKind.HARD, 0, "{input}")
    prefixed = PromptSpec(PromptKind.PREFIX_TUNING, prefix.shape[3], "{input}")
    tensors = PromptTensors(prefix=prefix)
    refs = [PromptRef("self-check:hard", hard), PromptRef("self-check:hard", hard),
            PromptRef("self-check:prefix", prefixed, lambda: tensors)]
    trace, engine.runner.trace = engine.runner.trace, {}
    observer, engine.observer = engine.observer, None  # probe requests are no one's traffic

    def probe(which: list[int], tag: str) -> dict[str, list[torch.Tensor]]:
        engine.runner.trace = {}
        for i in which:
            ref, toks = refs[i], ids[i]
            seq = engine.make_sequence(EngineRequest(f"self-check-{i}{tag}", ref, "x",
                                                     sampling=SamplingParams(max_new_tokens=STEPS, temperature=0.0)))
            seq.plan.ids, seq.plan.virt = list(toks), [-1] * len(toks)  # the probe's own tokens, not a text's
            engine.add(seq)
        while engine.has_work():
            engine.step()
        return engine.runner.trace

    try:
        got = probe(list(range(len(refs))), "")
        # the same probes one at a time: at a batch-invariant setting every step's logits are the same bits
        alone = {f"self-check-{i}": probe([i], "-alone")[f"self-check-{i}-alone"] for i in range(len(refs))} \
            if engine.batch_invariant else {}
    finally:
        engine.runner.trace, engine.observer = trace, observer
    for rid, steps in alone.items():
        if len(steps) != len(got.get(rid, [])) or any(not torch.equal(a, b) for a, b in zip(steps, got[rid])):
            worst = max(((a - b).abs().max().item() for a, b in zip(steps, got.get(rid, []))), default=float("nan"))
            raise UnsupportedModel(f"{architecture(model)}: a probe batched with others differs from the same probe "
                                   f"alone (by {worst:.2e}) although this setting should be batch-invariant; please "
                                   "report it")
    worst = 0.0
    for i, (ref, toks) in enumerate(zip(refs, ids)):
        steps = got.get(f"self-check-{i}", [])
        if not steps:
            raise UnsupportedModel(f"{arch}: the start-up check produced no tokens")
        generated = [int(s.argmax()) for s in steps]
        cache = DynamicCache()
        if ref.spec.kind == PromptKind.PREFIX_TUNING:
            for layer, kv in enumerate(prefix):
                cache.update(kv[0][None], kv[1][None], layer)
        full = model(input_ids=torch.tensor([toks + generated[:-1]], device=device), cache=cache,
                     use_cache=True).logits[0].float().cpu()                                    # [N, V]
        for k, mine in enumerate(steps):
            want = full[len(toks) - 1 + k]
            worst = max(worst, ((mine.float() - want).abs().max() / want.abs().max().clamp(min=1.0)).item())
    quantized = quantization_of(model)
    limit = TOLERANCE.get(engine.runner.dtype, 3e-2) if quantized == "none" else QUANTIZED_TOLERANCE
    if quantized != "none":  # a deep quantized model is not as close to itself as the limit (see chaos())
        limit = max(limit, 2 * chaos(model, ids[0], device))
    precision = str(engine.runner.dtype).removeprefix("torch.") + ("" if quantized == "none" else f", {quantized}")
    if worst > limit:
        raise UnsupportedModel(f"{arch}: batched logits differ from the model's own forward by {worst:.2e} (relative; "
                               f"limit {limit:.0e} in {precision}), so this "
                               "architecture is not served exactly; please report it")
    return worst


def chaos(model, ids: list[int], device) -> float:
    """How far the model's own logits move when its input embeddings move by one part in a million (relative to
    the largest logit). Quantized activations round to a step of 1/127 of their row's largest value, so a last-bit
    difference can take another step and grow over the layers: the default model under --quantize int8 moves 0.18
    this way, so the engine cannot be held closer to it than that."""
    x = torch.tensor([ids], device=device)
    emb = model.get_input_embeddings()(x)
    a = model(inputs_embeds=emb).logits[0].float()
    b = model(inputs_embeds=emb * (1 + 1e-6)).logits[0].float()
    return ((a - b).abs().max(-1).values / a.abs().max(-1).values.clamp(min=1.0)).max().item()


def _model_prefix(model, ids: torch.Tensor) -> torch.Tensor:
    """Key/values the model itself computes for a few tokens: a prefix on the scale a trained one has."""
    cache = DynamicCache()
    model(input_ids=ids, cache=cache, use_cache=True)
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])

"""Every architecture we accept serves exactly: tiny random models of many families, built here from a config (no
download), with sliding windows shorter than the test sequences. For each, requests of every prompt kind, generate
and classify, of different lengths, batched together: the logits at every step equal the model's own forward on
that request alone (full recompute, with its own masks, positions and output path), classify scores equal the
reference log-likelihoods, and each PEFT method's adapter gives PEFT's forward logits."""

from __future__ import annotations

import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    DynamicCache,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTBigCodeConfig,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from prompt_core import forward as forward_mod
from prompt_core.arch import attn_implementation, kv_geometry, mask_layout
from prompt_core.fingerprint import fingerprint
from prompt_core.layout import plan_row
from prompt_core.model import LoadedModel, freeze
from prompt_core.spec import PromptKind, PromptSpec, make_labels
from prompt_store.errors import InvalidPrompt
from prompt_store.peft_io import import_peft
from server.engine.request import EngineRequest, PromptRef
from tests.helpers import greedy, new_engine, prompt_ref, random_prompt, run, tokenizer
from training import objective

ATOL = 1e-4
WINDOW = 6  # shorter than every test sequence: the windows really cut
COMMON = dict(vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2)
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, **COMMON)

ARCHS = {
    "llama": lambda: LlamaConfig(**LLAMA_LIKE),
    "mistral-window": lambda: MistralConfig(sliding_window=WINDOW, **LLAMA_LIKE),
    "qwen2-mixed-window": lambda: Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                              **LLAMA_LIKE),
    "qwen3-head-dim": lambda: Qwen3Config(head_dim=32, **LLAMA_LIKE),
    "gemma2-window-softcap": lambda: Gemma2Config(sliding_window=WINDOW, head_dim=16, query_pre_attn_scalar=16,
                                                  final_logit_softcapping=3.0, attn_logit_softcapping=2.0,
                                                  **LLAMA_LIKE),
    "gemma3-interleaved": lambda: Gemma3TextConfig(sliding_window=WINDOW, head_dim=16, query_pre_attn_scalar=16,
                                                   layer_types=["sliding_attention", "full_attention"],
                                                   final_logit_softcapping=3.0, **LLAMA_LIKE),
    "phi3-window": lambda: Phi3Config(sliding_window=WINDOW, **LLAMA_LIKE),
    "cohere-logit-scale": lambda: CohereConfig(logit_scale=0.25, **LLAMA_LIKE),
    "granite-logit-scaling": lambda: GraniteConfig(logits_scaling=4.0, **LLAMA_LIKE),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **COMMON),
    "gpt-neox": lambda: GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=512, **COMMON),
    "opt": lambda: OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=64, max_position_embeddings=512, **COMMON),
    "falcon-multi-query": lambda: FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               multi_query=True, new_decoder_architecture=False, alibi=False,
                                               **COMMON),
    "falcon-new-decoder": lambda: FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               num_kv_heads=2, new_decoder_architecture=True, alibi=False, **COMMON),
    "gpt-bigcode-multi-query": lambda: GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                                        multi_query=True, **COMMON),
}
# what the models really cache: multi-query keeps one head; Falcon's new decoder architecture caches its keys
# expanded to every attention head (not num_kv_heads)
EXPECTED_KV_HEADS = {"falcon-multi-query": 1, "gpt-bigcode-multi-query": 1, "falcon-new-decoder": 4, "gpt2": 4,
                     "gpt-neox": 4, "opt": 4}


def build(name: str, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    config = ARCHS[name]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation(config))
    return LoadedModel(model=freeze(model.float()), tokenizer=tokenizer(), source=name, device=torch.device("cpu"),
                       dtype=torch.float32)


def saved(name: str, directory) -> str:
    """`build(name)` written as a model directory (weights and tokenizer), for `--model DIR` and `load_model`."""
    tiny = build(name)
    tiny.model.save_pretrained(directory)
    tiny.tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    return request.param, build(request.param)


LABELS = make_labels({"positive": " positive", "negative": " negative", "mixed": " mixed feelings"})
TEXTS = ["Hi", "The film was long but the ending made up for every slow minute of it.",
         "What is the capital of France?", "I loved the soundtrack and the actors, but the plot was thin."]


def mixed_requests(loaded: LoadedModel) -> list[EngineRequest]:
    """Every kind (P-tuning with anchors inside the template), generate and classify, inputs of 2 to ~20 tokens."""
    tasks = {
        "hard": (PromptSpec(PromptKind.HARD, 0, "Question: {input}\nAnswer:", LABELS), None),
        "pt": (PromptSpec(PromptKind.PROMPT_TUNING, 5, "Review: {input}\nSentiment:", LABELS),
               random_prompt(loaded, PromptKind.PROMPT_TUNING, 5, 1)),
        "ptune": (PromptSpec(PromptKind.P_TUNING, 6, "<v:4> Review: {input} <v:2> Sentiment:", LABELS),
                  random_prompt(loaded, PromptKind.P_TUNING, 6, 2)),
        "prefix": (PromptSpec(PromptKind.PREFIX_TUNING, 7, "{input}", LABELS),
                   random_prompt(loaded, PromptKind.PREFIX_TUNING, 7, 3)),
    }
    refs = {k: prompt_ref(f"{k}@1", spec, t) for k, (spec, t) in tasks.items()}
    plan = [("hard", 1, "generate"), ("pt", 0, "generate"), ("ptune", 2, "generate"), ("prefix", 3, "generate"),
            ("hard", 3, "classify"), ("pt", 2, "classify"), ("ptune", 1, "classify"), ("prefix", 0, "classify")]
    return [EngineRequest(f"r{i}", refs[task], TEXTS[t], mode=mode, sampling=greedy(5))
            for i, (task, t, mode) in enumerate(plan)]


@torch.no_grad()
def reference_logits(loaded: LoadedModel, plan, tensors, extra: list[int]) -> torch.Tensor:
    """The model's own forward on one request alone, recomputed from scratch: the template's tokens with the
    virtual tokens in their places, then `extra` tokens, behind a cache holding the prefix (as PEFT does).
    Returns logits at every position [N, V]."""
    model = loaded.model
    ids = torch.tensor(plan.ids + extra)
    emb = model.get_input_embeddings()(ids)                                      # [N, D]
    if tensors is not None and tensors.virtual is not None:
        for j, v in enumerate(plan.virt):
            if v >= 0:
                emb[j] = tensors.virtual[v]
    cache = DynamicCache()
    if tensors is not None and tensors.prefix is not None:
        for layer, kv in enumerate(tensors.prefix):                            # [2, H, T, Dh]
            cache.update(kv[0][None], kv[1][None], layer)
    return model(inputs_embeds=emb[None], cache=cache, use_cache=True).logits[0]


def test_kv_geometry_is_the_models_own(arch):
    name, loaded = arch
    geometry = kv_geometry(loaded.model)
    out = loaded.model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    k = out.past_key_values.layers[0].keys
    assert (geometry.kv_heads, geometry.head_dim) == (k.shape[1], k.shape[3])
    if name in EXPECTED_KV_HEADS:
        assert geometry.kv_heads == EXPECTED_KV_HEADS[name]
    assert fingerprint(loaded.model).num_kv_heads == geometry.kv_heads


def test_mixed_batch_equals_models_own_forward(arch):
    name, loaded = arch
    requests = mixed_requests(loaded)
    engine = new_engine(loaded)
    seqs = {r.request_id: engine.add_request(r) for r in requests}
    plans = {rid: s.prefill_plan for rid, s in seqs.items()}  # before any output joins the plan
    outs = run(engine, [])
    if "window" in name or "interleaved" in name:
        assert mask_layout(loaded.model.config).smallest_window == WINDOW
    for req in requests:
        out = outs[req.request_id]
        assert out.error is None, (req.request_id, out.error)
        seq, plan, tensors = seqs[req.request_id], plans[req.request_id], req.prompt.load()
        if req.mode == "classify":
            scores = seq.label_scores
            assert len(scores) == len(LABELS)
            for label, score in zip(plan.labels, scores):
                logp = torch.log_softmax(reference_logits(loaded, plan, tensors, label[:-1]), -1)
                n = plan.num_tokens
                ref = sum(logp[n - 1 + k, tok].item() for k, tok in enumerate(label))
                assert abs(score - ref) < ATOL, f"{name} {req.request_id}: score {score} vs {ref}"
            continue
        steps = engine.runner.trace[req.request_id]
        assert len(steps) >= 1
        generated = [int(s.argmax()) for s in steps]
        full = reference_logits(loaded, plan, tensors, generated[:-1])
        n = plan.num_tokens
        assert n + len(generated) > WINDOW + 1
        for k, mine in enumerate(steps):
            diff = (mine - full[n - 1 + k]).abs().max().item()
            assert diff < ATOL, f"{name} {req.request_id} step {k}: max |diff| {diff}"


PEFT_METHODS = {
    "prompt_tuning": lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4,
                                                prompt_tuning_init="RANDOM"),
    "p_tuning": lambda: PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4,
                                            encoder_reparameterization_type="MLP", encoder_hidden_size=32),
    "prefix_tuning": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
}

PEFT_CANNOT = {("falcon-multi-query", "prefix_tuning")}


@pytest.mark.parametrize("method", list(PEFT_METHODS))
def test_peft_adapter_equals_peft_forward(arch, method, tmp_path):
    """A real PEFT adapter of each method, imported and served batched: PEFT's forward on each request alone is
    the oracle at every generated step."""
    name, loaded = arch
    torch.manual_seed(1)
    peft_model = get_peft_model(loaded.model, PEFT_METHODS[method]()).eval()
    try:
        peft_model.save_pretrained(tmp_path)
        if (name, method) in PEFT_CANNOT:
            # PEFT sizes the prefix for every attention head while the model caches one: PEFT's own forward fails
            # on it, and the upload is refused with the reason rather than served wrong
            with pytest.raises(InvalidPrompt, match="num_attention_heads expected 1"):
                import_peft(tmp_path, fingerprint(loaded.model))
            with pytest.raises(RuntimeError):
                peft_model(input_ids=torch.tensor([[5, 6, 7]]))
            return
        spec, tensors, _ = import_peft(tmp_path, fingerprint(loaded.model))
        ref = PromptRef(f"{method}@1", spec, lambda: tensors)
        requests = [EngineRequest(f"r{i}", ref, text, sampling=greedy(4)) for i, text in enumerate(TEXTS)]
        engine = new_engine(loaded)
        run(engine, requests)
        for req in requests:
            steps = engine.runner.trace[req.request_id]
            generated = [int(s.argmax()) for s in steps]
            ids = loaded.tokenizer(req.text)["input_ids"] + generated[:-1]
            with torch.no_grad():
                oracle = peft_model(input_ids=torch.tensor([ids])).logits[0]            # [N, V]
            last = oracle.shape[0] - len(generated)  # PEFT's logits include its virtual tokens' positions
            for k, mine in enumerate(steps):
                diff = (mine - oracle[last + k]).abs().max().item()
                assert diff < ATOL, f"{name} {method} {req.request_id} step {k}: max |diff| {diff}"
    finally:
        peft_model.unload() if hasattr(peft_model, "unload") else None
        loaded.model.__dict__.pop("peft_config", None)


@pytest.mark.parametrize("kind", [PromptKind.PROMPT_TUNING, PromptKind.PREFIX_TUNING])
def test_training_forward_equals_models_own_forward(arch, kind):
    """What training optimises is what is served: the trainer's batched forward (rows of different lengths behind a
    shared prefix) gives the model's own logits at every position, windows and output path included."""
    name, loaded = arch
    spec = PromptSpec(kind, 5, "Review: {input}\nSentiment:")
    tensors = random_prompt(loaded, kind, 5, 7)
    plans = [plan_row(spec, loaded.tokenizer, text) for text in TEXTS]
    with torch.no_grad():
        hidden, _, _ = objective.prefill(loaded.model, plans, tensors.virtual, tensors.prefix)       # [n, Q, D]
        for i, plan in enumerate(plans):
            mine = forward_mod.logits(loaded.model, hidden[i, :plan.num_tokens])
            ref = reference_logits(loaded, plan, tensors, [])
            diff = (mine - ref).abs().max().item()
            assert diff < ATOL, f"{name} {kind} row {i}: max |diff| {diff}"

"""Constrained decoding cost on the default model: grammar compile time, mask time per step, and tokens/s of a
batch of constrained rows against the same batch unconstrained.

    python -m scripts.bench_outputs --threads 1            # 32 rows x 32 tokens, ~1-2 min on one CPU thread
    python -m scripts.bench_outputs --rows 32 --tokens 64 --json out.json

Both batches run the same prompts greedily; each row of the constrained batch has one of four JSON schemas. To
compare like with like, every row runs to its max_new_tokens: each schema needs a string of 1000+ characters, and
EOS is biased by -100 in both runs (the bias path is taken by both, so the difference is the grammar).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of each batch (the best is kept)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from prompt_core.model import load_model
    from prompt_core.spec import PromptKind, PromptSpec
    from server.engine import constraints as C
    from server.engine.config import EngineConfig, SchedulerConfig
    from server.engine.engine import LLMEngine
    from server.engine.request import EngineRequest, PromptRef, SamplingParams

    loaded = load_model()
    res: dict = {"rows": args.rows, "tokens": args.tokens, "threads": torch.get_num_threads(),
                 "device": str(loaded.device), "dtype": str(loaded.dtype)}

    # -- compile times, with a fresh cache (the tokenizer's vocabulary is read once per engine)
    engine = LLMEngine(loaded, EngineConfig(scheduler=SchedulerConfig(max_batch_size=args.rows)))
    t0 = time.perf_counter()
    engine.grammars._get_compiler()
    res["tokenizer_info_s"] = time.perf_counter() - t0
    typical = {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9.]+$"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"]},
        "status": {"enum": ["active", "inactive", "banned"]}},
        "required": ["name", "age", "status"]}
    compile_s = {}
    for name, c in {"json_schema (typical, 6 fields, nested)": C.json_schema(typical),
                    "json_object": C.Constraint("json_object"),
                    "regex (date)": C.regex(r"\d{4}-\d{2}-\d{2}"),
                    "choice (3)": C.choice(["positive", "negative", "neutral"])}.items():
        t0 = time.perf_counter()
        engine.grammars.compile(c)
        compile_s[name] = time.perf_counter() - t0
    res["compile_s"] = compile_s

    # -- throughput
    long = {"type": "string", "minLength": 1000}  # cannot complete within the run: every row decodes every step
    schemas = [{"type": "object", "properties": {"note": long}, "required": ["note"]},
               {"type": "object", "properties": {"n": {"type": "integer"}, "story": long}, "required": ["n", "story"]},
               {"type": "array", "items": long, "minItems": 1},
               {"type": "object", "properties": {"title": {"enum": ["a", "b"]}, "text": long},
                "required": ["title", "text"]}]
    ref = PromptRef("chat@1", PromptSpec(PromptKind.HARD, 0,
                                         "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"))
    topics = ["a cat", "the sea", "a city at night", "an old clock", "a storm", "a garden", "a train", "winter"]
    no_eos = tuple((t, -100.0) for t in sorted(engine.eos_ids))

    def batch(constrained: bool) -> list[EngineRequest]:
        return [EngineRequest(f"r{i}", ref, f"Write a long JSON note about {topics[i % len(topics)]}.",
                              sampling=SamplingParams(max_new_tokens=args.tokens, logit_bias=no_eos,
                                                      constraint=C.json_schema(schemas[i % 4]) if constrained
                                                      else None))
                for i in range(args.rows)]

    masks: list[tuple[float, int]] = []

    def once(constrained: bool) -> dict:
        eng = LLMEngine(loaded, EngineConfig(scheduler=SchedulerConfig(max_batch_size=args.rows)))
        eng.grammars = engine.grammars  # compiled already: measure decoding, not compiling
        eng.processor.on_mask = lambda s, n: masks.append((s, n))
        spent = [0.0]  # seconds inside the logits processor (apply + accept): the constrained rows' own cost
        for name in ("apply", "accept"):
            fn = getattr(eng.processor, name)

            def timed_fn(*a, _fn=fn):
                t = time.perf_counter()
                try:
                    return _fn(*a)
                finally:
                    spent[0] += time.perf_counter() - t
            setattr(eng.processor, name, timed_fn)
        for r in batch(constrained):
            eng.add_request(r)
        masks.clear()
        t0 = time.perf_counter()
        steps = tokens = 0
        while eng.has_work():
            for out in eng.step():
                tokens += len(out.new_token_ids)
            steps += 1
        wall = time.perf_counter() - t0
        per_step = sorted(s for s, _ in masks)
        return {"wall_s": wall, "tokens": tokens, "steps": steps, "tokens_per_s": tokens / wall,
                "step_s_mean": wall / steps, "processor_s_per_step": spent[0] / steps,
                "mask_s_per_step_median": per_step[len(per_step) // 2] if masks else 0.0,
                "mask_us_per_row_mean": (1e6 * sum(per_step) / sum(n for _, n in masks)) if masks else 0.0}

    # alternate the two batches (after one warm-up each), so load from other processes hits both alike
    once(False), once(True)
    runs = {False: [], True: []}
    for _ in range(args.repeat):
        for constrained in (False, True):
            runs[constrained].append(once(constrained))
    res["unconstrained"] = max(runs[False], key=lambda r: r["tokens_per_s"])
    res["constrained"] = max(runs[True], key=lambda r: r["tokens_per_s"])
    res["ratio"] = res["constrained"]["tokens_per_s"] / res["unconstrained"]["tokens_per_s"]
    # the same ratio from the processor's own time, which other processes' load hardly moves
    step = res["unconstrained"]["step_s_mean"]
    res["ratio_from_processor_time"] = step / (step + res["constrained"]["processor_s_per_step"]
                                               - res["unconstrained"]["processor_s_per_step"])

    # -- what rows without processing pay: the processor's pass over a step's rows when none needs work
    eng = LLMEngine(loaded, EngineConfig(scheduler=SchedulerConfig(max_batch_size=args.rows)))
    seqs = [eng.make_sequence(r) for r in batch(False)]
    for s in seqs:
        s.request.sampling = SamplingParams(max_new_tokens=args.tokens)  # no bias either: an untouched row
    logits = torch.zeros(args.rows, eng.sequence_builder.vocab_size)
    t0 = time.perf_counter()
    for _ in range(1000):
        assert eng.processor.apply(logits, seqs) is logits
    res["untouched_step_overhead_us"] = (time.perf_counter() - t0) * 1e3
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

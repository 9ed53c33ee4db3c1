#!/usr/bin/env bash
# Issue 18, decode speed, in one device call (<= 8 minutes on an H200, by the timeouts below):
# the GPU tests of the kernels (bf16 on CUDA, fused decode path = unfused, greedy tokens of the
# GPU path = CPU path), benchmarks.decode_speed (ceilings, every variant, breakdowns, best), and
# with PREFILL=1 benchmarks.prefill_sweep (prefill attention tiles vs cuDNN per length).
# Everything goes to $OUT. VARIANTS=a,b,... narrows the variants; SKIP_TESTS=1 leaves the tests out.
set -o pipefail
OUT=${OUT:-/tmp/decode_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
if [ -z "$SKIP_TESTS" ]; then
  timeout ${TEST_TIMEOUT_S:-170} python3 -m pytest -m gpu tests/kernels -q -rs --durations=8 2>&1 | tail -40 | tee "$OUT/pytest_gpu.log"
fi
timeout ${DECODE_TIMEOUT_S:-250} python3 -m benchmarks.decode_speed --out "$OUT/decode_speed.json" \
  ${VARIANTS:+--variants $VARIANTS} 2>&1 | tee "$OUT/decode_speed.log"
if [ -n "$PREFILL" ]; then
  timeout ${PREFILL_TIMEOUT_S:-60} python3 -m benchmarks.prefill_sweep --out "$OUT/prefill_sweep.json" \
    --v1-sweep --variants none --budget-s 55 2>&1 | tee "$OUT/prefill_sweep.log"
fi
date -u

#!/usr/bin/env bash
# Issue 18, prefill attention against cuDNN, in one device call (< 6 minutes on an H200, by the
# timeouts below): what this Triton compiles each v2 variant to (warp-specialised or not,
# shared memory), the GPU tests of the prefill attention kernel (v1 and every v2 variant
# against the reference, bf16), then benchmarks.prefill_sweep (v1 default, v1 with TMA, v1's
# best 2k tile, every v2 variant, beside SDPA cuDNN and FLASH at 2k / 4k / 8k / 16k tokens, each
# output checked against an fp32 reference at every length). Everything goes to $OUT:
# env.txt, compile.log, pytest_gpu.log, prefill_sweep.json, prefill_sweep.log.
# VARIANTS=a,b,... narrows the v2 variants; SKIP_TESTS=1 leaves the tests out.
set -o pipefail
OUT=${OUT:-/tmp/prefill_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  uptime
} 2>&1 | tee "$OUT/env.txt"
timeout ${COMPILE_TIMEOUT_S:-45} python3 -m benchmarks.prefill_v2_compile 2>&1 | grep -v '^ \|^$' \
  | tail -40 | tee "$OUT/compile.log"
if [ -z "$SKIP_TESTS" ]; then
  timeout ${TEST_TIMEOUT_S:-140} python3 -m pytest -m gpu tests/kernels/test_prefill_attention.py -q -rs \
    --durations=8 2>&1 | tail -60 | tee "$OUT/pytest_gpu.log"
fi
timeout ${SWEEP_TIMEOUT_S:-170} python3 -m benchmarks.prefill_sweep --out "$OUT/prefill_sweep.json" \
  --variants ${VARIANTS:-all} --budget-s ${SWEEP_BUDGET_S:-150} 2>&1 | tee "$OUT/prefill_sweep.log"
date -u | tee -a "$OUT/env.txt"

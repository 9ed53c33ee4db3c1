#!/usr/bin/env bash
# Issue 18, the v3 prefill attention variants against cuDNN, in one device call (about 3-4
# minutes on an H200; at most ~8 by the timeouts below). Needs only the GPU host's own torch and
# Triton (no .whl). In order: what Triton compiles each variant to (shared memory, registers,
# spills, programs per SM: benchmarks.prefill_v3_compile), the GPU tests of the v3 kernel (every
# V3_CONFIGS variant against the reference in bf16, ragged batch and cached prefix), then
# benchmarks.prefill_v3_sweep (the model's current dispatch, i.e. v2-host-128x64-w8-s3, and every
# v3 variant beside SDPA cuDNN at 2k / 4k / 8k / 16k tokens, two rounds, every output checked
# against an fp32 reference first). Everything goes to $OUT: env.txt, compile.log,
# pytest_gpu.log, prefill_v3_sweep.json, prefill_v3_sweep.log.
# VARIANTS=a,b,... narrows the v3 variants; SKIP_TESTS=1 leaves the tests out; ROUNDS=n.
set -o pipefail
OUT=${OUT:-/tmp/prefill_v3_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  uptime
} 2>&1 | tee "$OUT/env.txt"
timeout ${COMPILE_TIMEOUT_S:-45} python3 -m benchmarks.prefill_v3_compile 2>&1 | grep -v Warning \
  | tee "$OUT/compile.log"
if [ -z "$SKIP_TESTS" ]; then
  timeout ${TEST_TIMEOUT_S:-150} python3 -m pytest -m gpu tests/kernels/test_prefill_attention_v3.py \
    -q -rs --durations=5 -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/pytest_gpu.log"
fi
timeout ${SWEEP_TIMEOUT_S:-300} python3 -m benchmarks.prefill_v3_sweep --out "$OUT/prefill_v3_sweep.json" \
  --variants ${VARIANTS:-all} --rounds ${ROUNDS:-2} --budget-s ${SWEEP_BUDGET_S:-260} 2>&1 \
  | tee "$OUT/prefill_v3_sweep.log"
date -u | tee -a "$OUT/env.txt"

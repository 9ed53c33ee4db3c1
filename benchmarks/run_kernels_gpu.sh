#!/usr/bin/env bash
# Issue 9 on the GPU host, in one call: compiled kernel tests (pytest -m gpu), then the kernel
# benchmark. Logs and JSON go to $OUT (default /tmp/kernels_gpu). SWEEP=1 adds the config sweep.
set -o pipefail
OUT=${OUT:-/tmp/kernels_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
timeout ${TEST_TIMEOUT_S:-240} python3 -m pytest -m gpu tests/kernels -q -rs 2>&1 | tee "$OUT/pytest_gpu.log"
echo "pytest exit: $?" | tee -a "$OUT/pytest_gpu.log"
timeout ${BENCH_TIMEOUT_S:-330} python3 -m benchmarks.kernels --out "$OUT/kernels.json" ${SWEEP:+--sweep} \
  2>&1 | tee "$OUT/bench.log"
echo "bench exit: $?"

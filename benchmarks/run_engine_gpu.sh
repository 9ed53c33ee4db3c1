#!/usr/bin/env bash
# Issue 6 on the GPU host, in one call: GPU tests of the model runner and kernels
# (pytest -m gpu), the engine benchmark (ours beside its ceilings and HF transformers), then
# the `disagg profile` run for llama-3-8b. Logs, JSON and the profile go to $OUT (default
# /tmp/engine_gpu). SKIP_TESTS=1 / SKIP_PROFILE=1 / NO_HF=1 leave parts out.
set -o pipefail
OUT=${OUT:-/tmp/engine_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
if [ -z "$SKIP_TESTS" ]; then
  timeout ${TEST_TIMEOUT_S:-180} python3 -m pytest -m gpu tests/model tests/kernels -q -rs -x 2>&1 | tee "$OUT/pytest_gpu.log"
  echo "pytest exit: $?" | tee -a "$OUT/pytest_gpu.log"
fi
timeout ${BENCH_TIMEOUT_S:-270} python3 -m benchmarks.engine --out "$OUT/engine.json" ${NO_HF:+--no-hf} \
  2>&1 | tee "$OUT/bench.log"
echo "bench exit: $?" | tee -a "$OUT/bench.log"
if [ -z "$SKIP_PROFILE" ]; then
  # cluster.cli's parser imports Ray (absent here), so call the profile command's own entry point.
  timeout ${PROFILE_TIMEOUT_S:-130} python3 -c "import argparse, sys
from cluster.profile import add_profile_args, run
p = argparse.ArgumentParser(prog='disagg profile'); add_profile_args(p)
sys.exit(run(p.parse_args(sys.argv[1:])))" --device cuda --model llama-3-8b \
    --out "$OUT/H100_llama-3-8b.json" 2>&1 | tee "$OUT/profile.log"
  echo "profile exit: $?" | tee -a "$OUT/profile.log"
fi
date -u

#!/usr/bin/env bash
# Issue 18 on the GPU host, in one call: GPU tests of kernels and model (TESTS=paths narrows
# them, SKIP_TESTS=1 leaves them out), the ceilings, the engine benchmark at decode batch 1-64 (ENGINE_ARGS), the decode-speed
# breakdown (benchmarks.decode_speed, if present), the throughput run (THROUGHPUT=1) and
# `disagg profile` (PROFILE=1, writes $OUT/<device>_llama-3-8b.json), and the served throughput
# run (SERVED=1: in-process chunked, a colocated plan and 1P+1D through `disagg serve` + gRPC on the
# same requests, async scheduling on and off; SERVE_PROFILE=1 adds a cProfile of each serve
# process, which slows its event loop; needs Ray from .whl/, built with
# ../shared/tools/gpu-wheels and carried). Everything goes to $OUT.
set -o pipefail
OUT=${OUT:-/tmp/speed_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
if [ -z "$SKIP_TESTS" ]; then
  timeout ${TEST_TIMEOUT_S:-150} python3 -m pytest -m gpu ${TESTS:-tests/kernels tests/model} -q -rs 2>&1 | tail -30 | tee "$OUT/pytest_gpu.log"
fi
if [ -n "$PROFILE" ]; then
  # cluster.cli's parser imports Ray (absent there), so call the profile command's own entry point.
  timeout ${PROFILE_TIMEOUT_S:-150} python3 -c "import argparse, sys
from cluster.profile import add_profile_args, run
p = argparse.ArgumentParser(prog='disagg profile'); add_profile_args(p)
sys.exit(run(p.parse_args(sys.argv[1:])))" --device cuda --model llama-3-8b --device-name H200 \
    --out "$OUT/H200_llama-3-8b.json" 2>&1 | tee "$OUT/profile.log"
fi
if [ -f benchmarks/decode_speed.py ] && [ -z "$SKIP_DECODE_SPEED" ]; then
  timeout ${DECODE_TIMEOUT_S:-200} python3 -m benchmarks.decode_speed --out "$OUT/decode_speed.json" 2>&1 | tee "$OUT/decode_speed.log"
fi
if [ -z "$SKIP_ENGINE" ]; then
  timeout ${BENCH_TIMEOUT_S:-240} python3 -m benchmarks.engine --out "$OUT/engine.json" --no-hf \
    ${ENGINE_ARGS:---batches 1,2,4,8,16,32,64 --contexts 512,2048 --prefill-tokens 1024,4096,16384} 2>&1 | tee "$OUT/bench.log"
fi
if [ -n "$THROUGHPUT" ]; then
  timeout ${THROUGHPUT_TIMEOUT_S:-330} python3 -m benchmarks.throughput --out "$OUT/throughput.json" ${THROUGHPUT_ARGS} 2>&1 | tee "$OUT/throughput.log"
fi
if [ -n "$SERVED" ]; then
  # Ray (and its deps) from carried wheels; serve runs with --http-port -1 (no fastapi there).
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  PYTHONPATH=/tmp/site:$PYTHONPATH PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \
  RAY_worker_niceness=0 timeout ${SERVED_TIMEOUT_S:-570} python3 -m benchmarks.throughput --out "$OUT/served.json" \
    --modes ${SERVED_MODES:-chunked,served_colocated,served_1p1d} --async-scheduling ${SERVED_ASYNC:-both} \
    --num-requests ${SERVED_NUM:-400} ${SERVE_PROFILE:+--profile-dir "$OUT/serve_prof"} ${SERVED_ARGS} 2>&1 | grep -v "^(raylet)" \
    | tee "$OUT/served.log"
fi
date -u

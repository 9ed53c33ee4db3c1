#!/usr/bin/env bash
# The runtime on one GPU, in one device call: GPU tests (kernels, model, the cluster with a
# prefill and a decode actor sharing the GPU over CUDA IPC), the engine benchmark, and the KV
# transfer benchmark at llama-3-8b shape. STAGE=engine|fidelity-only|final|tests-fidelity|fidelity|role-change pick other parts.
# Needs Ray: build .whl/ with ../shared/tools/gpu-wheels and carry it.
set -o pipefail
OUT=${OUT:-/tmp/cluster_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_worker_niceness=0
export PATH=/tmp/site/bin:$PATH
{ date -u; nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.limit --format=csv; } 2>&1 | tee "$OUT/env.txt"
gpu_tests() {   # $1: timeout (s), $2: lines of output kept
  timeout "$1" python3 -m pytest -m gpu tests/kernels tests/model tests/kv_transfer tests/cluster/test_runtime_gpu.py \
    -q -rs -p no:cacheprovider 2>&1 | tail -"$2" | tee "$OUT/pytest_gpu.log"
}
kv_bench() {    # $1: timeout (s)
  timeout "$1" python3 -m benchmarks.kv_transfer --model llama-3-8b --device cuda --reps 3 --out "$OUT/kv_transfer.json" \
    2>&1 | grep -v "^(raylet)" | tail -14 | tee "$OUT/kv_transfer.log"
}
# fidelity: GPU=H100|H200 (default H100); LOAD_TERMS=PATH takes the load terms from an earlier fit
# (a profile-serving.json or fidelity.json) instead of fitting them on this run's rates.
fidelity() {    # $1: timeout (s), $2: default rates, $3: default requests per rate
  local gpu=${GPU:-H100}
  timeout "$1" python3 -m benchmarks.fidelity --plan "benchmarks/plans/${gpu,,}_1p1d_llama3_8b.json" --workload azure-conv \
    --rates "${RATES:-$2}" --num-requests "${NUM:-$3}" --ttft-slo-s 0.4 --tpot-slo-s 0.04 \
    --profile "placement/profiles/${gpu}_llama-3-8b.json" --ray-worker-niceness 0 --out "$OUT/fidelity" \
    ${LOAD_TERMS:+--load-terms-from "$LOAD_TERMS"} 2>&1 | grep -v "^(raylet)" | tail -80 | tee "$OUT/fidelity.log"
  # One file for the whole folder (fidelity.json with the calibration's raw measurements, the
  # interference table included, plan.json, bench-rate*.json, the engine profile, serve.log):
  # `python -m benchmarks.fidelity --from-dir fidelity --out DIR [--fit-rates R]` re-predicts and refits it.
  [ -f "$OUT/fidelity/serve.log" ] && tail -n 3000 "$OUT/fidelity/serve.log" > "$OUT/serve.tail" \
    && mv "$OUT/serve.tail" "$OUT/fidelity/serve.log"
  tar czf "$OUT/fidelity.tar.gz" -C "$OUT" fidelity && rm -rf "$OUT/fidelity"
}
case "${STAGE:-main}" in
  main)           # GPU tests, KV transfer and engine benchmarks
    gpu_tests 300 25; kv_bench 200
    timeout 200 python3 -m benchmarks.engine --out "$OUT/engine.json" 2>&1 | tail -60 | tee "$OUT/engine.log" ;;
  engine)         # GPU tests, the engine benchmark (no HF), the profile
    gpu_tests 240 12
    timeout 200 python3 -m benchmarks.engine --no-hf --out "$OUT/engine.json" 2>&1 | tail -70 | tee "$OUT/engine.log"
    timeout 130 python3 -m cluster.cli profile --device cuda --model llama-3-8b --out "$OUT/H100_llama-3-8b.json" \
      2>&1 | tail -20 | tee "$OUT/profile.log" ;;
  fidelity-only)  fidelity 500 4,8,16,32,64,96,128 240 ;;
  final)          gpu_tests 220 8; kv_bench 120; fidelity 300 4,8,16,32 240 ;;
  tests-fidelity) gpu_tests 220 30; fidelity 270 8,16,32,64,96 160 ;;   # GPU=H200 on an H200
  role-change)    # issue 19: role change durations under load beside an instance's cold start
    timeout 420 python3 -m benchmarks.role_change --device cuda --model llama-3-8b --prompt-tokens 1024 \
      --output-tokens 128 --rate 4 --out "$OUT/role_change.json" 2>&1 | grep -v "^(raylet)" | tail -16 \
      | tee "$OUT/role_change.log" ;;
  *)              kv_bench 150; fidelity 420 4,8,16,32,64,96,128 240 ;;
esac
date -u

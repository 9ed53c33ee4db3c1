"""Prefix-aware against load-only routing on a real CPU cluster, replaying the Mooncake
conversation trace.

    python -m benchmarks.prefix_routing_cpu [--num-requests 300] [--time-scale 0.25] [--max-concurrency 4] [--out FILE]

For each routing it starts `disagg serve --plan benchmarks/plans/cpu_2p1d_embedded.json
--routing R` (two prefill instances and one decode instance of the embedded model, local Ray),
replays the first N requests of the trace with `disagg bench --workload mooncake-conv --replay
--hash-block-tokens 16` (each hash id one deterministic block of 16 token ids, prompt lengths
scaled by 16/512, so requests sharing hash ids share real prompt prefixes; outputs clipped to
--max-output-len; at most --max-concurrency requests in flight, in the trace's order), reads each prefill instance's hit rate from the server's Prometheus
endpoint, and stops the server. Prints per routing: prefix hit rate (cached prompt tokens /
prompt tokens, from the responses' usage and per instance from Prometheus), mean and p90 TTFT,
requests lost; beside the ceiling, the hit rate of one unbounded cache that sees every request.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "benchmarks" / "plans" / "cpu_2p1d_embedded.json"


def _serve(d: Path, routing: str, env) -> tuple[subprocess.Popen, dict]:
    ready = d / f"ready-{routing}.json"
    log = open(d / f"serve-{routing}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--plan", str(PLAN), "--routing", routing,
                             "--port", "0", "--metrics-port", "0", "--http-port", "-1", "--ready-file", str(ready)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not ready.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("serve did not start:\n" + (d / f"serve-{routing}.log").read_text()[-3000:])
        time.sleep(0.5)
    return proc, json.loads(ready.read_text())


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(2)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _gauges(host: str, port: int, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            out[labels.split('"')[1]] = float(value)
    return out


def run_one(d: Path, routing: str, args, env) -> dict:
    proc, ready = _serve(d, routing, env)
    try:
        out = d / f"bench-{routing}.json"
        cmd = [sys.executable, "-m", "cluster.cli", "bench", "--server", f"{ready['host']}:{ready['port']}",
               "--workload", "mooncake-conv", "--replay", "--num-requests", str(args.num_requests),
               "--time-scale", str(args.time_scale), "--hash-block-tokens", "16",
               "--max-output-len", str(args.max_output_len), "--max-concurrency", str(args.max_concurrency),
               "--seed", str(args.seed), "--out", str(out)]
        subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        res = json.loads(out.read_text())
        per = _gauges(ready["host"], ready["metrics_port"], "disagg_prefix_hit_rate")
    finally:
        _stop(proc)
    return {"routing": routing, "prefix_hit_rate": round(res["prefix_hit_rate"], 4),
            "prefix_hit_rate_per_instance": {k: round(v, 4) for k, v in sorted(per.items())},
            "mean_ttft_s": round(res["ttft_s"]["mean"], 4), "p50_ttft_s": round(res["ttft_s"]["p50"], 4),
            "p90_ttft_s": round(res["ttft_s"]["p90"], 4),
            "mean_prefill_queue_s": round(res["ttft_breakdown_s"]["prefill_queue"]["mean"], 4),
            "mean_prefill_compute_s": round(res["ttft_breakdown_s"]["prefill_compute"]["mean"], 4),
            "num_completed": res["num_completed"], "num_failed": res["num_failed"],
            "num_short_outputs": res["num_short_outputs"], "duration_s": round(res["duration_s"], 1),
            "offered_rate_rps": round(res["workload"]["offered_rate_rps"], 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=300)
    ap.add_argument("--time-scale", type=float, default=0.25, help="multiply the trace's arrival times")
    ap.add_argument("--max-output-len", type=int, default=16)
    ap.add_argument("--max-concurrency", type=int, default=4,
                    help="requests in flight at most (0 = open loop at the trace's times); a cap keeps a loaded "
                         "machine from turning the run into a queueing test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from benchmarks.prefix_routing import pooled_hit_rate
    from placement.workload import make_workload
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    wl = make_workload("mooncake-conv", num_requests=args.num_requests)
    out = {"plan": PLAN.name, "num_requests": args.num_requests, "time_scale": args.time_scale,
           "max_concurrency": args.max_concurrency,
           "hash_block_tokens": 16, "max_output_len": args.max_output_len,
           "ceiling_hit_rate_unbounded_cache": round(pooled_hit_rate(wl, float("inf")), 4), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.out).resolve().parent if args.out else Path(tmp)    # bench JSONs and logs kept beside --out
        for routing in ("load", "prefix"):
            print(f"routing={routing} ...", file=sys.stderr)
            out["runs"].append(run_one(d, routing, args, env))
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

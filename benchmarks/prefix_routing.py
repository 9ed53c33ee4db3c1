"""Prefix-aware routing against load-only routing, simulated on the Mooncake conversation trace.

    python -m benchmarks.prefix_routing [--prefill 4] [--decode 4] [--num-requests 0] [--max-model-len 32768]

A disaggregated llama-3-8b deployment on H100 (one GPU per instance, the committed profile
placement/profiles/H100_llama-3-8b.json) replays the trace's own timestamps; each prefill
instance has a prefix cache (the engine's BlockManager at the instance's KV capacity) fed with
prompts built from the trace's hash ids. The same run with `routing="prefix"` and
`routing="load"` prints the prefix hit rate (cached prompt tokens / prompt tokens, overall and
per instance) and the mean and p90 TTFT, beside the ceilings: the hit rate of one LRU cache as
large as all prefill instances' caches together that sees every request (what routing over
separate caches can at best approach), and of one unbounded cache (the trace's own reuse).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "placement" / "profiles" / "H100_llama-3-8b.json"


def pooled_hit_rate(wl, capacity_blocks: float, block_tokens: int = 512) -> float:
    """Hit rate of one LRU cache of `capacity_blocks` hash-id blocks that sees every request in
    order (a leading run of cached hash ids hits; the block holding the last token is always
    computed). With the pool's total capacity it bounds what routing over separate caches can
    reach; with inf it is the trace's own reuse."""
    lru, hit, total = OrderedDict(), 0, 0
    for ids, n in zip(wl.hash_ids, wl.prompt_lens.tolist()):
        k = 0
        for h in ids[:(n - 1) // block_tokens]:
            if h not in lru:
                break
            k += 1
        hit += k * block_tokens
        total += n
        for h in ids[:-(-n // block_tokens)]:
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > capacity_blocks:
            lru.popitem(last=False)
    return hit / total


def run_one(dep, wl, routing: str) -> dict:
    from placement.simulator import Simulator
    sim = Simulator(dep, wl, prefix_caching=True, routing=routing)
    wall = time.perf_counter()
    res = sim.run()
    wall = time.perf_counter() - wall
    ttft = res.first_token_s - res.arrival_s
    per = [p.bm.num_prefix_hit_tokens / max(1, p.bm.num_prefix_query_tokens) for p in sim.prefills]
    hit = sum(p.bm.num_prefix_hit_tokens for p in sim.prefills)
    query = sum(p.bm.num_prefix_query_tokens for p in sim.prefills)
    return {"routing": routing, "prefix_hit_rate": hit / max(1, query),
            "prefix_hit_rate_per_instance": [round(x, 4) for x in per],
            "num_batches_per_instance": [p.num_batches for p in sim.prefills],
            "mean_ttft_s": float(np.nanmean(ttft)), "p90_ttft_s": float(np.nanpercentile(ttft, 90)),
            "num_unfinished": int(np.isnan(res.finish_s).sum()), "sim_wall_s": round(wall, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", type=int, default=4, help="prefill instances (1 H100 each)")
    ap.add_argument("--decode", type=int, default=4, help="decode instances (1 H100 each)")
    ap.add_argument("--num-requests", type=int, default=0, help="first N requests (0 = the whole trace)")
    ap.add_argument("--max-model-len", type=int, default=32768, help="prompts clipped to this (their prefix kept)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times (0.5 = twice the rate)")
    ap.add_argument("--latency-model", default=str(PROFILE))
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args(argv)
    from dataclasses import replace

    from engine.plan import PhaseConfig, Plan
    from placement.deployment import deployment_from_plan
    from placement.workload import make_workload

    def phase(n):
        return PhaseConfig(num_instances=n, device="cuda", gpu_type="H100", max_batch_tokens=8192,
                           max_batch_size=64)
    plan = Plan(model="llama-3-8b", dtype="bfloat16", prefill=phase(args.prefill), decode=phase(args.decode))
    dep = deployment_from_plan(plan, args.latency_model)
    wl = make_workload("mooncake-conv", num_requests=args.num_requests or None, max_model_len=args.max_model_len)
    if args.time_scale != 1.0:
        wl = replace(wl, arrival_s=wl.arrival_s * args.time_scale)
    out = {"workload": {"name": "mooncake-conv", "num_requests": wl.num_requests, "rate": round(wl.rate, 3),
                        "mean_prompt_tokens": float(wl.prompt_lens.mean()), "max_model_len": args.max_model_len,
                        "time_scale": args.time_scale},
           "deployment": {"model": "llama-3-8b", "gpu": "H100", "num_prefill": args.prefill,
                          "num_decode": args.decode, "prefill_kv_blocks": dep.prefill.num_blocks,
                          "latency_model": Path(args.latency_model).name},
           "ceiling_hit_rate_pooled_cache": round(pooled_hit_rate(
               wl, args.prefill * dep.prefill.num_blocks * dep.block_size / 512), 4),
           "ceiling_hit_rate_unbounded_cache": round(pooled_hit_rate(wl, float("inf")), 4), "runs": []}
    for routing in ("load", "prefix"):
        print(f"simulating routing={routing} ...", file=sys.stderr)
        out["runs"].append(run_one(dep, wl, routing))
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""KV transfer between a prefill and a decode actor of a real cluster (dummy weights at a real
shape): bytes/s of the channel, and the latency the transfer adds after the prefill (the wait
before the second token), with layer-wise overlap on and off, for 512-8k-token prompts.

    python -m benchmarks.kv_transfer --model llama-3-8b --device cuda --out kv.json

On one GPU both actors share it (CUDA IPC); on CPU they use gloo. Prints each figure beside the
device's copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def copy_bandwidth_gbps(device: str) -> float:
    """Device-to-device copy of 1 GiB (CPU: 256 MiB), bytes read + written per second."""
    n = (2**30 if device == "cuda" else 2**28)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n / statistics.median(times) / 1e9


def run(model: str, device: str, lengths: list[int], layerwise: bool, reps: int) -> list[dict]:
    from cluster.api import Cluster
    from engine.plan import Plan
    from engine.sampling_params import SamplingParams
    phase = {"device": device, "max_batch_tokens": max(lengths) + 16, "max_batch_size": 8}
    if device == "cuda":
        phase.update(num_gpus_per_rank=0.5, gpu_memory_utilization=0.9)
    plan = Plan.from_dict({"model": model, "prefill": phase, "decode": phase, "layerwise_transfer": layerwise,
                           "enable_prefix_caching": False, "kv_transfer_timeout_s": 120})
    rows = []
    with Cluster.start(plan) as c:
        bytes_per_token = c.controller.block_bytes() // plan.block_size
        c.generate([[5] * 64], SamplingParams(max_tokens=2, ignore_eos=True), timeout=600)     # warm-up
        for n in lengths:
            exposed, compute, gbps, pack, unpack = [], [], [], [], []
            for r in range(reps):
                st = c.stats()["workers"]
                before, dbefore = st["prefill-0"], st["decode-0"]
                prompt = [(7 * r + i) % 250 + 3 for i in range(n)]
                out = c.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True), timeout=600)[0]
                st = c.stats()["workers"]
                after, dafter = st["prefill-0"], st["decode-0"]
                pack.append(after["kv_pack_seconds"] - before["kv_pack_seconds"])
                unpack.append(dafter["kv_pack_seconds"] - dbefore["kv_pack_seconds"])
                sent_bytes = after["kv_bytes"] - before["kv_bytes"]
                sent_s = after["kv_seconds"] - before["kv_seconds"]
                exposed.append(out.times.get("kv_transfer_s", 0.0))
                compute.append(out.times.get("prefill_compute_s", 0.0))
                gbps.append(sent_bytes / sent_s / 1e9 if sent_s > 0 else 0.0)
            rows.append({"prompt_tokens": n, "layerwise": layerwise, "kv_bytes": n * bytes_per_token,
                         "channel_gbps": statistics.median(gbps), "exposed_transfer_ms": 1e3 * statistics.median(exposed),
                         "prefill_compute_ms": 1e3 * statistics.median(compute),
                         "sender_pack_ms": 1e3 * statistics.median(pack), "receiver_unpack_ms": 1e3 * statistics.median(unpack),
                         "transport": next(iter(c.stats()["transports"].values()))})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from cluster.api import init_ray
    init_ray(None, num_gpus=1 if args.device == "cuda" else None)
    lengths = [int(x) for x in args.lengths.split(",")]
    copy = copy_bandwidth_gbps(args.device)
    rows = run(args.model, args.device, lengths, True, args.reps) + run(args.model, args.device, lengths, False, args.reps)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"KV transfer, {args.model}, {dev}; device copy bandwidth {copy:.0f} GB/s (read + write)")
    print(f"{'tokens':>7} {'layerwise':>9} {'KV MB':>8} {'channel GB/s':>13} {'% of copy':>9} "
          f"{'exposed ms':>11} {'prefill ms':>11} {'pack ms':>8} {'unpack ms':>9}  transport")
    for r in rows:
        print(f"{r['prompt_tokens']:>7} {str(r['layerwise']):>9} {r['kv_bytes'] / 1e6:>8.1f} {r['channel_gbps']:>13.1f} "
              f"{100 * r['channel_gbps'] / copy:>8.1f}% {r['exposed_transfer_ms']:>11.2f} {r['prefill_compute_ms']:>11.2f} "
              f"{r['sender_pack_ms']:>8.2f} {r['receiver_unpack_ms']:>9.2f}  {r['transport']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev, "model": args.model, "copy_gbps": copy, "date": time.strftime("%Y-%m-%d"),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

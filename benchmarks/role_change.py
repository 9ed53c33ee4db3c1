"""How long a role change takes under load (issue 19), beside what it avoids: starting an
instance from scratch (a Ray actor, the weights loaded, the KV cache allocated), which is what
a role change by restart would cost on top of its drain.

    python -m benchmarks.role_change                                  # CPU, embedded model
    python -m benchmarks.role_change --device cuda --model llama-3-8b --out role_change.json

The cluster is 1 prefill + 2 decode instances (on one GPU they share it, a quarter each, so a
fourth instance fits for the cold-start figure). Requests arrive at --rate while the instances
flip: decode-1 to prefill and back, prefill-0 to colocated and back, --rounds times. Every
request must finish with all its tokens; the run fails otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time


def plan_dict(model: str, device: str) -> dict:
    phase = {"device": device}
    if device == "cuda":
        phase.update(num_gpus_per_rank=0.25, gpu_memory_utilization=0.9)
    else:
        phase.update(num_kv_blocks=256)
    return {"model": model, "prefill": dict(phase), "decode": dict(phase, num_instances=2)}


async def cold_start_s(controller) -> float:
    """Start one extra decode instance from nothing and shut it down: the cost a role change
    without this feature would pay (plus its drain)."""
    from cluster.instances import shutdown_instance
    t0 = time.monotonic()
    inst = await controller.pools.create("decode", 99, instance_id="coldstart-0")
    took = time.monotonic() - t0
    await shutdown_instance(inst)
    return took


async def run(c, args) -> dict:
    from engine.sampling_params import SamplingParams
    ctl = c.controller
    rng = random.Random(0)
    results = {"finished": 0, "lost": 0, "tokens": 0}
    sp = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)

    async def one(i):
        prompt = [rng.randrange(3, 250) for _ in range(rng.randint(args.prompt_tokens // 2, args.prompt_tokens))]
        n, last = 0, None
        async for item in c.agenerate(prompt, sp, request_id=f"bench-{i}"):
            n += len(item.token_ids)
            last = item
        ok = last is not None and last.finish_reason == "length" and not last.error and n == args.output_tokens
        results["finished" if ok else "lost"] += 1
        results["tokens"] += n

    cold = await cold_start_s(ctl)
    flips = []
    stop = asyncio.Event()

    async def load():
        tasks, i = [], 0
        while not stop.is_set():
            tasks.append(asyncio.ensure_future(one(i)))
            i += 1
            await asyncio.sleep(rng.expovariate(args.rate))
        await asyncio.gather(*tasks)

    loader = asyncio.ensure_future(load())
    await asyncio.sleep(args.warmup_s)
    plan = [("decode-1", "prefill"), ("decode-1", "decode"), ("prefill-0", "colocated"), ("prefill-0", "prefill")]
    for _ in range(args.rounds):
        for iid, role in plan:
            flips.append(vars(await ctl.roles.change(iid, role, "benchmarks.role_change")))
            await asyncio.sleep(args.gap_s)
    stop.set()
    await loader
    return {"cold_start_s": cold, "flips": flips, **results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rate", type=float, default=8.0, help="requests/s while flipping")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="times the four flips run")
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--gap-s", type=float, default=1.0, help="pause between flips")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    import logging
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cluster.api import Cluster, init_ray
    from engine.plan import Plan
    init_ray(None, num_gpus=1 if args.device == "cuda" else None)
    with Cluster.start(Plan.from_dict(plan_dict(args.model, args.device))) as c:
        out = c._run(run(c, args))
    out.update(model=args.model, device=args.device, rate=args.rate, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(f"{'instance':<10} {'from':<10} {'to':<10} {'total s':>8} {'drain s':>8} {'switch s':>9} {'handed over':>12}")
    for f in out["flips"]:
        print(f"{f['instance_id']:<10} {f['old_role']:<10} {f['role']:<10} {f['seconds']:>8.3f} {f['drain_s']:>8.3f} "
              f"{f['switch_s']:>9.3f} {f['handed_over']:>12}")
    secs = [f["seconds"] for f in out["flips"]]
    print(f"role change: median {statistics.median(secs):.3f} s, max {max(secs):.3f} s over {len(secs)} flips; "
          f"cold start of one instance (actor + weights + KV cache): {out['cold_start_s']:.2f} s")
    print(f"requests: {out['finished']} finished with every token, {out['lost']} lost")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if out["lost"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`disagg demo`: the Quick start's main job. Starts a local Ray cluster with 1 prefill and
1 decode worker on CPU (embedded model), serves it over gRPC on 127.0.0.1, streams one
generation through a real gRPC client, prints the request's timings and the KV transfer
counters, and shuts everything down."""
from __future__ import annotations

import asyncio
import sys

from engine.plan import Plan
from engine.sampling_params import SamplingParams


async def demo(args) -> int:
    import grpc

    from cluster.api import Cluster, init_ray
    from cluster.grpc_client import make_request
    from cluster.grpc_server import start_server
    from cluster.metrics import Metrics
    from protos import inference_pb2_grpc as pb_grpc
    init_ray(None)
    plan = Plan.load(args.plan) if args.plan else Plan()
    print(f"starting {plan.prefill.num_instances} prefill + {plan.decode.num_instances} decode worker(s) "
          f"on {plan.prefill.device} with model {plan.model!r} ...", file=sys.stderr, flush=True)
    cluster = Cluster(plan, Metrics())
    await cluster.astart()
    server, port = await start_server(cluster, "127.0.0.1", 0)
    print(f"gRPC endpoint on 127.0.0.1:{port}; sending: {args.prompt!r}", file=sys.stderr, flush=True)
    if plan.model == "embedded":
        print("(the embedded model has random weights, so its text is noise; --plan with a model folder "
              "serves a real checkpoint)", file=sys.stderr, flush=True)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            last, n = None, 0
            async for resp in stub.Generate(make_request(args.prompt, sp), timeout=120):
                print(resp.text, end="", flush=True)
                n += len(resp.token_ids)
                last = resp
        t = last.timings
        print(f"\n\nfinish_reason={last.finish_reason} tokens={n} ttft={t.ttft_s * 1e3:.1f} ms "
              f"(prefill queue {t.prefill_queue_s * 1e3:.1f} + compute {t.prefill_compute_s * 1e3:.1f}), "
              f"kv transfer {t.kv_transfer_s * 1e3:.1f} ms, tpot {t.tpot_s * 1e3:.1f} ms, e2e {t.e2e_s * 1e3:.0f} ms")
        stats = await cluster.astats()
        for name, w in stats["workers"].items():
            print(f"  {name}: steps={w['num_steps']} kv_bytes={w['kv_bytes']} kv_messages={w['kv_messages']} "
                  f"free_blocks={w['free_blocks']}/{w['num_blocks']}")
        print(f"  transports: {stats['transports']}")
    finally:
        await server.stop(0)
        await cluster.ashutdown()
    return 0


def add_demo_args(p) -> None:
    p.add_argument("--plan", default=None, help="plan file (default: 1 prefill + 1 decode on CPU)")
    p.add_argument("--prompt", default="The quick brown fox")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)


def run(args) -> int:
    return asyncio.run(demo(args))

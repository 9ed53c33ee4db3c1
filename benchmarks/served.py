"""Served runs of the throughput workload (benchmarks/throughput.py): the same requests as the
in-process run, sent at once through gRPC to a `disagg serve` subprocess, and its output tok/s
beside the in-process engine's.

Plans (one device):
- `served_colocated`: one colocated instance with the in-process run's schedule, batch limits
  and chunk size;
- `served_1p1d`: one prefill and one decode instance sharing the device (`--prefill-gpu-share`
  of its memory to the prefill instance, the rest to decode; CUDA IPC for the KV on a GPU).

The client is one grpc.aio channel with every request's stream open at once (token-id prompts,
greedy, ignore_eos, max_tokens = the table's output length); the figure is the wall time from
the first send to the last stream's end. Every stream must return exactly its output length,
else the run fails. DISAGG_ASYNC_SCHEDULING reaches the workers through serve's environment.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVED_MODES = ("served_colocated", "served_1p1d")


def served_plan(mode: str, args, async_on: bool | None = None) -> dict:
    cuda = args.device == "cuda"
    common = {"device": args.device, "max_batch_size": args.max_batch_size,
              "gpu_memory_utilization": args.gpu_memory_utilization, "async_scheduling": async_on}
    plan = {"model": args.model, "dtype": "bfloat16" if cuda else "auto", "max_model_len": args.max_len,
            "enable_prefix_caching": False}
    if mode == "served_colocated":
        plan["mode"] = "colocated"
        plan["colocated"] = {**common, "schedule": args.served_schedule, "chunk_tokens": args.chunk_tokens,
                             "max_batch_tokens": args.max_batch_tokens, "num_gpus_per_rank": 1.0 if cuda else 0.0}
    else:
        # The GPU's memory split by Ray's GPU fractions: the prefill side holds a prompt's KV only
        # until it has moved, the decode side every running request's.
        share = args.prefill_gpu_share
        plan["mode"] = "disaggregated"
        plan["kv_transport"] = "cuda_ipc" if cuda else "auto"
        plan["prefill"] = {**common, "max_batch_tokens": args.max_batch_tokens,
                           **({"num_gpus_per_rank": share} if cuda else {})}
        plan["decode"] = {**common, "max_batch_tokens": args.max_batch_tokens,
                          **({"num_gpus_per_rank": round(1.0 - share, 3)} if cuda else {})}
    if args.num_kv_blocks:
        for phase in ("colocated", "prefill", "decode"):
            if phase in plan:
                plan[phase]["num_kv_blocks"] = args.num_kv_blocks
    return plan


def start_serve(plan: dict, folder: Path, async_on: bool | None, profile: str | None, timeout_s: float = 600):
    (folder / "plan.json").write_text(json.dumps(plan))
    ready = folder / "ready.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    if async_on is not None:
        env["DISAGG_ASYNC_SCHEDULING"] = "1" if async_on else "0"
    if profile:
        env["DISAGG_SERVE_PROFILE"] = profile
    log = open(folder / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--plan", str(folder / "plan.json"),
                             "--port", "0", "--metrics-port", "-1", "--http-port", "-1", "--ready-file", str(ready)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while not ready.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("serve did not start:\n" + (folder / "serve.log").read_text()[-3000:])
        time.sleep(0.2)
    return proc, json.loads(ready.read_text())


def stop_serve(proc, timeout_s: float = 90) -> None:
    if proc.poll() is None:
        proc.send_signal(2)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def send_all(address: str, reqs, log) -> dict:
    """Every request at once over one channel; returns wall time, tokens and messages."""
    import grpc

    from cluster.grpc_client import make_request
    from protos import inference_pb2_grpc as pb_grpc
    counts = [0] * len(reqs)
    checks = [0] * len(reqs)
    messages = 0
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_concurrent_streams", 1 << 20)]) as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def one(i, prompt, sp):
            nonlocal messages
            async for resp in stub.Generate(make_request(prompt, sp, f"r{i}")):
                messages += 1
                counts[i] += len(resp.token_ids)
                checks[i] += sum(resp.token_ids)
        t0 = time.perf_counter()
        await asyncio.gather(*[one(i, p, sp) for i, (p, sp) in enumerate(reqs)])
        elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "counts": counts, "token_checksum": int(sum(checks) % (1 << 61)),
            "messages": messages}


def run_served(mode: str, prompts, outputs, args, salt: int, log, async_on: bool | None) -> dict:
    from engine.model_config import PRESETS
    from engine.sampling_params import SamplingParams
    from placement.workload import prompt_token_ids
    vocab = PRESETS[args.model].vocab_size if args.model in PRESETS else 32000
    reqs = [(prompt_token_ids(i, int(p), vocab, salt=salt), SamplingParams(max_tokens=int(o), ignore_eos=True))
            for i, (p, o) in enumerate(zip(prompts, outputs))]
    tag = f"{mode}{'' if async_on is None else ('_async' if async_on else '_sync')}"
    folder = Path(tempfile.mkdtemp(prefix=f"served_{tag}_"))
    profile = str(Path(args.profile_dir) / f"{tag}.prof") if args.profile_dir else None
    t0 = time.perf_counter()
    proc, ready = start_serve(served_plan(mode, args, async_on), folder, async_on, profile)
    start_s = time.perf_counter() - t0
    try:
        got = asyncio.run(send_all(f"{ready['host']}:{ready['port']}", reqs, log))
    finally:
        stop_serve(proc)
    want = [int(o) for o in outputs]
    if got["counts"] != want:
        bad = sum(a != b for a, b in zip(got["counts"], want))
        raise RuntimeError(f"{tag}: {bad} requests returned the wrong number of tokens (see {folder}/serve.log)")
    n_out = sum(want)
    res = {"mode": tag, "async_scheduling": async_on, "schedule": args.served_schedule, "elapsed_s": got["elapsed_s"], "start_s": start_s,
           "output_tokens": n_out, "total_tokens": n_out + int(prompts.sum()),
           "output_tok_s": n_out / got["elapsed_s"], "total_tok_s": (n_out + int(prompts.sum())) / got["elapsed_s"],
           "messages": got["messages"], "tokens_per_message": n_out / max(1, got["messages"]),
           "token_checksum": got["token_checksum"], "serve_log": str(folder / "serve.log"), "profile": profile}
    log(f"{tag:>22}: {res['elapsed_s']:7.1f} s, {res['output_tok_s']:7.0f} output tok/s, {res['total_tok_s']:7.0f} "
        f"total tok/s, {res['tokens_per_message']:.2f} tokens per message (serve started in {start_s:.0f} s)")
    return res


TARGETS = {"served_colocated": 0.95, "served_1p1d": 0.85}


def ratio_lines(runs: list[dict]) -> list[str]:
    """Each served run's output tok/s over the in-process run of the same schedule (the
    colocated plan's), beside issue 18's target."""
    inproc = {r["mode"]: r for r in runs if not r["mode"].startswith("served")}
    out = []
    for r in runs:
        if not r["mode"].startswith("served"):
            continue
        suffix = {True: "_async", False: "_sync", None: ""}[r["async_scheduling"]]
        base = next((inproc[m + suffix] for m in (r.get("schedule"), "chunked", "prefill_first") if m + suffix in inproc), None)
        if base is None:
            continue
        kind = "served_colocated" if r["mode"].startswith("served_colocated") else "served_1p1d"
        ratio = r["output_tok_s"] / base["output_tok_s"]
        same = "same tokens as in-process" if r["token_checksum"] == base["token_checksum"] else "tokens differ from in-process"
        r["ratio_vs_in_process"] = ratio
        out.append(f"{r['mode']:>22}: {ratio:6.1%} of in-process {base['mode']} ({base['output_tok_s']:.0f} tok/s); "
                   f"target >= {TARGETS[kind]:.0%}: {'met' if ratio >= TARGETS[kind] else 'NOT met'} ({same})")
    return out

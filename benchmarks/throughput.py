"""Offline throughput of the in-process engine, in the style of vLLM's `benchmark_throughput`:
every request is submitted at once and the engine runs until all are done; the figure is the
wall time, and output / total tokens per second.

Workload: the `sharegpt_8k` length table (placement/traces/length_distributions), rows with
prompt + output <= --max-len (4,096), `--num-requests` (1,000) of them drawn with `--seed` (0);
synthetic prompt token ids (placement.workload.prompt_token_ids, salted per run so runs never
share a cached prefix); greedy, ignore_eos: every request produces exactly its table output length.

Modes (one after the other, each on a fresh engine): in-process `prefill_first` and `chunked`
(prefill chunks and decode tokens in one forward pass, `--chunk-tokens` per step); served
`served_colocated` and `served_1p1d` (benchmarks/served.py: the same requests through gRPC and
`disagg serve`, printed as a share of the in-process run beside issue 18's targets).
`--async-scheduling on|off|both` runs every mode with async scheduling on, off, or both (auto:
the engine's default, on for CUDA).

Beside each time it prints the workload's bound, from ceilings measured in the same run
(benchmarks/ceilings.py): every prompt's FLOPs (2 x tokens x layer weights + causal attention
+ one logits row) at the measured matmul rate, plus every decode step's bytes at the measured
streaming-read rate: the KV each output token attends to, and the weights once per step, with
as few steps as the batch limit allows (total decode tokens / max batch, and at least the
longest request's output). No schedule can beat it; `time / bound` is the figure judged.
Usage: python -m benchmarks.throughput --out throughput.json [--num-requests 1000] [--modes ...]
       [--async-scheduling both] [--modes chunked,served_colocated,served_1p1d]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import time

import numpy as np

MODEL = "llama-3-8b"


def sharegpt_lengths(num_requests: int, max_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt lens, output lens): rows of the table with prompt + output <= max_len, drawn
    without replacement with `seed`."""
    from placement.workload import load_trace
    tr = load_trace("sharegpt")
    ok = np.flatnonzero((tr.prompt_lens + tr.output_lens <= max_len) & (tr.output_lens >= 1))
    idx = np.random.default_rng(seed).permutation(ok)[:num_requests]
    return tr.prompt_lens[idx], tr.output_lens[idx]


def workload_bound(cfg, prompts, outputs, matmul_flops: float, read_bps: float, max_batch: int,
                   weight_bytes: int) -> dict:
    """Seconds no schedule can beat on this device (module docstring)."""
    layer_params = cfg.flops_per_token() / 2 - cfg.vocab_size * cfg.hidden_size     # lm_head: one row
    flops = sum(2.0 * p * layer_params + cfg.attention_flops(int(p), int(p)) + 2.0 * cfg.hidden_size * cfg.vocab_size
                for p in prompts)
    decode_tokens = int((outputs - 1).sum())
    # The token sampled at step j of a request attends to prompt + j tokens (j = 1 .. output - 1).
    kv_tokens = float(sum((o - 1) * p + (o - 1) * o / 2 for p, o in zip(prompts, outputs)))
    steps = max(int(outputs.max()) - 1, -(-decode_tokens // max_batch))
    prefill_s = flops / matmul_flops
    decode_s = (kv_tokens * cfg.kv_bytes_per_token() + steps * weight_bytes) / read_bps
    return {"prefill_flops": flops, "decode_tokens": decode_tokens, "kv_token_reads": kv_tokens,
            "min_decode_steps": steps, "prefill_s": prefill_s, "decode_s": decode_s, "bound_s": prefill_s + decode_s}


def run_mode(mode: str, prompts, outputs, args, salt: int, log, async_on: bool | None = None) -> dict:
    import torch

    from engine.sampling_params import SamplingParams
    from model.llm import LLM
    from placement.workload import prompt_token_ids
    t0 = time.perf_counter()
    llm = LLM(args.model, device=args.device, dtype="bfloat16" if args.device == "cuda" else "auto", max_batch_size=args.max_batch_size,
              max_batch_tokens=args.max_batch_tokens, max_model_len=args.max_len, mode=mode,
              chunk_tokens=args.chunk_tokens, enable_prefix_caching=False,
              gpu_memory_utilization=args.gpu_memory_utilization, async_scheduling=async_on,
              num_kv_blocks=args.num_kv_blocks)
    build_s = time.perf_counter() - t0
    vocab = llm.cfg.vocab_size
    reqs = [(prompt_token_ids(i, int(p), vocab, salt=salt), SamplingParams(max_tokens=int(o), ignore_eos=True))
            for i, (p, o) in enumerate(zip(prompts, outputs))]
    t0 = time.perf_counter()
    ids = [llm.add_request(p, sp) for p, sp in reqs]
    steps, last_log = 0, t0
    while llm.has_unfinished:
        llm.step()
        steps += 1
        if time.perf_counter() - last_log > 20:
            last_log = time.perf_counter()
            log(f"  {mode}: {last_log - t0:5.0f} s, {steps} steps, {len(llm.requests)} requests unfinished")
    elapsed = time.perf_counter() - t0
    outs = [llm.take_result(i) for i in ids]
    got = sum(len(o.token_ids) for o in outs)
    if got != int(outputs.sum()):
        raise RuntimeError(f"{mode}: {got} output tokens, expected {int(outputs.sum())} (a request lost tokens)")
    tag = mode + {True: "_async", False: "_sync", None: ""}[async_on]
    res = {"mode": tag, "async_scheduling": async_on, "elapsed_s": elapsed, "steps": steps, "build_s": build_s,
           "mixed_steps": llm.runner.num_mixed_steps, "num_kv_blocks": llm.block_manager.num_blocks,
           "output_tokens": got, "total_tokens": got + int(prompts.sum()),
           "output_tok_s": got / elapsed, "total_tok_s": (got + int(prompts.sum())) / elapsed,
           "chunk_tokens": args.chunk_tokens if mode == "chunked" else None,
           "token_checksum": int(sum(sum(o.token_ids) for o in outs) % (1 << 61))}
    log(f"{tag:>22}: {elapsed:7.1f} s, {steps} steps ({res['mixed_steps']} mixed), {res['output_tok_s']:7.0f} output tok/s, "
        f"{res['total_tok_s']:7.0f} total tok/s (engine built in {build_s:.1f} s)")
    del llm, outs, reqs
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="throughput.json")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--max-len", type=int, default=4096, help="prompt + output limit of the rows drawn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="chunked,prefill_first")
    ap.add_argument("--chunk-tokens", type=int, default=2048, help="chunked: tokens per step (decodes included)")
    ap.add_argument("--max-batch-tokens", type=int, default=4096, help="prefill-first: prompt tokens per prefill step")
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--model", default=MODEL, help="preset or model folder (dummy weights for presets)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a smoke test of the harness (no ceilings, no bound)")
    ap.add_argument("--num-kv-blocks", type=int, default=0, help="0: size the cache from memory")
    ap.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off", "both"])
    ap.add_argument("--served-schedule", default="chunked", choices=["chunked", "prefill_first"],
                    help="the colocated served plan's schedule (its in-process twin is the baseline)")
    ap.add_argument("--profile-dir", default=None, help="served modes: cProfile of each serve process here")
    ap.add_argument("--prefill-gpu-share", type=float, default=0.25,
                    help="served_1p1d on a GPU: the prefill instance's share of it (the decode instance gets the rest)")
    args = ap.parse_args(argv)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.throughput: needs a CUDA GPU (or --device cpu for a smoke test)", flush=True)
        return 2
    from benchmarks import ceilings
    from engine.model_config import PRESETS

    def log(s):
        print(s, flush=True)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    from benchmarks.served import SERVED_MODES, ratio_lines, run_served
    bad = [m for m in modes if m not in ("prefill_first", "chunked", *SERVED_MODES)]
    if bad:
        ap.error(f"--modes: unknown {bad}; choose from prefill_first, chunked, {', '.join(SERVED_MODES)}")
    asyncs = {"auto": [None], "on": [True], "off": [False], "both": [True, False]}[args.async_scheduling]
    prompts, outputs = sharegpt_lengths(args.num_requests, args.max_len, args.seed)
    cfg = PRESETS[args.model]
    if args.device == "cuda":
        ceil = ceilings.measure()
    else:   # no ceilings on CPU: nominal rates keep the harness's arithmetic exercised
        ceil = {"device": "cpu", "read_GBps": 10.0, "copy_GBps": 10.0, "matmul_bf16_TFLOPs": 0.1}
    weight_bytes = cfg.flops_per_token()        # 2 bytes per matrix weight, lm_head included
    bound = workload_bound(cfg, prompts, outputs, ceil["matmul_bf16_TFLOPs"] * 1e12, ceil["read_GBps"] * 1e9,
                           args.max_batch_size, weight_bytes)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": ceil["device"], "model": args.model, "args": vars(args), "ceilings": ceil,
           "workload": {"name": "sharegpt_8k", "num_requests": len(prompts), "mean_prompt": float(prompts.mean()),
                        "mean_output": float(outputs.mean()), "prompt_tokens": int(prompts.sum()),
                        "output_tokens": int(outputs.sum())},
           "bound": bound, "runs": []}
    log(f"ceilings: read {ceil['read_GBps']:.0f} GB/s, copy {ceil['copy_GBps']:.0f} GB/s, matmul "
        f"{ceil['matmul_bf16_TFLOPs']:.0f} TFLOP/s on {ceil['device']}")
    log(f"workload: {len(prompts)} requests, mean {prompts.mean():.0f} in / {outputs.mean():.0f} out; bound "
        f"{bound['bound_s']:.1f} s (prefill {bound['prefill_s']:.1f} s + decode {bound['decode_s']:.1f} s)")
    if args.profile_dir:
        import os
        os.makedirs(args.profile_dir, exist_ok=True)
    # The served schedule's in-process run and the served runs share one salt (the same
    # requests, token for token); other in-process modes get their own.
    served_salt = args.seed * 100 + 1
    for i, mode in enumerate(modes):
        for async_on in asyncs:
            if mode in SERVED_MODES:
                run = run_served(mode, prompts, outputs, args, served_salt, log, async_on)
            else:
                salt = served_salt if mode == args.served_schedule else args.seed * 100 + i + 2
                run = run_mode(mode, prompts, outputs, args, salt=salt, log=log, async_on=async_on)
            res["runs"].append(run)
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
    log(f"{'mode':>22}  {'time s':>7}  {'bound s':>7}  {'x bound':>7}  {'out tok/s':>9}  {'total tok/s':>11}")
    for r in res["runs"]:
        log(f"{r['mode']:>22}  {r['elapsed_s']:7.1f}  {bound['bound_s']:7.1f}  {r['elapsed_s'] / bound['bound_s']:7.2f}  "
            f"{r['output_tok_s']:9.0f}  {r['total_tok_s']:11.0f}")
    for line in ratio_lines(res["runs"]):
        log(line)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

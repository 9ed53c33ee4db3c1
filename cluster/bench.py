"""`disagg bench`: a load generator against a `disagg serve` gRPC endpoint (as `vllm bench serve`).

Requests come from placement's workloads (a trace of data/traces/, a length-distribution CSV,
or `random:IN,OUT[,RATIO]`), arrive by Poisson/gamma at `--rate` or by the trace's own
timestamps (`--replay`, `--time-scale`), and ask for exactly the workload's output length
(ignore_eos). Every streamed message is timestamped on receipt, so TTFT, TPOT, inter-token and
end-to-end latency are what a client sees. Statuses such as RESOURCE_EXHAUSTED are counted,
never raised.

A request meets the SLO when it completed, TTFT <= --ttft-slo-s and TPOT <= --tpot-slo-s
(TPOT = (last token - first token) / (output tokens - 1); 0 for one-token outputs; a missing
target is unbounded). Attainment = requests meeting it / requests sent. Goodput here is a rate:
requests meeting the SLO per second of the run (first arrival to last response), as vLLM's
request goodput; issue 5's goodput (the highest rate at an attainment target) is found by
running this at several rates (benchmarks/fidelity.py does).
"""
from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass, field, replace

import numpy as np

from engine.errors import ConfigError, DisaggError



@dataclass
class Record:
    """One request as the client saw it; times in seconds from the run's start."""
    index: int
    prompt_len: int
    output_len: int
    arrival_s: float
    sent_s: float = math.nan
    first_token_s: float = math.nan
    last_token_s: float = math.nan
    done_s: float = math.nan
    num_tokens: int = 0
    status: str = "NOT_SENT"
    error: str = ""
    finish_reason: str = ""
    timings: dict = field(default_factory=dict)     # the server's, from the last message
    cached_tokens: int = 0                          # prompt tokens the server's prefix cache served
    num_messages: int = 0                           # token-bearing messages (the server may batch tokens)
    itl_s: list = field(default_factory=list)       # gaps between token-bearing messages

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.sent_s

    @property
    def tpot_s(self) -> float:
        return 0.0 if self.num_tokens <= 1 else (self.last_token_s - self.first_token_s) / (self.num_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return self.done_s - self.sent_s


# Workload -------------------------------------------------------------------------------------
def random_workload(spec: str, num: int, arrival: str, cv: float, seed: int):
    """`random:IN,OUT[,RATIO]`: lengths uniform in [x (1 - RATIO), x (1 + RATIO)], arrivals at
    mean rate 1 (rescale with `at_rate`)."""
    from placement.workload import Workload, unit_gaps
    try:
        parts = [float(x) for x in spec.split(":", 1)[1].split(",")]
        n_in, n_out, ratio = int(parts[0]), int(parts[1]), (parts[2] if len(parts) > 2 else 0.0)
    except (IndexError, ValueError):
        raise ConfigError(f"workload {spec!r}: expected random:IN,OUT[,RATIO], e.g. random:128,32,0.5") from None
    if n_in < 1 or n_out < 1 or not 0 <= ratio < 1:
        raise ConfigError(f"workload {spec!r}: IN and OUT must be >= 1 and RATIO in [0, 1)")
    rng = np.random.default_rng(seed)

    def draw(x):
        return rng.integers(max(1, int(x * (1 - ratio))), int(x * (1 + ratio)) + 1, num)
    arr = np.concatenate([[0.0], np.cumsum(unit_gaps(num, arrival, cv, seed)[:-1])])
    return Workload(spec, arr, draw(n_in), draw(n_out))


def build_workload(args):
    """The workload the run replays (before clipping to the server's limits). No --rate and no
    --replay: every request at once (rate inf), as vLLM does."""
    from placement.workload import make_workload
    if args.rate is not None and not args.rate > 0:
        raise ConfigError(f"--rate must be > 0, got {args.rate}")
    if args.time_scale <= 0:
        raise ConfigError(f"--time-scale must be > 0, got {args.time_scale}")
    burst = (args.rate is None and not args.replay) or (args.rate is not None and math.isinf(args.rate))
    rate = None if burst else args.rate
    num = args.num_requests
    if num is None and args.duration_s and not args.replay:
        if rate is None:
            raise ConfigError("--duration-s needs a finite --rate (or --replay, or --num-requests)")
        num = int(rate * args.duration_s * 1.5) + 20       # enough arrivals to fill the duration
    elif num is None and not args.duration_s:
        num = 100
    if isinstance(args.replay, str):
        # Traces back to back at their own timestamps: the mix shifts during the run.
        from placement.trace_mix import back_to_back
        wl, segments = back_to_back(args.replay)
        if args.rate is not None:
            wl = wl.at_rate(args.rate)
            segments = _rescaled(segments, wl)
        if args.num_requests is not None:
            wl = wl.head(args.num_requests)
        args.segments = segments
    elif args.workload.startswith("random:"):
        if args.replay:
            raise ConfigError("--replay needs a timed trace, not a random workload")
        wl = random_workload(args.workload, num, args.arrival, args.cv, args.seed)
        wl = wl.at_rate(rate) if rate else wl
    else:
        wl = make_workload(args.workload, rate=rate, num_requests=num, arrival="trace" if args.replay else args.arrival,
                           cv=args.cv, seed=args.seed)
    scale = 0.0 if burst else args.time_scale
    if scale != 1.0:
        wl = replace(wl, arrival_s=wl.arrival_s * scale)
        if getattr(args, "segments", None):
            from placement.trace_mix import Segment
            args.segments = [Segment(g.name, g.start_s * scale, g.end_s * scale, g.num_requests) for g in args.segments]
    if args.duration_s:
        wl = wl.head(max(1, int((wl.arrival_s < args.duration_s).sum())))
    return scale_hash_blocks(wl, getattr(args, "hash_block_tokens", 512))


def scale_hash_blocks(wl, block_tokens: int):
    """A trace with hash ids (Mooncake: one id per 512-token block) replayed with `block_tokens`
    tokens per hash id: prompt lengths scale by block_tokens / 512, so a small model's context
    holds the same chains of shared blocks (each id still one deterministic block of tokens)."""
    from placement.workload import MOONCAKE_BLOCK_TOKENS
    if block_tokens < 1:
        raise ConfigError(f"--hash-block-tokens must be >= 1, got {block_tokens}")
    if wl.hash_ids is None or block_tokens == MOONCAKE_BLOCK_TOKENS:
        return wl
    lens = -(-wl.prompt_lens * block_tokens // MOONCAKE_BLOCK_TOKENS)
    return replace(wl, prompt_lens=np.maximum(1, lens))


def _rescaled(segments, wl):
    """Segments' times after `at_rate` moved the arrivals (the request counts locate them)."""
    from placement.trace_mix import Segment
    out, lo = [], 0
    for g in segments:
        hi = lo + g.num_requests
        out.append(Segment(g.name, float(wl.arrival_s[lo]), float(wl.arrival_s[hi - 1]), g.num_requests))
        lo = hi
    return out


def clip_lengths(wl, info, max_prompt_len: int = 0, max_output_len: int = 0):
    """Prompt and output lengths that the server accepts. Returns (prompts, outputs, notes)."""
    ctx = info.max_model_len
    p_cap = min(x for x in (ctx - 1, info.max_prompt_tokens, max_prompt_len) if x > 0)
    prompt = np.clip(wl.prompt_lens, 1, p_cap)
    o_caps = [x for x in (info.max_tokens_limit, max_output_len) if x > 0]
    output = np.minimum(wl.output_lens, min(o_caps)) if o_caps else wl.output_lens.copy()
    output = np.maximum(1, np.minimum(output, ctx - prompt))
    notes = {"num_prompts_clipped": int((prompt != wl.prompt_lens).sum()),
             "num_outputs_clipped": int((output != wl.output_lens).sum()),
             "max_prompt_len": int(p_cap), "max_output_len": int(min(o_caps)) if o_caps else int(ctx - 1)}
    return prompt.astype(int), output.astype(int), notes


# The run ----------------------------------------------------------------------------------
async def _one(stub, rec: Record, msg, t0: float, metadata, timeout_s):
    from grpc import aio
    rec.sent_s = time.perf_counter() - t0
    last = None
    try:
        async for resp in stub.Generate(msg, metadata=metadata, timeout=timeout_s):
            now = time.perf_counter() - t0          # on receipt, before any other work
            if resp.token_ids:
                if rec.num_tokens:
                    rec.itl_s.append(now - rec.last_token_s)
                else:
                    rec.first_token_s = now
                rec.last_token_s = now
                rec.num_tokens += len(resp.token_ids)
                rec.num_messages += 1
            last = resp
        rec.done_s = time.perf_counter() - t0
        rec.status = "OK"
        if last is not None:
            rec.finish_reason = last.finish_reason
            rec.timings = {f.name: getattr(last.timings, f.name) for f in last.timings.DESCRIPTOR.fields}
            rec.cached_tokens = last.usage.cached_tokens
    except aio.AioRpcError as e:
        rec.status, rec.error = e.code().name, (e.details() or "")[:200]
    except Exception as e:  # noqa: BLE001 - a client-side failure is counted, never fatal
        rec.status, rec.error = "CLIENT_ERROR", f"{type(e).__name__}: {e}"[:200]


def plan_requests(wl, info, args):
    """(records, prompt token ids, output lengths, notes): the same for every backend, so runs
    with one seed against two servers send the very same requests."""
    from placement.workload import prompt_token_ids
    prompts, outputs, notes = clip_lengths(wl, info, args.max_prompt_len, args.max_output_len)
    # Prompts depend on the seed: a run with another seed shares no prefix with this one.
    ids = [prompt_token_ids(i, int(p), info.vocab_size, wl.hash_ids[i] if wl.hash_ids else None,
                            block_tokens=getattr(args, "hash_block_tokens", 512), salt=args.seed)
           for i, p in enumerate(prompts)]
    recs = [Record(i, int(p), int(o), float(a)) for i, (p, o, a) in enumerate(zip(prompts, outputs, wl.arrival_s))]
    return recs, ids, [int(o) for o in outputs], notes


async def drive(recs, msgs, send, max_concurrency: int, notes: dict) -> None:
    """Send msgs[i] at recs[i].arrival_s (at most max_concurrency in flight); send(rec, msg, t0)."""
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def gated(rec, msg, t0):
        try:
            await send(rec, msg, t0)
        finally:
            if sem:
                sem.release()
    tasks, t0 = [], time.perf_counter()
    notes["start_unix_s"] = time.time()        # record times count from here
    for rec, msg in zip(recs, msgs):
        delay = rec.arrival_s - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        if sem:
            await sem.acquire()
        tasks.append(asyncio.create_task(gated(rec, msg, t0)))
    await asyncio.gather(*tasks)


async def replay(args):
    """Connect, fetch the server's limits and replay the workload. Returns (records, workload,
    ModelInfo, clipping notes); `run_async` summarises them."""
    if getattr(args, "backend", "grpc") == "openai":
        from cluster.bench_openai import replay_openai
        return await replay_openai(args)
    from cluster.grpc_client import auth_metadata, channel, make_request
    from engine.sampling_params import SamplingParams
    from protos import inference_pb2 as pb
    from protos import inference_pb2_grpc as pb_grpc
    import grpc
    if not args.server:
        raise ConfigError("--server HOST:PORT is required with --backend grpc")
    wl = build_workload(args)
    md = auth_metadata(args.token)
    async with channel(args.server, args.tls_ca, aio=True) as ch:
        stub = pb_grpc.InferenceStub(ch)
        try:
            info = await stub.ModelInfo(pb.ModelInfoRequest(), metadata=md, timeout=args.connect_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise DisaggError(f"server {args.server}: {e.code().name}: {e.details()} (is `disagg serve` running there?)") from None
        recs, ids, outputs, notes = plan_requests(wl, info, args)
        run_id = uuid.uuid4().hex[:8]               # request ids must not collide with another run's
        for _ in range(args.num_warmups):          # first steps on a fresh server are slow
            warm = make_request(list(range(8)), SamplingParams(max_tokens=4, ignore_eos=True))
            await _one(stub, Record(-1, 8, 4, 0.0), warm, time.perf_counter(), md, args.request_timeout_s)
        msgs = [make_request(p, SamplingParams(max_tokens=o, ignore_eos=True, seed=args.seed), f"bench-{run_id}-{i}")
                for i, (p, o) in enumerate(zip(ids, outputs))]
        await drive(recs, msgs, lambda rec, msg, t0: _one(stub, rec, msg, t0, md, args.request_timeout_s),
                    args.max_concurrency, notes)
    return recs, wl, info, notes


async def run_async(args) -> dict:
    """The whole benchmark: replay, then every figure as one dict."""
    from cluster.bench_report import summarize
    return summarize(*await replay(args), args=args)


def add_bench_args(p) -> None:
    import os
    p.add_argument("--backend", default="grpc", choices=["grpc", "openai"],
                   help="grpc: a `disagg serve` gRPC endpoint (--server); openai: any OpenAI-compatible server "
                        "(--base-url), e.g. our HTTP front, vLLM or SGLang, through /v1/completions")
    p.add_argument("--server", default=None, help="HOST:PORT of a `disagg serve` gRPC endpoint")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="--backend openai: the model name (default: the server's first)")
    p.add_argument("--vocab-size", type=int, default=0,
                   help="--backend openai: vocabulary size for the prompt token ids (default: from /v1/models)")
    p.add_argument("--token", default=os.environ.get("DISAGG_TOKEN"), help="bearer token (env DISAGG_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="CA certificate for a TLS server")
    p.add_argument("--workload", default="sharegpt",
                   help="azure-conv, azure-code, mooncake-conv, mooncake-synthetic, sharegpt, arxiv, a trace file, "
                        "or random:IN,OUT[,RATIO]")
    p.add_argument("--rate", type=float, default=None, help="mean request rate, req/s (inf = all at once)")
    p.add_argument("--arrival", default="poisson", choices=["poisson", "gamma"])
    p.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gamma gaps")
    p.add_argument("--replay", nargs="?", const=True, default=False, metavar="TRACE[,TRACE...]",
                   help="use the trace's own timestamps (with --rate: rescaled); with traces named (NAME[:SECONDS] "
                        "or trace files, comma-separated) replay them back to back instead of --workload, so the mix "
                        "shifts during the run")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply arrival times (0.01 = compressed 100 times, 0.5 = twice as fast)")
    p.add_argument("--window-s", type=float, default=0.0,
                   help="attainment per window of this many seconds of arrivals in the JSON (0 = a tenth of the run)")
    p.add_argument("--num-requests", type=int, default=None, help="requests to send (default 100)")
    p.add_argument("--duration-s", type=float, default=None, help="send only requests arriving before this")
    p.add_argument("--max-concurrency", type=int, default=0, help="requests in flight at most (0 = unbounded)")
    p.add_argument("--hash-block-tokens", type=int, default=512,
                   help="traces with hash ids (mooncake-*): tokens per hash id; prompt lengths scale by N/512, so "
                        "e.g. 16 replays the trace's shared prefixes within a small model's context")
    p.add_argument("--max-prompt-len", type=int, default=0, help="clip prompts (besides the server's limits)")
    p.add_argument("--max-output-len", type=int, default=0, help="clip outputs (besides the server's limits)")
    p.add_argument("--seed", type=int, default=0,
                   help="arrivals, sampled trace rows and prompt token ids; runs with different seeds share "
                        "no prompt prefix (the server's prefix cache keeps what an earlier run sent)")
    p.add_argument("--ttft-slo-s", type=float, default=None)
    p.add_argument("--tpot-slo-s", type=float, default=None)
    p.add_argument("--num-warmups", type=int, default=1, help="untimed requests before the run")
    p.add_argument("--request-timeout-s", type=float, default=None)
    p.add_argument("--connect-timeout-s", type=float, default=10.0)
    p.add_argument("--out", default=None, help="write the JSON result here")


def run(args) -> int:
    for name in ("num_requests", "max_concurrency", "max_prompt_len", "max_output_len", "num_warmups"):
        v = getattr(args, name)
        if v is not None and v < (1 if name == "num_requests" else 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {1 if name == 'num_requests' else 0}, got {v}")
    from cluster.bench_report import format_table
    res = asyncio.run(run_async(args))
    print(format_table(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=float)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0

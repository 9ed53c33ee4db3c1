"""Decode at batch 1-8 (issue 18): the engine's decode step in several variants, same model, same
KV, same process, judged against the streaming-read ceiling measured in the same run.

Variants (each a fresh ModelRunner with its own CUDA graphs, chosen by environment variables):
  tuned           the skinny-GEMV table of round 1, unfused kernels: the "before" of this round
  fused           model/fused_decode.py: fused GEMVs + attention per layer, configs tuned per
                  projection and mode, the plan (norm folded in / apart / unfused) chosen from
                  the timings (DISAGG_FUSED_PLAN=auto, the default)
  fused+combine   and the attention's last split combines the others (DISAGG_DECODE_COMBINE=1)
  fused+allfused  every norm folded into its GEMV whatever the timings (DISAGG_FUSED_PLAN=fused)
  fused+pdl       programmatic dependent launch between the kernels (DISAGG_PDL=1; slower in the
                  first H200 run, kept for the record)
  cublas          every matmul through cuBLAS, unfused kernels (DISAGG_SKINNY_GEMV=0, DISAGG_FUSED_DECODE=0)

Prints per variant: the tuning tables (every candidate config's µs per projection and mode),
decode tok/s and % of read at batch 1/2/4/8 (ctx 512) and 1/8 (ctx 2048), wall step and
GPU-only time, greedy tokens of an 8-row step against the first variant, and a per-kernel
breakdown of one batch-1 step (torch.profiler). Then every point again with the variants taking
turns (the wall step's host time drifts over a run), and the before/after tables from that
pass (wall and GPU-only) and the best variant.
Usage: python -m benchmarks.decode_speed --out decode_speed.json [--variants a,b,...]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import signal
import time

import torch

from benchmarks.engine import BS, Engine, kernel_breakdown

BATCHES = (1, 2, 4, 8)
VARIANTS = {      # in the order they run: the most informative first, should the call run out
    "tuned": {"DISAGG_SKINNY_GEMV": "1", "DISAGG_FUSED_DECODE": "0"},
    "fused": {"DISAGG_SKINNY_GEMV": "1", "DISAGG_FUSED_DECODE": "1"},
    "fused+combine": {"DISAGG_SKINNY_GEMV": "1", "DISAGG_FUSED_DECODE": "1", "DISAGG_DECODE_COMBINE": "1"},
    "fused+allfused": {"DISAGG_SKINNY_GEMV": "1", "DISAGG_FUSED_DECODE": "1", "DISAGG_FUSED_PLAN": "fused"},
    "fused+pdl": {"DISAGG_SKINNY_GEMV": "1", "DISAGG_FUSED_DECODE": "1", "DISAGG_PDL": "1"},
    "cublas": {"DISAGG_SKINNY_GEMV": "0", "DISAGG_FUSED_DECODE": "0"},
}
KV_TOKENS = 64 * 1024


class Bench(Engine):
    """benchmarks.engine.Engine's model and decode timing, with a smaller KV cache and a runner
    rebuilt per variant (graphs for batch <= 8 only, no prefill graphs: quick to capture)."""

    def __init__(self):     # noqa: D107 - Engine.__init__ would capture 256-row graphs
        from model.kv_cache import allocate_kv_cache
        from model.loader import build_model
        from model.sampler import Sampler
        t0 = time.perf_counter()
        self.model = build_model("llama-3-8b", device="cuda", dtype="bfloat16", max_positions=8192)
        self.cfg = cfg = self.model.cfg
        self.num_blocks = KV_TOKENS // BS + 1
        self.kv = allocate_kv_cache(cfg.num_layers, self.num_blocks, BS, cfg.num_kv_heads, cfg.head_dim,
                                    torch.bfloat16, "cuda")
        self.kv.normal_()
        self.build_s = time.perf_counter() - t0
        self.sampler = Sampler("cuda", 0)
        params = list(self.model.named_parameters())
        embed = self.model.embed_tokens.weight
        self.matrix_bytes = sum(p.numel() * p.element_size() for _, p in params) - embed.numel() * embed.element_size()
        self.runner = None

    def use(self, env: dict) -> float:
        """A new runner (tuning, graphs) under `env`; the earlier ones stay alive, so that the
        variants can be timed again interleaved (their graphs hold their kernels)."""
        from kernels import gemv
        from model.runner import ModelRunner
        gc.collect()
        os.environ.update({"DISAGG_PDL": "0", "DISAGG_PDL_PREFETCH": "0", "DISAGG_DECODE_SPLIT_TOKENS": "256",
                           "DISAGG_DECODE_COMBINE": "0", "DISAGG_FUSED_PLAN": "auto"})
        os.environ.update(env)
        if env.get("DISAGG_SKINNY_GEMV") == "0":
            gemv.reset()        # skinny_linear reads the table whatever the environment says
        t0 = time.perf_counter()
        self.runner = ModelRunner(self.model, self.kv, BS, max_batch_size=max(BATCHES), max_model_len=8192,
                                  max_prefill_graph_tokens=0)
        return time.perf_counter() - t0


@torch.inference_mode()
def measure(bench: Bench, label: str, contexts, read: float, log) -> dict:
    from model.runner import StepInput
    rows = []
    for c in contexts:
        for b in (BATCHES if c == contexts[0] else (1, 8)):
            r = bench.decode_point(b, c, steps=20)
            rows.append(r)
            log(f"{label:>18} b={b} ctx={c:>5}: {r['step_ms']:6.3f} ms/step ({r['gpu_ms']:6.3f} GPU) "
                f"{r['tokens_per_s']:6.0f} tok/s, {r['GBps'] / read:5.1%} of read ({r['gpu_GBps'] / read:5.1%} GPU only)")
    graphs = bench.runner.graphs
    bench.decode_point(1, 512, steps=1)
    out1 = graphs.outputs[1][:1]
    brk = kernel_breakdown(lambda: (graphs.graphs[1].replay(), bench.model.compute_logits(out1)), top=16)
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in sorted(brk["by_kind_ms"].items(), key=lambda kv: -kv[1]))
    log(f"{label:>18} b=1 breakdown: wall {brk['wall_ms']:.3f} ms, kernels {brk['kernel_ms']:.3f} ms ({kinds})")
    for t in brk["top"]:
        log(f"{'':>20}{t['ms'] * 1e3:8.1f} us  x{t['calls']:<4} {t['kernel']}")
    torch.manual_seed(7)
    seqs = [(t, 300, tb) for t, tb in zip(torch.randint(0, bench.cfg.vocab_size, (8,)).tolist(), bench.tables(8, 301))]
    greedy = bench.runner.execute(StepInput(decode=seqs)).argmax(-1).tolist()
    return {"decode": rows, "breakdown_b1": brk, "greedy": greedy}


@torch.inference_mode()
def interleaved(bench: Bench, runners: dict, res: dict, contexts, read: float, log) -> None:
    """Every point again, the variants taking turns point by point: the wall step includes host
    time, which drifted by more than the kernels differ over a run of one variant after another
    (first H200 run: 0.2 ms for the first variant, up to 0.65 ms for the last)."""
    log("\ninterleaved (variants take turns at each point):")
    runners = {n: r for n, r in runners.items() if "decode" in res["variants"].get(n, {})}
    for name in runners:
        res["variants"][name]["decode_first_pass"] = res["variants"][name]["decode"]
        res["variants"][name]["decode"] = []
    for c in contexts:
        for b in (BATCHES if c == contexts[0] else (1, 8)):
            for name, runner in runners.items():
                bench.runner = runner
                r = bench.decode_point(b, c, steps=20)
                res["variants"][name]["decode"].append(r)
                log(f"{name:>18} b={b} ctx={c:>5}: {r['step_ms']:6.3f} ms/step ({r['gpu_ms']:6.3f} GPU) "
                    f"{r['tokens_per_s']:6.0f} tok/s, {r['GBps'] / read:5.1%} of read ({r['gpu_GBps'] / read:5.1%} GPU only)")


def summarize(res: dict, read: float, log, out: str) -> None:
    """The before/after tables over the variants measured so far, and the best; writes `out`."""
    ok = {n: r for n, r in res["variants"].items() if r.get("decode")}
    if not ok:
        return
    first = next(iter(ok))
    points = min(len(r["decode"]) for r in ok.values())     # a pass the timeout cut short
    log(f"\nstreaming read {read:.0f} GB/s, copy {res['ceilings']['copy_GBps']:.0f} GB/s (measured in this run)")
    head = "batch ctx  " + "".join(f"{n:>20}" for n in ok)
    log(head + "   (tok/s, % of read; wall step)")
    for i, r0 in enumerate(ok[first]["decode"][:points]):
        cells = "".join(f"{ok[n]['decode'][i]['tokens_per_s']:>12.0f} {ok[n]['decode'][i]['GBps'] / read:6.1%} "
                        for n in ok)
        log(f"{r0['batch']:>5} {r0['context']:>5}  {cells}")
    log("batch ctx  " + "".join(f"{n:>20}" for n in ok) + "   (GPU-only ms per step: replay + logits, % of read)")
    for i, r0 in enumerate(ok[first]["decode"][:points]):
        cells = "".join(f"{ok[n]['decode'][i]['gpu_ms']:>12.3f} {ok[n]['decode'][i]['gpu_GBps'] / read:6.1%} "
                        for n in ok)
        log(f"{r0['batch']:>5} {r0['context']:>5}  {cells}")
    for n, r in ok.items():
        agree = sum(a == b for a, b in zip(r["greedy"], ok[first]["greedy"]))
        log(f"greedy tokens of an 8-row step, {n} vs {first}: {agree}/8 agree")
    best = max(ok, key=lambda n: ok[n]["decode"][0]["tokens_per_s"])
    best_gpu = min(ok, key=lambda n: ok[n]["decode"][0]["gpu_ms"])
    res["best"], res["best_gpu"] = best, best_gpu
    log(f"best at b=1, wall: {best} ({ok[best]['decode'][0]['tokens_per_s']:.0f} tok/s, "
        f"{ok[best]['decode'][0]['GBps'] / read:.1%} of read; target 85%)")
    log(f"best at b=1, GPU only: {best_gpu} ({ok[best_gpu]['decode'][0]['gpu_ms']:.3f} ms, "
        f"{ok[best_gpu]['decode'][0]['gpu_GBps'] / read:.1%} of read)")
    with open(out, "w") as f:
        json.dump(res, f, indent=1, default=str)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="decode_speed.json")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "fused+pdl"),
                    help="fused+pdl is left out by default: it retunes every config (slower in the first run)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.decode_speed: needs a CUDA GPU", flush=True)
        return 2
    from benchmarks import ceilings
    from kernels import fused_gemv, fused_tune, gemv

    def log(s):
        print(s, flush=True)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if not fused_gemv.pdl_available:
        log("PDL unavailable in this Triton (no triton.language.extra.cuda.gdc_wait): pdl variants skipped")
        names = [v for v in names if "pdl" not in v]
    contexts = [int(x) for x in args.contexts.split(",")]
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "ceilings": ceilings.measure(), "variants": {}}
    read = res["ceilings"]["read_GBps"]
    log(f"ceilings: {res['ceilings']}")
    bench = Bench()
    log(f"model built in {bench.build_s:.1f} s")

    def stop(signum, frame):    # `timeout` sends SIGTERM: summarise what was measured, then exit
        summarize(res, read, log, args.out)
        raise SystemExit(124)
    signal.signal(signal.SIGTERM, stop)
    runners = {}
    for name in names:
        t0 = time.perf_counter()
        pre = []
        try:
            env = VARIANTS[name]
            if env.get("DISAGG_FUSED_DECODE") == "1":   # tuned here, with its log; the runner reuses it
                from model.fused_plan import tuning_cases
                pre = fused_tune.tune_fused(tuning_cases(bench.model), pdl=env.get("DISAGG_PDL") == "1", log=log)
            setup_s = bench.use(env)
            runners[name] = bench.runner
            r = {"setup_s": setup_s, "gemv_table": bench.runner.gemv_report, "fused_table": bench.runner.fused_report or pre}
            log(f"== {name}: runner (tuning + capture) {setup_s:.1f} s; fused={bench.model.fused_decode}")
            for row in r["gemv_table"]:
                log(f"  gemv {row['N']}x{row['K']} rows={row['rows']}: cuBLAS {row['cublas_us']:.2f} us, "
                    f"chosen {row['chosen']} {row['best_us']:.2f} us ({row['GBps_best']:.0f} GB/s)")
            r.update(measure(bench, name, contexts, read, log))
        except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others
            import traceback
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {e}"}
            log(f"== {name}: FAILED {r['error']}")
        r["wall_s"] = time.perf_counter() - t0
        res["variants"][name] = r
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    interleaved(bench, runners, res, contexts, read, log)
    summarize(res, read, log, args.out)
    gemv.reset()
    fused_tune.reset()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Decode at batch 1-8 (issue 18): the engine's step with the tuned skinny-matmul table
(kernels/gemv.py) against cuBLAS only, same model, same KV, same process, judged against the
streaming-read ceiling measured in the run. Prints the tuning table (per shape and row count:
cuBLAS vs the best GEMV config, µs and GB/s), tok/s and % of read per batch for both, the
per-kernel breakdown of one batch-1 step with each, and whether greedy tokens agree.
Usage: python -m benchmarks.decode_speed --out decode_speed.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

import torch

BATCHES = (1, 2, 4, 8)


@torch.inference_mode()
def measure(eng, label: str, contexts, log) -> dict:
    from benchmarks.engine import kernel_breakdown
    from model.runner import StepInput
    rows = []
    for c in contexts:
        for b in BATCHES:
            r = eng.decode_point(b, c, steps=20)
            rows.append(r)
            log(f"{label:>6} b={b} ctx={c:>5}: {r['step_ms']:6.2f} ms/step ({r['gpu_ms']:5.2f} GPU) "
                f"{r['tokens_per_s']:6.0f} tok/s {r['GBps']:6.0f} GB/s")
    graphs = eng.runner.graphs
    eng.decode_point(1, 512, steps=1)
    out1 = graphs.outputs[1][:1]
    brk = kernel_breakdown(lambda: (graphs.graphs[1].replay(), eng.model.compute_logits(out1)), top=20)
    torch.manual_seed(7)
    seqs = [(t, 300, tb) for t, tb in zip(torch.randint(0, eng.cfg.vocab_size, (8,)).tolist(), eng.tables(8, 301))]
    greedy = eng.runner.execute(StepInput(decode=seqs)).argmax(-1).tolist()
    return {"decode": rows, "breakdown_b1": brk, "greedy": greedy, "seqs": seqs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="decode_speed.json")
    ap.add_argument("--contexts", default="512,2048")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.decode_speed: needs a CUDA GPU", flush=True)
        return 2
    from benchmarks import ceilings
    from benchmarks.engine import BS, Engine
    from kernels import gemv
    from model.runner import ModelRunner

    def log(s):
        print(s, flush=True)
    contexts = [int(x) for x in args.contexts.split(",")]
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "ceilings": ceilings.measure()}
    read = res["ceilings"]["read_GBps"]
    log(f"ceilings: {res['ceilings']}")
    os.environ["DISAGG_SKINNY_GEMV"] = "1"
    gemv.reset()
    eng = Engine(max_model_len=8192)
    res["gemv_table"] = eng.runner.gemv_report
    for r in eng.runner.gemv_report:
        log(f"gemv {r['N']:>6}x{r['K']:<6} rows={r['rows']}: cuBLAS {r['cublas_us']:6.1f} us "
            f"({r['GBps_cublas']:5.0f} GB/s), chosen {r['chosen']} {r['best_us']:6.1f} us ({r['GBps_best']:5.0f} GB/s)")
    res["tuned"] = measure(eng, "tuned", contexts, log)
    gemv.reset()
    os.environ["DISAGG_SKINNY_GEMV"] = "0"
    kv = eng.runner.kv_cache
    del eng.runner
    torch.cuda.empty_cache()
    eng.runner = ModelRunner(eng.model, kv, BS, max_batch_size=256, max_model_len=8192)
    res["cublas"] = measure(eng, "cublas", contexts, log)
    a, b = res["tuned"]["greedy"], res["cublas"]["greedy"]
    res["greedy_agree"] = sum(x == y for x, y in zip(a, b)) / len(a)
    log(f"greedy tokens, tuned vs cuBLAS: {res['greedy_agree']:.0%} of 8 agree")
    log("batch ctx   cuBLAS tok/s  %read   tuned tok/s  %read")
    for r0, r1 in zip(res["cublas"]["decode"], res["tuned"]["decode"]):
        log(f"{r0['batch']:>5} {r0['context']:>5} {r0['tokens_per_s']:12.0f} {r0['GBps'] / read:6.0%} "
            f"{r1['tokens_per_s']:13.0f} {r1['GBps'] / read:6.0%}")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

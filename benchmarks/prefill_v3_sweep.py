"""The v3 prefill attention variants against cuDNN and v2's default (issue 18): bf16, 32 query /
8 KV heads, head dim 128, causal, one sequence, at 2k / 4k / 8k / 16k tokens. Measured beside
torch SDPA's cuDNN backend in the same run on the same inputs: "dispatch" (what the model's
prefill runs today: DEFAULT_V2_BY_TOKENS's pick, v2-host-128x64-w8-s3 from 2k tokens) and every
V3_CONFIGS variant (kernels/prefill_attention_v3.py). Every output is checked against an fp32
reference at every length before it is timed (relative error < 1.5e-2, finite); a variant that
misses is not timed. Each round re-times cuDNN and then every kernel (the second round in
reverse order), so each ratio has a same-round cuDNN and run-to-run spread shows. TFLOP/s =
2*2*S*S/2*32*128 / median time of a CUDA-graph replay (benchmarks.kernels.bench_ms).
Prints a table (TFLOP/s and x cuDNN per length, median of the rounds) and the best per length;
the JSON is rewritten after every kernel, so a run cut short keeps what it measured.
Usage: python -m benchmarks.prefill_v3_sweep --out prefill_v3_sweep.json [--variants all|NAME,...]
       [--rounds 2] [--budget-s 240]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

LENGTHS = (2048, 4096, 8192, 16384)
TOL = 1.5e-2  # bf16 outputs against the fp32 reference (tests/kernels/helpers.py)


def entries(variants: str) -> list[tuple[str, str, dict | None]]:
    """(name, kernel, config): kernel "dispatch" runs prefill_attention._launch (config None:
    DEFAULT_V2_BY_TOKENS's choice), "v3" runs prefill_attention_v3 with the V3_CONFIGS entry."""
    from kernels import prefill_attention_v3 as v3
    names = list(v3.V3_CONFIGS) if variants == "all" else [n for n in variants.split(",") if n]
    return [("dispatch", "dispatch", None)] + [(n, "v3", v3.V3_CONFIGS[n]) for n in names]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="prefill_v3_sweep.json")
    ap.add_argument("--variants", default="all", help="V3_CONFIGS names, comma-separated, or all")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="start no new kernel after this many seconds (the JSON keeps what ran)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.prefill_v3_sweep: needs a CUDA GPU", flush=True)
        return 2
    import triton
    from torch.nn.attention import SDPBackend

    from benchmarks.kernels import D, HQ, bench_ms, prefill_inputs, sdpa_ms
    from benchmarks.prefill_sweep import reference, rel_err, sdpa_out
    from kernels import prefill_attention as pre
    from kernels import prefill_attention_v3 as v3
    t0 = time.time()
    todo = entries(args.variants)
    meta = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "loadavg": os.getloadavg(), "rounds": args.rounds,
            "shape": f"bf16, {HQ} q / 8 kv heads, D={D}, causal, one sequence",
            "variants": {n: c for n, _, c in todo}}
    print(f"{meta['date_utc']} {meta['device']} torch {meta['torch']} triton {meta['triton']}",
          flush=True)
    rows: list[dict] = []

    def save():
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "elapsed_s": time.time() - t0}, f, indent=1,
                      default=str)

    cases = {}
    for S in map(int, args.lengths.split(",")):
        q, k, v, cu = prefill_inputs(S)
        ref = reference(q, k, v, D ** -0.5)
        try:
            cudnn_err = rel_err(sdpa_out(q, k, v, SDPBackend.CUDNN_ATTENTION), ref)
        except RuntimeError:
            cudnn_err = None
        torch.cuda.empty_cache()
        cases[S] = dict(q=q, k=k, v=v, cu=cu, ref=ref, flops=2 * 2 * S * S / 2 * HQ * D,
                        cudnn_err=cudnn_err)
        print(f"{S:>6} tokens: cuDNN rel err {cudnn_err or 0:.1e}", flush=True)

    def call_for(kind, cfg, c):
        q, k, v, cu = c["q"], c["k"], c["v"], c["cu"]
        if kind == "dispatch":
            return lambda: pre._launch(q, k, v, cu, D ** -0.5, None, None, None, None, None)
        return lambda: v3.prefill_attention_v3(q, k, v, cu, D ** -0.5, config=cfg)

    broken: set[str] = set()
    for rnd in range(args.rounds):
        cudnn = {}
        for S, c in cases.items():
            ms = sdpa_ms(c["q"], c["k"], c["v"], SDPBackend.CUDNN_ATTENTION)
            cudnn[S] = c["flops"] / ms / 1e9 if ms else None
            rows.append(dict(round=rnd, variant="cudnn", tokens=S, TFLOPs=cudnn[S],
                             rel_err=c["cudnn_err"]))
        print(f"round {rnd}: cuDNN " + " / ".join(f"{cudnn[S] or 0:.0f}" for S in cases)
              + " TFLOP/s", flush=True)
        save()
        for name, kind, cfg in (todo if rnd % 2 == 0 else todo[::-1]):
            if name in broken:
                continue
            line = []
            for S, c in cases.items():
                row = dict(round=rnd, variant=name, tokens=S, cudnn_TFLOPs=cudnn[S])
                rows.append(row)
                if time.time() - t0 > args.budget_s:
                    row["error"] = "skipped: time budget"
                    line.append(f"{S}: skipped")
                    continue
                call = call_for(kind, cfg, c)
                try:
                    c0 = time.time()
                    out = call()
                    torch.cuda.synchronize()
                    row["first_call_s"] = round(time.time() - c0, 2)
                    row["rel_err"] = err = rel_err(out, c["ref"])
                    row["correct"] = err < TOL
                    del out
                    if not row["correct"]:
                        line.append(f"{S}: WRONG rel err {err:.2e}")
                        broken.add(name)
                        continue
                    ms = bench_ms(call)
                except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    line.append(f"failed: {row['error'][:200]}")
                    broken.add(name)
                    break
                finally:
                    save()
                row["TFLOPs"] = tf = c["flops"] / ms / 1e9
                row["x_cudnn"] = tf / cudnn[S] if cudnn[S] else None
                line.append(f"{S}: {tf:.0f} ({row['x_cudnn'] or 0:.3f}x, err {err:.1e})")
            print(f"  r{rnd} {name}: " + "; ".join(line), flush=True)
        save()

    # summary: median over rounds per variant and length
    summary: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r.get("TFLOPs") is None:
            continue
        d = summary.setdefault(r["variant"], {}).setdefault(r["tokens"], {"TFLOPs": [], "x": []})
        d["TFLOPs"].append(r["TFLOPs"])
        if r.get("x_cudnn"):
            d["x"].append(r["x_cudnn"])
    meta["summary"] = {n: {S: {"TFLOPs_median": statistics.median(d["TFLOPs"]),
                               "TFLOPs_all": d["TFLOPs"],
                               "x_cudnn_median": statistics.median(d["x"]) if d["x"] else None,
                               "x_cudnn_all": d["x"]} for S, d in per.items()}
                       for n, per in summary.items()}
    lengths = list(cases)
    print(f"\nmedian over {args.rounds} round(s), TFLOP/s (x cuDNN); {time.time() - t0:.0f} s")
    print(f"{'variant':<28}" + "".join(f"{S:>18}" for S in lengths))
    for n, per in meta["summary"].items():
        cells = []
        for S in lengths:
            d = per.get(S)
            cells.append(f"{d['TFLOPs_median']:.0f} ({d['x_cudnn_median']:.3f}x)" if d and
                         d["x_cudnn_median"] else (f"{d['TFLOPs_median']:.0f}" if d else "-"))
        print(f"{n:<28}" + "".join(f"{c:>18}" for c in cells), flush=True)
    best = {}
    for S in lengths:
        cands = [(per[S]["x_cudnn_median"], n) for n, per in meta["summary"].items()
                 if n != "cudnn" and S in per and per[S]["x_cudnn_median"]]
        if cands:
            x, n = max(cands)
            best[S] = (n, x)
            print(f"best at {S}: {n} {x:.3f}x cuDNN", flush=True)
    meta["best"] = best
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

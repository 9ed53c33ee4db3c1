"""Prefill attention against cuDNN, per length and tile config (issue 18): our causal FA-2 kernel
(kernels/prefill_attention.py) over a wider set of tiles and pipeline depths than its hand-set
default, beside torch SDPA's cuDNN and FLASH backends measured in the same run on the same
inputs (bf16, 32 query / 8 KV heads, head dim 128, one sequence). Prints TFLOP/s per config and
length, the ratio to cuDNN, and the best config per length.
Usage: python -m benchmarks.prefill_sweep --out prefill_sweep.json
"""
from __future__ import annotations

import argparse
import json

import torch

LENGTHS = (2048, 4096, 8192, 16384)
# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first is the current default at D=128
CONFIGS = ((128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3),
           (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (256, 64, 16, 2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="prefill_sweep.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.prefill_sweep: needs a CUDA GPU", flush=True)
        return 2
    from torch.nn.attention import SDPBackend

    from benchmarks.kernels import D, HQ, bench_ms, prefill_inputs, sdpa_ms
    from kernels import prefill_attention as pre
    rows, best = [], {}
    for S in LENGTHS:
        q, k, v, cu = prefill_inputs(S)
        flops = 2 * 2 * S * S / 2 * HQ * D
        ref = {name: sdpa_ms(q, k, v, b) for name, b in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                                                        ("flash", SDPBackend.FLASH_ATTENTION))}
        cudnn = flops / ref["cudnn"] / 1e9 if ref["cudnn"] else None
        flash = flops / ref["flash"] / 1e9 if ref["flash"] else None
        print(f"{S:>6} tokens: cuDNN {cudnn or 0:.0f} TFLOP/s, FLASH {flash or 0:.0f}", flush=True)
        for bm, bn, w, st in CONFIGS:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
            row = {"tokens": S, **cfg, "cudnn_TFLOPs": cudnn, "flash_TFLOPs": flash}
            try:
                ms = bench_ms(lambda: pre._launch(q, k, v, cu, D ** -0.5, None, None, None, None, cfg))
                row["TFLOPs"] = flops / ms / 1e9
                row["x_cudnn"] = row["TFLOPs"] / cudnn if cudnn else None
                print(f"  {str((bm, bn, w, st)):<20} {row['TFLOPs']:6.0f} TFLOP/s  "
                      f"{row['x_cudnn'] or 0:5.2f}x cuDNN", flush=True)
                if row["TFLOPs"] > best.get(S, {}).get("TFLOPs", 0):
                    best[S] = row
            except Exception as e:  # noqa: BLE001 - a config that does not fit is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                print(f"  {str((bm, bn, w, st)):<20} failed: {row['error']}", flush=True)
            rows.append(row)
        del q, k, v
        torch.cuda.empty_cache()
    print("best per length:")
    for S, r in best.items():
        print(f"  {S:>6}: ({r['BLOCK_M']}, {r['BLOCK_N']}, {r['num_warps']}, {r['num_stages']}) "
              f"{r['TFLOPs']:.0f} TFLOP/s = {r['x_cudnn'] or 0:.2f}x cuDNN", flush=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "best": {str(k): v for k, v in best.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

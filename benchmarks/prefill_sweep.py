"""Prefill attention against cuDNN, per length and kernel variant (issue 18): the v1 causal FA-2
kernel (kernels/prefill_attention.py, its default config and, with --v1-sweep, a wider set of
tiles and pipeline depths) and the v2 variants (tensor descriptors, persistent,
warp-specialised: `V2_CONFIGS` in kernels/prefill_attention_v2.py) beside torch SDPA's cuDNN and
FLASH backends measured in the same run on the same inputs (bf16, 32 query / 8 KV heads, head
dim 128, one sequence). Every kernel's output is checked against an fp32 reference at every
length before it is timed (relative error, bf16 bound 1.5e-2; cuDNN's own error is printed
beside it). Prints TFLOP/s per variant and length, the ratio to cuDNN and to v1, the best per
length, and the `DEFAULT_V2_BY_TOKENS` rules this run supports. The JSON is rewritten after
every kernel, so a run cut short keeps what it measured.
Usage: python -m benchmarks.prefill_sweep --out prefill_sweep.json [--v1-sweep] [--variants all|none|NAME,...]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

LENGTHS = (2048, 4096, 8192, 16384)
# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first is the current default at D=128
CONFIGS = ((128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3),
           (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (256, 64, 16, 2))
TOL = 1.5e-2  # bf16 outputs against the fp32 reference (tests/kernels/helpers.py)


def reference(q, k, v, scale: float, heads_per_chunk: int = 8) -> torch.Tensor:
    """Causal GQA attention in fp32, a few query heads at a time (16k tokens: 8.6 GB of scores)."""
    S, HQ, D = q.shape
    group = HQ // k.shape[1]
    out = torch.empty_like(q)
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).triu_(1)
    for h0 in range(0, HQ, heads_per_chunk):
        hs = range(h0, h0 + heads_per_chunk)
        qf = q[:, h0:h0 + heads_per_chunk].float().transpose(0, 1)
        kf = torch.stack([k[:, h // group] for h in hs], 0).float()
        vf = torch.stack([v[:, h // group] for h in hs], 0).float()
        s = (qf @ kf.transpose(1, 2)).mul_(scale).masked_fill_(mask, float("-inf"))
        out[:, h0:h0 + heads_per_chunk] = (s.softmax(-1) @ vf).transpose(0, 1).to(q.dtype)
        del s
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def sdpa_out(q, k, v, backend):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    S, HQ, D = q.shape
    qs = q.view(1, S, HQ, D).transpose(1, 2)
    ks = k.repeat_interleave(HQ // k.shape[1], 1).view(1, S, HQ, D).transpose(1, 2)
    vs = v.repeat_interleave(HQ // k.shape[1], 1).view(1, S, HQ, D).transpose(1, 2)
    with sdpa_kernel([backend]):
        return sdpa(qs, ks, vs, is_causal=True).transpose(1, 2)[0]


def kernel_entries(v1_sweep: bool, variants: str) -> list[tuple[str, dict | None]]:
    from kernels import prefill_attention_v2 as pre
    # {} rather than None: v1 with its default config even where DEFAULT_V2_BY_TOKENS picks v2
    # "dispatch": config None, what the model's prefill runs (DEFAULT_V2_BY_TOKENS's choice)
    entries = [("v1-default", {}), ("dispatch", None), ("v1-tma-128x64-w8-s3",
                                      dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=True))]
    if v1_sweep:
        entries += [(f"v1-{bm}x{bn}-w{w}-s{st}", dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st))
                    for bm, bn, w, st in CONFIGS]
    else:  # v1's best at 2k in the last sweep
        entries.append(("v1-64x64-w4-s3", dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)))
    if variants == "all":
        entries += list(pre.V2_CONFIGS.items())
    elif variants != "none":
        entries += [(n, pre.V2_CONFIGS[n]) for n in variants.split(",")]
    return entries


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="prefill_sweep.json")
    ap.add_argument("--v1-sweep", action="store_true", help="also the 10 v1 tile configs")
    ap.add_argument("--variants", default="all", help="v2 variants: all, none or names, comma-separated")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="stop starting new kernels after this many seconds (the JSON keeps what ran)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.prefill_sweep: needs a CUDA GPU", flush=True)
        return 2
    import triton
    from torch.nn.attention import SDPBackend

    from benchmarks.kernels import D, HQ, bench_ms, prefill_inputs, sdpa_ms
    from kernels import prefill_attention as pre
    t0 = time.time()
    entries = kernel_entries(args.v1_sweep, args.variants)
    meta = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "loadavg": os.getloadavg(), "shape": f"bf16, {HQ} q / 8 kv heads, D={D}, causal, one sequence",
            "variants": {n: c for n, c in entries}}
    print(f"{meta['date_utc']} {meta['device']} torch {meta['torch']} triton {meta['triton']}", flush=True)
    rows, best = [], {}

    def save():
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "best": {str(k): v for k, v in best.items()},
                       "elapsed_s": time.time() - t0}, f, indent=1, default=str)

    # Inputs, references and SDPA first; then each kernel over every length, so a run cut short
    # by the time budget still has every length of the variants it reached.
    cases = {}
    for S in map(int, args.lengths.split(",")):
        q, k, v, cu = prefill_inputs(S)
        flops = 2 * 2 * S * S / 2 * HQ * D
        ref = reference(q, k, v, D ** -0.5)
        times = {name: sdpa_ms(q, k, v, b) for name, b in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                                                          ("flash", SDPBackend.FLASH_ATTENTION))}
        cudnn = flops / times["cudnn"] / 1e9 if times["cudnn"] else None
        flash = flops / times["flash"] / 1e9 if times["flash"] else None
        try:
            cudnn_err = rel_err(sdpa_out(q, k, v, SDPBackend.CUDNN_ATTENTION), ref)
        except RuntimeError:
            cudnn_err = None
        torch.cuda.empty_cache()
        cases[S] = dict(q=q, k=k, v=v, cu=cu, ref=ref, flops=flops, base=dict(
            tokens=S, cudnn_TFLOPs=cudnn, flash_TFLOPs=flash, cudnn_rel_err=cudnn_err))
        print(f"{S:>6} tokens: cuDNN {cudnn or 0:.0f} TFLOP/s (rel err {cudnn_err or 0:.1e}), "
              f"FLASH {flash or 0:.0f}", flush=True)
    v1 = {}
    for name, cfg in entries:
        print(f"{name} {cfg}", flush=True)
        for S, c in cases.items():
            row = {**c["base"], "variant": name, "config": cfg}
            rows.append(row)
            if time.time() - t0 > args.budget_s:
                row["error"] = "skipped: time budget"
                print(f"  {S:>6} skipped (time budget)", flush=True)
                continue
            q, k, v, cu = c["q"], c["k"], c["v"], c["cu"]
            call = lambda: pre._launch(q, k, v, cu, D ** -0.5, None, None, None, None, cfg)  # noqa: E731
            try:
                c0 = time.time()
                out = call()
                torch.cuda.synchronize()
                row["first_call_s"] = round(time.time() - c0, 2)
                row["rel_err"] = err = rel_err(out, c["ref"])
                row["correct"] = err < TOL
                del out
                if not row["correct"]:
                    print(f"  {S:>6} WRONG: rel err {err:.2e} > {TOL:.0e}", flush=True)
                    continue
                ms = bench_ms(call)
            except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"  failed: {row['error'][:300]}", flush=True)
                break  # the same error at every length
            finally:
                save()
            cudnn = c["base"]["cudnn_TFLOPs"]
            row["TFLOPs"] = tf = c["flops"] / ms / 1e9
            row["x_cudnn"] = tf / cudnn if cudnn else None
            if name == "v1-default":
                v1[S] = tf
            row["x_v1"] = tf / v1[S] if S in v1 else None
            print(f"  {S:>6} {tf:6.0f} TFLOP/s  {row['x_cudnn'] or 0:5.3f}x cuDNN  "
                  f"{row['x_v1'] or 0:5.3f}x v1  rel err {err:.1e}", flush=True)
            if tf > best.get(S, {}).get("TFLOPs", 0):
                best[S] = row
        save()
    print(f"best per length ({time.time() - t0:.0f} s):")
    rules = []
    for S, r in sorted(best.items()):
        print(f"  {S:>6}: {r['variant']} {r['TFLOPs']:.0f} TFLOP/s = {r['x_cudnn'] or 0:.3f}x cuDNN, "
              f"{r['x_v1'] or 0:.3f}x v1", flush=True)
        rules.append((S, r["variant"] if r["variant"].startswith("v2") and (r["x_v1"] or 0) > 1.02
                      else None))
    print(f"DEFAULT_V2_BY_TOKENS this run supports (best v2 where > 1.02x v1, else None = v1): "
          f"{{{D}: {rules}}}", flush=True)
    meta["suggested_DEFAULT_V2_BY_TOKENS"] = {D: rules}
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

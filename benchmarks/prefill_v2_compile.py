"""Compile the v2 prefill attention variants for sm_90 without a GPU (issue 18) and print what
the compiler made of each: whether the key loop was warp-specialised (a `ttg.warp_specialize`
op in the TTGIR, `setmaxnreg` in the PTX), shared memory (H100/H200 allow 227 KB), MMA and bulk-
copy instruction counts, and the wgmma wait depths. Uses the local Triton, which may differ
from the GPU host's.
Usage: python -m benchmarks.prefill_v2_compile [--prefix] [--seqs N] [NAME ...]
"""
from __future__ import annotations

import argparse
import collections
import re
import time

SMEM_LIMIT = 232448  # bytes of dynamic shared memory per block on sm_90


def source(fn, cfg: dict, has_prefix: bool, num_seqs: int):
    from triton.compiler import ASTSource

    from kernels.prefill_attention_v2 import _search_steps
    bm, bn, d = cfg["BLOCK_M"], cfg["BLOCK_N"], 128
    dev = cfg.get("DEVICE_DESC", False)
    desc = (lambda r: "*bf16") if dev else (lambda r: f"tensordesc<bf16[{r},{d}]>")
    types = dict(QD=desc(bm), KD=desc(bn), VD=desc(bn), OD=desc(bm), O="*bf16", CU="*i32",
                 KC="*bf16", VC="*bf16", BT="*i32", PLEN="*i32", qk_scale="fp32")
    consts = dict(GROUP=4, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, PAGE=16 if has_prefix else 1,
                  HAS_PREFIX=has_prefix, WS=bool(cfg.get("WS")) and not has_prefix,
                  SINGLE_LOOP=bool(cfg.get("SINGLE_LOOP")),
                  PERSISTENT=bool(cfg.get("PERSISTENT")), SEARCH_STEPS=_search_steps(num_seqs),
                  DEVICE_DESC=dev, UPCAST=False, DOT_PRECISION="tf32")
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts[name]
        else:
            signature[name] = types.get(name, "i32")
            if signature[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--prefix", action="store_true", help="compile with a cached prefix")
    ap.add_argument("--seqs", type=int, default=1, help="sequences in the batch (search steps)")
    args = ap.parse_args(argv)
    import triton
    from triton.backends.compiler import GPUTarget

    from kernels import prefill_attention_v2 as v2
    print(f"triton {triton.__version__}, target sm_90", flush=True)
    for name in args.names or list(v2.V2_CONFIGS):
        cfg = v2.V2_CONFIGS[name]
        t0 = time.time()
        try:
            k = triton.compile(source(v2._prefill_kernel_v2, cfg, args.prefix, args.seqs),
                               target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is the finding
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        ptx, smem = k.asm["ptx"], k.metadata.shared
        waits = dict(collections.Counter(re.findall(r"wgmma.wait_group.sync.aligned\s+(\d+)", ptx)))
        print(f"{name}: {time.time() - t0:.1f} s, warp-specialised "
              f"{'yes' if 'ttg.warp_specialize' in k.asm['ttgir'] else 'no'}, setmaxnreg "
              f"{ptx.count('setmaxnreg')}, smem {smem} B{' (OVER the limit)' if smem > SMEM_LIMIT else ''}, "
              f"wgmma {ptx.count('wgmma.mma_async')}, bulk copies {ptx.count('cp.async.bulk.tensor')}, "
              f"wgmma waits {waits}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

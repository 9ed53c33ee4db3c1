"""Compile the v3 prefill attention variants (and v2's default) for sm_90 without a GPU
(issue 18) and print what limits how many programs share an SM: shared memory, registers and
spills (from the cubin, through the cuobjdump that Triton's wheel carries), and, in the SASS,
the CTA-wide barriers, HGMMAs, MUFU.EX2 and FMULs of the whole kernel. Uses the local Triton,
which should be the GPU host's (3.6.0).
Usage: python -m benchmarks.prefill_v3_compile [--prefix] [NAME ...]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time

SMEM_PER_SM = 233472      # bytes of shared memory per SM on sm_90 (228 KB)
SMEM_RESERVED = 1024      # per program
REGS_PER_SM = 65536


def _tool(name: str) -> str:
    """Triton's bundled copy (the wheel carries cuobjdump), else the one on PATH."""
    import shutil

    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else (shutil.which(name) or name)


def source(fn, cfg: dict, has_prefix: bool, v3: bool):
    from triton.compiler import ASTSource
    bm, bn, d = cfg["BLOCK_M"], cfg["BLOCK_N"], 128
    desc = lambda r: f"tensordesc<bf16[{r},{d}]>"  # noqa: E731
    types = dict(QD=desc(bm), KD=desc(bn), VD=desc(bn), OD=desc(bm), O="*bf16", CU="*i32",
                 KC="*bf16", VC="*bf16", BT="*i32", PLEN="*i32", qk_scale="fp32")
    consts = dict(GROUP=4, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, PAGE=16 if has_prefix else 1,
                  HAS_PREFIX=has_prefix, SEARCH_STEPS=8, UPCAST=False, DOT_PRECISION="tf32")
    if v3:
        consts["LAZY_TAU"] = float(cfg.get("LAZY_TAU", 0.0))
    else:
        consts.update(WS=False, SINGLE_LOOP=False, PERSISTENT=False, DEVICE_DESC=False)
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


def report(name: str, cfg: dict, has_prefix: bool, v3: bool) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    from kernels import prefill_attention_v2 as v2
    from kernels import prefill_attention_v3 as v3m
    fn = v3m._prefill_kernel_v3 if v3 else v2._prefill_kernel_v2
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("maxnreg"):
        opts["maxnreg"] = cfg["maxnreg"]
    t0 = time.time()
    k = triton.compile(source(fn, cfg, has_prefix, v3), target=GPUTarget("cuda", 90, 32),
                       options=opts)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", path],
                              capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    smem = k.metadata.shared
    threads = 32 * cfg["num_warps"]
    per_sm = min(SMEM_PER_SM // (smem + SMEM_RESERVED), REGS_PER_SM // (regs * threads),
                 2048 // threads)
    ops = {op: len(re.findall(rf"\b{re.escape(op)}\b", sass))
           for op in ("BAR.SYNC", "HGMMA", "MUFU.EX2", "FMUL", "LDL", "STL")}
    return dict(name=name, smem=smem, regs=regs, stack=stack, programs_per_sm=per_sm,
                compile_s=round(time.time() - t0, 1), **ops)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--prefix", action="store_true", help="compile with a cached prefix")
    args = ap.parse_args(argv)
    import triton

    from kernels import prefill_attention_v3 as v3m
    print(f"triton {triton.__version__}, target sm_90{', with prefix' if args.prefix else ''}",
          flush=True)
    names = args.names or ["v2-host-128x64-w8-s3", *v3m.V3_CONFIGS]
    for name in names:
        is_v3 = name.startswith("v3")
        if is_v3:
            cfg = v3m.V3_CONFIGS[name]
        else:
            from kernels import prefill_attention_v2 as v2
            cfg = v2.V2_CONFIGS[name]
        try:
            r = report(name, cfg, args.prefix, is_v3)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is the finding
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        print(f"{name}: smem {r['smem']} B, {r['regs']} regs, stack {r['stack']} B "
              f"(LDL {r['LDL']} STL {r['STL']}), {r['programs_per_sm']} program(s)/SM, "
              f"BAR.SYNC {r['BAR.SYNC']}, HGMMA {r['HGMMA']}, MUFU.EX2 {r['MUFU.EX2']}, "
              f"FMUL {r['FMUL']} ({r['compile_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

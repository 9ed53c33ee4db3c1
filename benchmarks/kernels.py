"""Kernel benchmark (issue 9): each figure printed beside the ceiling or baseline it is judged by.

  prefill attention  TFLOP/s (causal FLOPs 2*2*S*S/2*H*D) beside torch SDPA FLASH and cuDNN
  decode attention   KV GB/s read (K and V bytes / time) beside device-to-device copy bandwidth
  KV pack / unpack   GB/s (bytes read + written) beside the same copy bandwidth

Times are triton.testing.do_bench medians (it clears L2 before every call) of a CUDA-graph
replay of the call, after a warm-up, on fresh random inputs per shape. The graph keeps Python
launch overhead (~0.1 ms for a Triton launcher) out of short kernels, as the engine's decode
graphs do. Usage: python -m benchmarks.kernels --out results.json [--sweep]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch
import triton
from triton.testing import do_bench

from kernels import decode_attention as dec
from kernels import prefill_attention as pre
from kernels.kv_pack import pack_kv, unpack_kv

HQ, HK, D = 32, 8, 128
PREFILL_TOKENS = [1024, 2048, 4096, 8192, 16384]
DECODE_BATCH = [1, 4, 16, 32, 64, 128, 256]
DECODE_CONTEXT = [512, 1024, 2048, 4096, 8192, 16384, 32768]
PAGE = 16
MAX_KV_BYTES = 36 << 30  # leave room for the inputs of SDPA comparisons on an 80 GB card


def bench_ms(fn, graph: bool = True) -> float:
    fn()  # compile / warm-up outside the timed region
    torch.cuda.synchronize()
    run = fn
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()  # warm the graph's allocator pool on the capture stream
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
        except RuntimeError as e:  # not capturable: time it eagerly and say so
            print(f"  graph capture failed, timing eagerly: {str(e)[:100]}")
            torch.cuda.synchronize()
    return do_bench(run, warmup=25, rep=100, return_mode="median")


def ceilings() -> dict:
    n = 1 << 29  # 1 GiB of bf16 each way
    a, b = torch.randn(n, device="cuda", dtype=torch.bfloat16), torch.empty(n, device="cuda", dtype=torch.bfloat16)
    copy_ms = bench_ms(lambda: b.copy_(a), graph=False)
    del a, b
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench_ms(lambda: m @ m, graph=False)
    return {"copy_GBps": 2 * (1 << 30) / copy_ms / 1e6, "matmul_bf16_TFLOPs": 2 * 8192 ** 3 / mm_ms / 1e9}


# Prefill -------------------------------------------------------------------------------------
def prefill_inputs(S: int, d: int = D):
    q = torch.randn(S, HQ, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(S, HK, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(S, HK, d, device="cuda", dtype=torch.bfloat16)
    return q, k, v, torch.tensor([0, S], dtype=torch.int32, device="cuda")


def sdpa_ms(q, k, v, backend) -> float | None:
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    S = q.shape[0]
    qs = q.view(1, S, HQ, D).transpose(1, 2)
    # MHA layout for SDPA (same FLOPs): repeat the KV heads once, outside the timed region
    ks = k.repeat_interleave(HQ // HK, 1).view(1, S, HQ, D).transpose(1, 2)
    vs = v.repeat_interleave(HQ // HK, 1).view(1, S, HQ, D).transpose(1, 2)
    try:
        with sdpa_kernel([backend]):
            return bench_ms(lambda: sdpa(qs, ks, vs, is_causal=True))
    except RuntimeError as e:  # backend not available for this shape or build
        print(f"  SDPA {backend.name} unavailable: {str(e)[:100]}")
        return None


def run_prefill(config=None) -> list[dict]:
    from torch.nn.attention import SDPBackend
    rows = []
    for S in PREFILL_TOKENS:
        q, k, v, cu = prefill_inputs(S)
        flops = 2 * 2 * S * S / 2 * HQ * D
        ours = bench_ms(lambda: pre._launch(q, k, v, cu, D ** -0.5, None, None, None, None, config))
        eager = bench_ms(lambda: pre._launch(q, k, v, cu, D ** -0.5, None, None, None, None, config), graph=False)
        row = {"tokens": S, "ours_TFLOPs": flops / ours / 1e9, "ours_eager_TFLOPs": flops / eager / 1e9}
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            ms = sdpa_ms(q, k, v, backend)
            row[f"{name}_TFLOPs"] = flops / ms / 1e9 if ms else None
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.repeat_interleave(4, 1).transpose(0, 1)[None],
            v.repeat_interleave(4, 1).transpose(0, 1)[None], is_causal=True)[0].transpose(0, 1)
        out = pre._launch(q, k, v, cu, D ** -0.5, None, None, None, None, config)
        row["rel_err_vs_sdpa"] = float((out.float() - ref.float()).norm() / ref.float().norm())
        rows.append(row)
        del q, k, v, ref, out
    return rows


# Decode --------------------------------------------------------------------------------------
def decode_inputs(B: int, ctx: int):
    blocks = -(-ctx // PAGE)
    k = torch.randn(B * blocks, PAGE, HK, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    # scattered block tables, as a long-running server's free list gives them
    bt = torch.randperm(B * blocks, device="cuda", dtype=torch.int32).view(B, blocks)
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    return torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16), k, v, bt, lens


def decode_gbps(B, ctx, num_splits=None, config=None) -> float:
    q, k, v, bt, lens = decode_inputs(B, ctx)
    ms = bench_ms(lambda: dec._launch(q, k, v, bt, lens, D ** -0.5, num_splits, config))
    return 2 * B * ctx * HK * D * 2 / ms / 1e6


def sdpa_decode_gbps(B, ctx, backend) -> float | None:
    """SDPA on contiguous KV (8 KV heads, enable_gqa): the anchor our paged kernel is held to."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, HK, ctx, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    try:
        with sdpa_kernel([backend]):
            ms = bench_ms(lambda: sdpa(q, k, v, enable_gqa=True))
    except RuntimeError as e:
        print(f"  SDPA {backend.name} decode unavailable: {str(e)[:100]}")
        return None
    return 2 * B * ctx * HK * D * 2 / ms / 1e6


def run_decode() -> list[dict]:
    from torch.nn.attention import SDPBackend
    rows = []
    for B in DECODE_BATCH:
        for ctx in DECODE_CONTEXT:
            if 2 * B * ctx * HK * D * 2 > MAX_KV_BYTES:
                continue
            row = {"batch": B, "context": ctx, "ours_GBps": decode_gbps(B, ctx),
                   "num_splits": dec.auto_num_splits(B, HK, ctx, torch.cuda.get_device_properties(0).multi_processor_count)}
            if B in (1, 32, 64) and ctx in (4096, 16384):
                for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    row[f"sdpa_{name}_contiguous_GBps"] = sdpa_decode_gbps(B, ctx, backend)
            rows.append(row)
            torch.cuda.empty_cache()
    return rows


# KV pack -------------------------------------------------------------------------------------
def run_pack() -> list[dict]:
    rows = []
    layers, nb = 32, 4096
    kv = torch.randn(layers, 2, nb, PAGE, HK, D, device="cuda", dtype=torch.bfloat16)
    for n_blocks, heads in ((16, (0, 8)), (256, (0, 8)), (256, (0, 4)), (1024, (2, 4))):
        ids = torch.randperm(nb, device="cuda")[:n_blocks]
        buf = pack_kv(kv, ids, (0, layers), heads)
        nbytes = 2 * buf.numel() * buf.element_size()  # read + written, as the copy ceiling counts
        p_ms = bench_ms(lambda: pack_kv(kv, ids, (0, layers), heads, out=buf))
        u_ms = bench_ms(lambda: unpack_kv(buf, kv, ids, (0, layers), heads))
        rows.append({"blocks": n_blocks, "heads": list(heads), "MB": buf.numel() * 2 / 1e6,
                     "pack_GBps": nbytes / p_ms / 1e6, "unpack_GBps": nbytes / u_ms / 1e6})
    return rows


# Config sweep (to pick the hand-set configs) --------------------------------------------------
def run_sweep() -> dict:
    out = {"prefill": [], "decode": []}
    for bm, bn, w, st in [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4)]:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
        for S in (2048, 8192):
            q, k, v, cu = prefill_inputs(S)
            row = {**cfg, "tokens": S}
            try:
                ms = bench_ms(lambda: pre._launch(q, k, v, cu, D ** -0.5, None, None, None, None, cfg))
                row["TFLOPs"] = 2 * S * S * HQ * D / ms / 1e9
            except Exception as e:  # a config that does not fit is a result too
                row["error"] = str(e)[:200]
            out["prefill"].append(row)
    for B, ctx in ((1, 4096), (1, 32768), (4, 4096), (4, 32768), (16, 4096), (16, 16384), (32, 4096)):
        q, k, v, bt, lens = decode_inputs(B, ctx)
        for bn in (64, 128):
            cfg = dict(BLOCK_N=bn, num_warps=4, num_stages=3)
            for splits in (1, 2, 4, 8, 16, 32, 64, None):
                if splits is not None and splits * 256 > ctx:
                    continue
                ms = bench_ms(lambda: dec._launch(q, k, v, bt, lens, D ** -0.5, splits, cfg))
                out["decode"].append({**cfg, "batch": B, "context": ctx, "num_splits": splits,
                                      "GBps": 2 * B * ctx * HK * D * 2 / ms / 1e6})
        del q, k, v, bt, lens
    return out


def print_table(res: dict) -> None:
    c = res["ceilings"]
    print(f"\n{res['device']}  {res['date']}  torch {res['torch']}  triton {res['triton']}")
    print(f"ceilings: device copy {c['copy_GBps']:.0f} GB/s (read+write), bf16 matmul {c['matmul_bf16_TFLOPs']:.0f} TFLOP/s")
    f = lambda x, fmt="{:.0f}": "n/a" if x is None else fmt.format(x)
    print("\nprefill attention, bf16, causal, 32 q / 8 kv heads, D=128 (TFLOP/s)")
    print(f"{'tokens':>7} {'ours':>7} {'FLASH':>7} {'cuDNN':>7} {'x FLASH':>8} {'x cuDNN':>8} {'rel err':>8}")
    for r in res["prefill"]:
        rf = r["ours_TFLOPs"] / r["flash_TFLOPs"] if r["flash_TFLOPs"] else None
        rc = r["ours_TFLOPs"] / r["cudnn_TFLOPs"] if r["cudnn_TFLOPs"] else None
        print(f"{r['tokens']:>7} {r['ours_TFLOPs']:>7.0f} {f(r['flash_TFLOPs']):>7} {f(r['cudnn_TFLOPs']):>7} "
              f"{f(rf, '{:.2f}'):>8} {f(rc, '{:.2f}'):>8} {r['rel_err_vs_sdpa']:>8.1e}")
    print(f"\npaged decode attention, bf16, block {PAGE}, KV GB/s read (copy ceiling {c['copy_GBps']:.0f})")
    print(f"{'batch':>6} " + " ".join(f"{x:>6}" for x in DECODE_CONTEXT))
    for B in DECODE_BATCH:
        cells = {r["context"]: r["ours_GBps"] for r in res["decode"] if r["batch"] == B}
        print(f"{B:>6} " + " ".join(f"{cells[x]:>6.0f}" if x in cells else f"{'-':>6}" for x in DECODE_CONTEXT))
    for r in res["decode"]:
        if "sdpa_flash_contiguous_GBps" in r:
            print(f"  B={r['batch']} ctx={r['context']}: ours {r['ours_GBps']:.0f}, SDPA contiguous FLASH "
                  f"{f(r['sdpa_flash_contiguous_GBps'])}, cuDNN {f(r['sdpa_cudnn_contiguous_GBps'])} GB/s")
    print("\nKV pack/unpack, 32 layers, bf16 (GB/s read+write)")
    for r in res["pack"]:
        print(f"  {r['blocks']:>5} blocks heads {r['heads']}: {r['MB']:.0f} MB  pack {r['pack_GBps']:.0f}  "
              f"unpack {r['unpack_GBps']:.0f}")
    if "sweep" in res:
        print("\nsweep: prefill configs (TFLOP/s)")
        for r in res["sweep"]["prefill"]:
            print("  ", {k: v for k, v in r.items()})
        print("sweep: decode GB/s by num_splits (BLOCK_N 64 | 128)")
        for shape in sorted({(r["batch"], r["context"]) for r in res["sweep"]["decode"]}):
            cells = [f"{r['num_splits']}:{r['GBps']:.0f}/{r2['GBps']:.0f}" for r in res["sweep"]["decode"]
                     for r2 in res["sweep"]["decode"] if (r["batch"], r["context"]) == shape
                     and (r2["batch"], r2["context"]) == shape and r["BLOCK_N"] == 64 and r2["BLOCK_N"] == 128
                     and r["num_splits"] == r2["num_splits"]]
            print(f"  B={shape[0]} ctx={shape[1]}: " + "  ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="write the results as JSON here")
    ap.add_argument("--sweep", action="store_true", help="also time candidate tile configs")
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "ceilings": ceilings()}
    sections = [("prefill", run_prefill), ("decode", run_decode), ("pack", run_pack)]
    if args.sweep:
        sections.append(("sweep", run_sweep))
    for name, fn in sections:  # write after each section: a run cut short keeps what it measured
        print(f"[{datetime.datetime.now():%H:%M:%S}] {name}", flush=True)
        res[name] = fn()
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    print_table(res)


if __name__ == "__main__":
    main()

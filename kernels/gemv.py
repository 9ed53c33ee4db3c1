"""Skinny matmuls (decode: 1-8 rows against a weight matrix), y = x @ w.T (+ bias).

At batch 1-8 a decode step's linear layers only have to stream their weights once; cuBLAS picks
GEMM tiles for them (and, for some shapes, split-K plus a separate reduce kernel), which on an
H200 reach 60-70% of the streaming-read rate on the 34-50 MB matrices (benchmarks/engine.py's
breakdown). `_gemv_kernel` is GEMV-shaped instead: each program owns BLOCK_N output columns,
streams their weight rows over all of K once, and multiplies the (<= 16, padded) activation rows
with one tensor-core dot per tile; no split-K, so no reduce launch.

Which implementation serves a shape is measured, not assumed: `tune_skinny(weights, rows)` times
cuBLAS and each Triton config on the model's own per-layer weights (one CUDA graph of one call per
layer, so the timing streams every layer's weights as a decode step does, never an L2-resident
copy), checks the Triton result against cuBLAS, and records the fastest in a per-process table
that `skinny_linear` reads. Shapes never tuned, larger batches and CPU tensors take F.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._launch import FLOAT_DTYPES, check_shape, check_tensor, is_interpreted, jit, tl, use_triton

MAX_ROWS = 8                    # skinny: up to this many rows
CONFIGS = (                     # (BLOCK_N, BLOCK_K, num_warps, num_stages)
    (16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (16, 128, 4, 6), (32, 128, 4, 5), (64, 128, 4, 4),
)
_CHOICE: dict[tuple, tuple | None] = {}     # (device, dtype, N, K, rows) -> config, or None: cuBLAS
_TIMES: dict[tuple, dict] = {}              # same key -> tune_skinny's report row


def gemv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, bias)


@jit
def _gemv_kernel(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_mask = rn < N
    m_mask = rm < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        w = tl.load(W + rn[:, None].to(tl.int64) * stride_wn + rk[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:      # the interpreter's bf16/fp16 dot is unreliable: fp32 there
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, config=CONFIGS[0],
         impl: str | None = None) -> torch.Tensor:
    """x [M, K] (M <= 16, unit stride along K), w [N, K] contiguous, bias [N] or None; returns
    [M, N] in x's dtype. config: (BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    op = "gemv"
    if not use_triton(op, impl, _gemv_kernel, x, w, bias):
        return gemv_ref(x, w, bias)
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "w", w, ndim=2, dtypes=(x.dtype,), device=x.device, contiguous=True)
    M, K = x.shape
    N = w.shape[0]
    check_shape(op, "w", w, (None, K))
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device, contiguous=True)
        check_shape(op, "bias", bias, (N,))
    if M > 16:
        raise ValueError(f"{op}: at most 16 rows, got {M} (use F.linear)")
    block_n, block_k, warps, stages = config
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    interpreted = is_interpreted(_gemv_kernel)
    _gemv_kernel[(-(-N // block_n),)](
        x, w, bias if bias is not None else w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=interpreted,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or interpreted else "tf32",
        num_warps=warps, num_stages=stages)
    return y


def _key(x_or_w: torch.Tensor, n: int, k: int, rows: int) -> tuple:
    return (str(x_or_w.device), x_or_w.dtype, n, k, rows)


def skinny_linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """layer(x), by the implementation tune_skinny measured fastest for this shape and row count."""
    if x.dim() == 2 and x.is_cuda and x.shape[0] <= MAX_ROWS:
        cfg = _CHOICE.get(_key(x, layer.out_features, layer.in_features, x.shape[0]))
        if cfg is not None:
            return gemv(x, layer.weight, layer.bias, cfg)
    return layer(x)


def _graph_us(fn, calls: int) -> float:
    """Microseconds per call of fn's `calls` launches, captured in one CUDA graph (median)."""
    from triton.testing import do_bench
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=5, rep=30, return_mode="median") * 1e3 / calls


@torch.inference_mode()
def tune_skinny(layers: list[torch.nn.Linear], rows=(1, 2, 4, 8), log=None) -> list[dict]:
    """For each (N, K) among `layers` (one shape, many layers: a model's per-layer weights) and
    each row count: time cuBLAS and every Triton config over all those layers in one graph,
    check Triton against cuBLAS (relative error < 1e-2), and record the fastest for
    skinny_linear. Returns one row per (shape, rows) with the times. CUDA only; idempotent."""
    if not layers:
        return []
    by_shape: dict[tuple, list[torch.nn.Linear]] = {}
    for layer in layers:
        by_shape.setdefault((layer.out_features, layer.in_features), []).append(layer)
    report = []
    gen = torch.Generator(device=layers[0].weight.device).manual_seed(0)
    for (n, k), group in by_shape.items():
        w0 = group[0].weight
        for m in rows:
            key = _key(w0, n, k, m)
            if key in _CHOICE:
                continue
            _CHOICE[key] = None
            x = torch.randn((m, k), generator=gen, device=w0.device, dtype=w0.dtype)
            times = {"cublas": _graph_us(lambda: [layer(x) for layer in group], len(group))}
            ref = group[0](x).float()
            for cfg in CONFIGS:
                try:
                    err = float((gemv(x, w0, group[0].bias, cfg).float() - ref).norm() / ref.norm().clamp_min(1e-30))
                    if not err < 1e-2:
                        raise RuntimeError(f"relative error {err:.1e} against cuBLAS")
                    times[cfg] = _graph_us(lambda c=cfg: [gemv(x, layer.weight, layer.bias, c) for layer in group],
                                           len(group))
                except Exception as e:  # noqa: BLE001 - a config that fails here is never used
                    if log:
                        log(f"gemv {n}x{k} rows={m} config {cfg}: {type(e).__name__}: {e}")
            best = min(times, key=times.get)
            _CHOICE[key] = None if best == "cublas" else best
            row = {"N": n, "K": k, "rows": m, "layers": len(group), "chosen": str(best),
                   "cublas_us": times["cublas"], "best_us": times[best],
                   "GBps_best": n * k * w0.element_size() / times[best] / 1e3,
                   "GBps_cublas": n * k * w0.element_size() / times["cublas"] / 1e3}
            report.append(row)
            _TIMES[key] = row
            if log:
                log(f"gemv {n:>6}x{k:<6} rows={m}: cuBLAS {times['cublas']:6.1f} us, best {best} "
                    f"{times[best]:6.1f} us ({row['GBps_best']:.0f} GB/s)")
    return report


def chosen() -> dict:
    """The current table: {(device, dtype, N, K, rows): config or None}."""
    return dict(_CHOICE)


def tuned_us(w: torch.Tensor, rows: int) -> float | None:
    """µs per call that tune_skinny measured for the implementation it chose for w at `rows`
    rows (None: not tuned)."""
    row = _TIMES.get(_key(w, w.shape[0], w.shape[1], rows))
    return None if row is None else row["best_us"]


def reset() -> None:
    """Forget every choice: cuBLAS serves all shapes until tune_skinny runs again."""
    _CHOICE.clear()
    _TIMES.clear()

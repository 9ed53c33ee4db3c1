"""Ceilings measured in the same run, on the same device, as the figures judged against them.

  read    streaming read: a Triton kernel that reads a 2 GiB bf16 buffer once (each program
          sums its slice; one fp32 per program is written), bytes read / time
  copy    device-to-device copy of the same buffer, bytes read + bytes written / time
  matmul  bf16 8192^3 matmul on random data (cuBLAS through torch), FLOPs / time

Decode is memory-bound: it is judged against `read` (what a step must do is read the weights and
the KV once); `copy` is printed beside it. Prefill is judged against `matmul`. Medians of
triton.testing.do_bench. Usage: python -m benchmarks.ceilings
"""
from __future__ import annotations

import json

import torch

from kernels._launch import jit, tl

READ_BLOCK = 4096


@jit
def _read_kernel(X, OUT, N, PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    base = pid * PER_PROGRAM
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, PER_PROGRAM, BLOCK):
        idx = base + off + tl.arange(0, BLOCK)
        acc += tl.load(X + idx, mask=idx < N, other=0.0).to(tl.float32)
    tl.store(OUT + pid, tl.sum(acc, 0))


def streaming_read_GBps(x: torch.Tensor, per_program: int = 1 << 18) -> float:
    """Bytes of x read once per launch over the median launch time."""
    from triton.testing import do_bench
    n = x.numel()
    grid = -(-n // per_program)
    out = torch.empty(grid, dtype=torch.float32, device=x.device)

    def run():
        _read_kernel[(grid,)](x, out, n, PER_PROGRAM=per_program, BLOCK=READ_BLOCK, num_warps=8)
    run()
    torch.cuda.synchronize()
    ref = x[: per_program].float().sum()
    if not torch.allclose(out[0], ref, rtol=1e-2, atol=1e-1):
        raise RuntimeError(f"streaming-read kernel summed {float(out[0])}, expected {float(ref)}")
    ms = do_bench(run, warmup=25, rep=200, return_mode="median")
    return n * x.element_size() / ms / 1e6


def measure(numel: int = 1 << 30) -> dict:
    """{read_GBps, copy_GBps, matmul_bf16_TFLOPs, device}: all three measured now."""
    from triton.testing import do_bench
    a = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    best_read = max(streaming_read_GBps(a, p) for p in (1 << 16, 1 << 18, 1 << 20))
    b = torch.empty_like(a)
    copy_ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    del a, b
    m1 = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    m2 = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: m1 @ m2, warmup=25, rep=200, return_mode="median")
    del m1, m2
    torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(0), "read_GBps": best_read,
            "copy_GBps": 2 * numel * 2 / copy_ms / 1e6, "matmul_bf16_TFLOPs": 2 * 8192 ** 3 / mm_ms / 1e9}


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))

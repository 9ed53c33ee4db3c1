"""SwiGLU's activation: silu(gate) * up, fused into one pass over the gate_up projection's output
(the separate silu and multiply cost two extra round trips through memory per MLP)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._launch import FLOAT_DTYPES, check_tensor, jit, tl, use_triton

BLOCK = 1024


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * I] holding gate then up; returns [..., I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@jit
def _silu_and_mul_kernel(X, OUT, I, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (g / (1.0 + tl.exp(-g)) * u).to(OUT.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:], computed in fp32 and rounded once."""
    op = "silu_and_mul"
    if not use_triton(op, impl, _silu_and_mul_kernel, x):
        return silu_and_mul_ref(x)
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"{op}: x must have an even last dim (gate | up), got shape {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton_cdiv(inter, BLOCK))](
            x2, out, inter, x2.stride(0), out.stride(0), BLOCK=BLOCK, num_warps=4)
    return out.view(*x.shape[:-1], inter)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)

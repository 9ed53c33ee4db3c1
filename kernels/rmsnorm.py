"""RMSNorm and fused residual-add + RMSNorm.

Numerics follow HF Llama: normalise in fp32, cast back to the input dtype, then scale by the
weight (in the weight's dtype).
"""
from __future__ import annotations

import torch

from kernels._launch import FLOAT_DTYPES, check_shape, check_tensor, jit, next_pow2, tl, use_triton


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual = x + residual; returns (rmsnorm(residual), residual). Inputs are not modified."""
    residual = x + residual
    return rmsnorm_ref(residual, weight, eps), residual


@jit
def _rmsnorm_kernel(X, R, W, OUT, RES_OUT, N, stride_x, stride_r, stride_o, stride_ro, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        # HF adds in the activation dtype: round the sum before normalising it
        x = (x.to(tl.float32) + r.to(tl.float32)).to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    # HF casts the normalised row back to the input dtype before the weight multiplies it
    xn = (xf * inv_rms).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (w * xn).to(OUT.dtype.element_ty), mask=mask)


def _launch(op: str, x, residual, weight, eps: float):
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    check_tensor(op, "weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    check_shape(op, "weight", weight, (n,))
    if residual is not None:
        check_tensor(op, "residual", residual, dtypes=(x.dtype,), device=x.device)
        check_shape(op, "residual", residual, tuple(x.shape))
    x2 = x.reshape(-1, n)  # a copy only when leading dims cannot be flattened; inputs are read-only
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, n)
        res_out = torch.empty_like(x2, memory_format=torch.contiguous_format)
    else:
        r2 = res_out = x2  # unused: HAS_RESIDUAL=False prunes every access
    if x2.shape[0] > 0:
        block = next_pow2(n)
        num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, res_out, n, x2.stride(0), r2.stride(0), out.stride(0),
            res_out.stride(0), float(eps), HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=num_warps)
    out = out.view(x.shape)
    return (out, res_out.view(x.shape)) if residual is not None else out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of x with HF numerics. impl: None (Triton on CUDA, reference on
    CPU), "triton" or "torch"."""
    if not use_triton("rmsnorm", impl, _rmsnorm_kernel, x, weight):
        return rmsnorm_ref(x, weight, eps)
    return _launch("rmsnorm", x, None, weight, eps)


def fused_add_rmsnorm(x, residual, weight, eps: float, impl: str | None = None):
    """residual = x + residual; returns (rmsnorm(residual), residual) in one pass over memory.
    Inputs are not modified. impl as in rmsnorm."""
    if not use_triton("fused_add_rmsnorm", impl, _rmsnorm_kernel, x, residual, weight):
        return fused_add_rmsnorm_ref(x, residual, weight, eps)
    return _launch("fused_add_rmsnorm", x, residual, weight, eps)

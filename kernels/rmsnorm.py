"""RMSNorm and fused residual-add + RMSNorm.

Numerics follow HF Llama: normalise in fp32, cast back to the input dtype, then scale by the
weight (in the weight's dtype).
"""
from __future__ import annotations

import torch


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual = x + residual; returns (rmsnorm(residual), residual). Inputs are not modified."""
    residual = x + residual
    return rmsnorm_ref(residual, weight, eps), residual


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str | None = None) -> torch.Tensor:
    return rmsnorm_ref(x, weight, eps)


def fused_add_rmsnorm(x, residual, weight, eps: float, impl: str | None = None):
    return fused_add_rmsnorm_ref(x, residual, weight, eps)

"""Shared input builders and comparisons for the kernel tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Target:
    device: str
    dtype: torch.dtype

    @property
    def tol(self) -> float:
        """Bound on ||out - ref|| / ||ref||: bf16 outputs are rounded to 8 bits of mantissa."""
        return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[self.dtype]

    def randn(self, *shape, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen) * scale
        return x.to(device=self.device, dtype=self.dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or wrong)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_close(out: torch.Tensor, ref: torch.Tensor, target: Target, what: str = "output") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    err = rel_err(out, ref)
    assert err < target.tol, f"{what}: relative error {err:.2e} > {target.tol:.0e}"


def block_tables(batch: int, max_blocks: int, num_blocks: int, gen: torch.Generator,
                 device: str) -> torch.Tensor:
    """Disjoint, scattered block ids per sequence (int32 [batch, max_blocks])."""
    ids = torch.randperm(num_blocks, generator=gen)[:batch * max_blocks]
    return ids.view(batch, max_blocks).to(device=device, dtype=torch.int32)


def cu_seqlens(lens: list[int], device: str) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)

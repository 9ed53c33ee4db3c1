"""Rotary position embedding (the rotate-half layout of HF Llama), applied to q and k.

`cos_sin` is a [max_positions, head_dim] table: cos in the first half, sin in the second
(model/rope.py builds it, with llama3 scaling where configured).
"""
from __future__ import annotations

import torch


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                   cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [N, Hq, D], k: [N, Hk, D], positions: [N] int. Rotates q and k in place and returns them."""
    half = q.shape[-1] // 2
    cs = cos_sin.index_select(0, positions.long())
    cos = cs[:, :half].unsqueeze(1).float()
    sin = cs[:, half:].unsqueeze(1).float()
    for t in (q, k):
        x1 = t[..., :half].float()
        x2 = t[..., half:].float()
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        t[..., :half] = o1.to(t.dtype)
        t[..., half:] = o2.to(t.dtype)
    return q, k


def apply_rope(q, k, positions, cos_sin, impl: str | None = None):
    return apply_rope_ref(q, k, positions, cos_sin)

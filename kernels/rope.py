"""Rotary position embedding (the rotate-half layout of HF Llama), applied to q and k.

`cos_sin` is a [max_positions, head_dim] table: cos in the first half, sin in the second
(model/rope.py builds it, with llama3 scaling where configured).
"""
from __future__ import annotations

import torch

from kernels._launch import FLOAT_DTYPES, INDEX_DTYPES, check_shape, check_tensor, jit, next_pow2, tl, use_triton


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


@jit
def _rotate_heads(base, stride_h, num_heads, cos, sin, offs, d_mask,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < num_heads)[:, None] & d_mask[None, :]
        p1 = base + heads[:, None] * stride_h + offs[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
        dtype = x1.dtype
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        tl.store(p1, (x1 * cos - x2 * sin).to(dtype), mask=mask)
        tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@jit
def _rope_kernel(Q, K, POS, CS, stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
                 num_q_heads, num_k_heads, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    # One program per token: its cos/sin row is read once and used for every q and k head.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    d_mask = offs < HALF
    cos = tl.load(CS + pos * stride_cs + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(CS + pos * stride_cs + HALF + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q + t * stride_qt, stride_qh, num_q_heads, cos, sin, offs, d_mask, HALF, BLOCK_H)
    _rotate_heads(K + t * stride_kt, stride_kh, num_k_heads, cos, sin, offs, d_mask, HALF, BLOCK_H)


def _launch(q, k, positions, cos_sin):
    op = "apply_rope"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    n, _, d = q.shape
    if d % 2:
        raise ValueError(f"{op}: head_dim must be even for rotate-half RoPE, got {d}")
    check_tensor(op, "k", k, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    check_shape(op, "k", k, (n, None, d))
    check_tensor(op, "positions", positions, ndim=1, dtypes=INDEX_DTYPES, device=q.device)
    check_shape(op, "positions", positions, (n,))
    check_tensor(op, "cos_sin", cos_sin, ndim=2, dtypes=FLOAT_DTYPES, device=q.device)
    check_shape(op, "cos_sin", cos_sin, (None, d))
    if n == 0:
        return q, k
    half = d // 2
    block_half = next_pow2(half)
    # ~4K elements per head chunk keeps registers modest for any head count
    block_h = min(next_pow2(max(q.shape[1], k.shape[1])), max(1, 4096 // block_half))
    _rope_kernel[(n,)](q, k, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                       cos_sin.stride(0), q.shape[1], k.shape[1], HALF=half, BLOCK_HALF=block_half,
                       BLOCK_H=block_h, num_warps=4)
    return q, k


def apply_rope(q, k, positions, cos_sin, impl: str | None = None):
    """Rotate q [N, Hq, D] and k [N, Hk, D] in place by their token positions [N] using the
    [max_positions, D] cos|sin table; returns (q, k). Positions must be < max_positions.
    impl: None (Triton on CUDA, reference on CPU), "triton" or "torch"."""
    if not use_triton("apply_rope", impl, _rope_kernel, q, k, positions, cos_sin):
        return apply_rope_ref(q, k, positions, cos_sin)
    return _launch(q, k, positions, cos_sin)

"""Scatter new K/V rows into paged cache slots (slot = block_id * block_size + offset)."""
from __future__ import annotations

import torch

from kernels._launch import FLOAT_DTYPES, INDEX_DTYPES, check_shape, check_tensor, jit, next_pow2, tl, use_triton


def write_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [N, Hk, D]; k_cache, v_cache: [num_blocks, block_size, Hk, D]; slot_mapping: [N]
    int64. Slots < 0 are skipped (padding)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))


@jit
def _write_kv_kernel(K, V, KC, VC, SLOTS, stride_kt, stride_kh, stride_vt, stride_vh, slot_stride,
                     num_heads, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per new token; a negative slot is padding and writes nothing.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if slot >= 0:
        offs_d = tl.arange(0, BLOCK_D)
        for h0 in range(0, num_heads, BLOCK_H):
            heads = h0 + tl.arange(0, BLOCK_H)
            mask = (heads < num_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
            dst = slot * slot_stride + heads[:, None] * HEAD_DIM + offs_d[None, :]
            k = tl.load(K + t * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=mask)
            v = tl.load(V + t * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask)
            tl.store(KC + dst, k.to(KC.dtype.element_ty), mask=mask)
            tl.store(VC + dst, v.to(VC.dtype.element_ty), mask=mask)


def _launch(k, v, k_cache, v_cache, slot_mapping):
    op = "write_kv_cache"
    check_tensor(op, "k", k, ndim=3, dtypes=FLOAT_DTYPES)
    n, hk, d = k.shape
    dev = k.device
    check_tensor(op, "v", v, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
    check_shape(op, "v", v, (n, hk, d))
    check_tensor(op, "k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES, device=dev, contiguous=True)
    check_shape(op, "k_cache", k_cache, (None, None, hk, d))
    check_tensor(op, "v_cache", v_cache, dtypes=(k_cache.dtype,), device=dev, contiguous=True)
    check_shape(op, "v_cache", v_cache, tuple(k_cache.shape))
    check_tensor(op, "slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    check_shape(op, "slot_mapping", slot_mapping, (n,))
    if n == 0:
        return
    block_d = next_pow2(d)
    block_h = min(next_pow2(hk), max(1, 2048 // block_d))
    _write_kv_kernel[(n,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1),
                           v.stride(0), v.stride(1), k_cache.stride(1), hk, HEAD_DIM=d,
                           BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, impl: str | None = None) -> None:
    """Scatter k, v [N, Hk, D] into the paged caches [num_blocks, block_size, Hk, D] at
    slot_mapping [N] (block_id * block_size + offset; negative = skip). Slots must be in range.
    impl: None (Triton on CUDA, reference on CPU), "triton" or "torch"."""
    if not use_triton("write_kv_cache", impl, _write_kv_kernel, k, v, k_cache, v_cache, slot_mapping):
        write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)
        return
    _launch(k, v, k_cache, v_cache, slot_mapping)

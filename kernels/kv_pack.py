"""Gather a request's KV blocks into one contiguous buffer, and scatter such a buffer back.

The cache of a worker is one tensor [num_layers, 2, num_blocks, block_size, num_kv_heads,
head_dim]. A packed buffer holds a rectangle of it: layers [l0, l1) x heads [h0, h1) of the
given blocks, laid out [l1-l0, 2, len(block_ids), block_size, h1-h0, head_dim], contiguous.
kv_transfer sends these buffers: a few large messages per request, never one per block.
"""
from __future__ import annotations

import torch

from kernels._launch import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, jit, next_pow2, tl, use_triton


def packed_shape(kv_cache: torch.Tensor, num_blocks: int, layers: tuple[int, int],
                 heads: tuple[int, int]) -> tuple[int, ...]:
    L, two, _, bs, _, D = kv_cache.shape
    return (layers[1] - layers[0], two, num_blocks, bs, heads[1] - heads[0], D)


def pack_kv_ref(kv_cache: torch.Tensor, block_ids: torch.Tensor, layers: tuple[int, int],
                heads: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor:
    src = kv_cache[layers[0]:layers[1], :, :, :, heads[0]:heads[1]]
    gathered = src.index_select(2, block_ids.long())
    if out is None:
        return gathered.contiguous()
    out.view(gathered.shape).copy_(gathered)
    return out


def unpack_kv_ref(buf: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor,
                  layers: tuple[int, int], heads: tuple[int, int]) -> None:
    shape = packed_shape(kv_cache, len(block_ids), layers, heads)
    dst = kv_cache[layers[0]:layers[1], :, :, :, heads[0]:heads[1]]
    dst.index_copy_(2, block_ids.to(kv_cache.device).long(), buf.view(shape).to(kv_cache.dtype))


@jit(do_not_specialize=['layer0', 'head_offset', 'num_packed'])
def _pack_kernel(CACHE, BUF, BLOCK_IDS, stride_l, stride_kv, stride_b, stride_t, layer0, head_offset,
                 num_packed, ROW: tl.constexpr, TOKENS: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_R: tl.constexpr, UNPACK: tl.constexpr):
    # Program (j, lc, chunk) moves a [BLOCK_T tokens, BLOCK_R] tile of block j, layer-and-kv lc.
    # A packed slab is TOKENS rows of ROW = heads * head_dim elements; in the cache each row is
    # contiguous too (the heads are adjacent) and rows are stride_t apart. A 2-D tile with
    # constexpr ROW lets the compiler prove 16-byte runs on both sides.
    j = tl.program_id(0)
    lc = tl.program_id(1)
    chunk = tl.program_id(2)
    num_r_chunks: tl.constexpr = (ROW + BLOCK_R - 1) // BLOCK_R
    offs_t = (chunk // num_r_chunks) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = (chunk % num_r_chunks) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (offs_t < TOKENS)[:, None] & (offs_r < ROW)[None, :]
    bid = tl.load(BLOCK_IDS + j).to(tl.int64)
    layer = (layer0 + lc // 2).to(tl.int64)
    cache_base = layer * stride_l + (lc % 2) * stride_kv + bid * stride_b + head_offset
    buf_base = (lc.to(tl.int64) * num_packed + j) * (TOKENS * ROW)
    cache_ptrs = CACHE + cache_base + offs_t[:, None] * stride_t + offs_r[None, :]
    buf_ptrs = BUF + buf_base + offs_t[:, None] * ROW + offs_r[None, :]
    if UNPACK:
        x = tl.load(buf_ptrs, mask=mask)
        tl.store(cache_ptrs, x.to(CACHE.dtype.element_ty), mask=mask)
    else:
        x = tl.load(cache_ptrs, mask=mask)
        tl.store(buf_ptrs, x.to(BUF.dtype.element_ty), mask=mask)


def _check(op, kv_cache, block_ids, layers, heads):
    check_tensor(op, "kv_cache", kv_cache, ndim=6, dtypes=FLOAT_DTYPES, contiguous=True)
    L, two, nb, _, hk, _ = kv_cache.shape
    if two != 2:
        raise ValueError(f"{op}: kv_cache dim 1 must be 2 (K and V), got shape {tuple(kv_cache.shape)}")
    check_tensor(op, "block_ids", block_ids, ndim=1, dtypes=INDEX_DTYPES)
    if not (0 <= layers[0] < layers[1] <= L):
        raise ValueError(f"{op}: layers must satisfy 0 <= l0 < l1 <= {L}, got {tuple(layers)}")
    if not (0 <= heads[0] < heads[1] <= hk):
        raise ValueError(f"{op}: heads must satisfy 0 <= h0 < h1 <= {hk}, got {tuple(heads)}")
    # block ids travel with the request's metadata and may still be on the host
    return block_ids.to(kv_cache.device, non_blocking=True)


def _launch(kv_cache, buf, block_ids, layers, heads, unpack: bool):
    _, _, _, bs, _, d = kv_cache.shape
    row = (heads[1] - heads[0]) * d
    block_r = min(next_pow2(row), 2048)
    block_t = min(next_pow2(bs), max(1, 4096 // block_r))  # ~8 KB of bf16 per program
    grid = (len(block_ids), 2 * (layers[1] - layers[0]), -(-bs // block_t) * -(-row // block_r))
    s = kv_cache.stride()
    _pack_kernel[grid](kv_cache, buf, block_ids, s[0], s[1], s[2], s[3], layers[0], heads[0] * d,
                       len(block_ids), ROW=row, TOKENS=bs, BLOCK_T=block_t, BLOCK_R=block_r,
                       UNPACK=unpack, num_warps=4)


def pack_kv(kv_cache, block_ids, layers, heads, out=None, impl: str | None = None):
    """Gather layers [l0, l1) x heads [h0, h1) of `block_ids` from kv_cache into a contiguous
    [l1-l0, 2, len(block_ids), block_size, h1-h0, head_dim] buffer (written into `out` when given:
    contiguous, same numel, on kv_cache's device). impl: None (Triton on CUDA, reference on CPU),
    "triton" or "torch"."""
    op = "pack_kv"
    if not use_triton(op, impl, _pack_kernel, kv_cache, out):
        return pack_kv_ref(kv_cache, block_ids, layers, heads, out)
    block_ids = _check(op, kv_cache, block_ids, layers, heads)
    shape = packed_shape(kv_cache, len(block_ids), layers, heads)
    if out is None:
        out = torch.empty(shape, dtype=kv_cache.dtype, device=kv_cache.device)
    else:
        check_tensor(op, "out", out, dtypes=FLOAT_DTYPES, device=kv_cache.device, contiguous=True)
        if out.numel() != torch.Size(shape).numel():
            raise ValueError(f"{op}: out must hold {torch.Size(shape).numel()} elements for packed "
                             f"shape {shape}, got shape {tuple(out.shape)}")
    if len(block_ids) > 0:
        _launch(kv_cache, out, block_ids, layers, heads, unpack=False)
    return out


def unpack_kv(buf, kv_cache, block_ids, layers, heads, impl: str | None = None) -> None:
    """Scatter a buffer laid out as pack_kv writes it back into kv_cache at `block_ids`.
    impl as in pack_kv."""
    op = "unpack_kv"
    if not use_triton(op, impl, _pack_kernel, kv_cache, buf):
        unpack_kv_ref(buf, kv_cache, block_ids, layers, heads)
        return
    block_ids = _check(op, kv_cache, block_ids, layers, heads)
    shape = packed_shape(kv_cache, len(block_ids), layers, heads)
    check_tensor(op, "buf", buf, dtypes=FLOAT_DTYPES, device=kv_cache.device, contiguous=True)
    if buf.numel() != torch.Size(shape).numel():
        raise ValueError(f"{op}: buf must hold {torch.Size(shape).numel()} elements for packed "
                         f"shape {shape}, got shape {tuple(buf.shape)}")
    if len(block_ids) > 0:
        _launch(kv_cache, buf, block_ids, layers, heads, unpack=True)

"""Gather a request's KV blocks into one contiguous buffer, and scatter such a buffer back.

The cache of a worker is one tensor [num_layers, 2, num_blocks, block_size, num_kv_heads,
head_dim]. A packed buffer holds a rectangle of it: layers [l0, l1) x heads [h0, h1) of the
given blocks, laid out [l1-l0, 2, len(block_ids), block_size, h1-h0, head_dim], contiguous.
kv_transfer sends these buffers: a few large messages per request, never one per block.
"""
from __future__ import annotations

import torch


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


def pack_kv(kv_cache, block_ids, layers, heads, out=None, impl: str | None = None):
    return pack_kv_ref(kv_cache, block_ids, layers, heads, out)


def unpack_kv(buf, kv_cache, block_ids, layers, heads, impl: str | None = None) -> None:
    unpack_kv_ref(buf, kv_cache, block_ids, layers, heads)

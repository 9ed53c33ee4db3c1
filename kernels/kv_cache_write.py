"""Scatter new K/V rows into paged cache slots (slot = block_id * block_size + offset)."""
from __future__ import annotations

import torch


def write_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [N, Hk, D]; k_cache, v_cache: [num_blocks, block_size, Hk, D]; slot_mapping: [N]
    int64. Slots < 0 are skipped (padding)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, impl: str | None = None) -> None:
    write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)

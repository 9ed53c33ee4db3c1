"""Paged decode attention: one query token per sequence over its block table."""
from __future__ import annotations

import torch


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float, num_splits: int | None = None) -> torch.Tensor:
    """q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hk, D]; block_tables:
    [B, max_blocks] int32; context_lens: [B] int32 (tokens to attend, the current one included,
    its KV already written). Returns [B, Hq, D]; softmax in fp32. num_splits is ignored here."""
    B, Hq, D = q.shape
    Hk = k_cache.shape[2]
    bs = k_cache.shape[1]
    group = Hq // Hk
    out = torch.empty_like(q)
    for b, n in enumerate(context_lens.tolist()):
        ids = block_tables[b, :-(-n // bs)].long()
        kb = k_cache.index_select(0, ids).flatten(0, 1)[:n].float()      # [n, Hk, D]
        vb = v_cache.index_select(0, ids).flatten(0, 1)[:n].float()
        kb = kb.transpose(0, 1).repeat_interleave(group, 0)               # [Hq, n, D]
        vb = vb.transpose(0, 1).repeat_interleave(group, 0)
        s = (kb @ q[b].float().unsqueeze(-1)).squeeze(-1) * scale        # [Hq, n]
        out[b] = (s.softmax(-1).unsqueeze(1) @ vb).squeeze(1).to(q.dtype)
    return out


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                           num_splits: int | None = None, impl: str | None = None):
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)

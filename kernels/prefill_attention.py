"""Causal prefill attention over variable-length sequences packed end to end, with grouped-query
attention and an optional cached prefix read from the paged KV cache.

Sequence b has `prefix_lens[b]` tokens already in the paged cache (prefix caching or an earlier
chunk) and new tokens q/k/v[cu_seqlens[b]:cu_seqlens[b+1]]. New token i of sequence b sits at
position prefix_lens[b] + i and attends to every prefix token and to new tokens 0..i.
"""
from __future__ import annotations

import torch


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cu_seqlens: torch.Tensor, scale: float,
                          k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                          block_tables: torch.Tensor | None = None,
                          prefix_lens: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hk, D]; cu_seqlens: [B+1] int32; k_cache, v_cache:
    [num_blocks, block_size, Hk, D]; block_tables: [B, max_blocks] int32; prefix_lens: [B] int32.
    Returns [T, Hq, D] in q's dtype; softmax in fp32."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    group = Hq // Hk
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    plens = prefix_lens.tolist() if prefix_lens is not None else [0] * (len(cu) - 1)
    for b in range(len(cu) - 1):
        s, e, p = cu[b], cu[b + 1], plens[b]
        n = e - s
        if n == 0:
            continue
        kb, vb = k[s:e], v[s:e]
        if p > 0:
            kp, vp = gather_paged(k_cache, v_cache, block_tables[b], p)
            kb, vb = torch.cat([kp, kb]), torch.cat([vp, vb])
        qf = q[s:e].float().transpose(0, 1)                               # [Hq, n, D]
        kf = kb.float().transpose(0, 1).repeat_interleave(group, 0)       # [Hq, p+n, D]
        vf = vb.float().transpose(0, 1).repeat_interleave(group, 0)
        scores = (qf @ kf.transpose(1, 2)) * scale                        # [Hq, n, p+n]
        qpos = torch.arange(n).unsqueeze(1) + p
        kpos = torch.arange(p + n).unsqueeze(0)
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        out[s:e] = (scores.softmax(-1) @ vf).transpose(0, 1).to(q.dtype)
    return out


def gather_paged(k_cache, v_cache, block_table, length: int):
    """The first `length` tokens of one sequence from the paged cache, as [length, Hk, D]."""
    bs = k_cache.shape[1]
    nb = -(-length // bs)
    ids = block_table[:nb].long()
    kp = k_cache.index_select(0, ids).flatten(0, 1)[:length]
    vp = v_cache.index_select(0, ids).flatten(0, 1)[:length]
    return kp, vp


def prefill_attention(q, k, v, cu_seqlens, scale, k_cache=None, v_cache=None,
                      block_tables=None, prefix_lens=None, impl: str | None = None):
    return prefill_attention_ref(q, k, v, cu_seqlens, scale, k_cache, v_cache, block_tables, prefix_lens)

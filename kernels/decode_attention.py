"""Paged decode attention: one query token per sequence over its block table.

Triton path (flash-decoding): program (b, kv_head, split) loads each K/V row of its share of the
context once and scores it against the whole GQA group of query heads with one small matrix
product, so KV bytes are read once per query group. With num_splits > 1 each split writes a
partial output and its log-sum-exp, and a second kernel combines them; with one split the first
kernel writes the output directly.
"""
from __future__ import annotations

import torch

from kernels._launch import (FLOAT_DTYPES, output_like, check_shape, check_tensor, device_sms, gdc_launch_dependents,
                             gdc_wait, is_interpreted, jit, next_pow2, tl, use_triton)

LOG2E = 1.4426950408889634


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


@jit
def _combine_splits(PART_O, PART_LSE, OUT, b, kvh, num_kv_heads, num_splits, stride_ob, stride_oh,
                    GROUP: tl.constexpr, BLOCK_GC: tl.constexpr, BLOCK_SC: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """What _decode_reduce_kernel does for the GROUP query heads of (b, kvh), run by the split
    that finished last. Loads are .cg: the partials were written by other multiprocessors."""
    offs_g = tl.arange(0, BLOCK_GC)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    rows = (b * num_kv_heads * GROUP + kvh * GROUP + offs_g).to(tl.int64) * num_splits
    m = tl.full([BLOCK_GC], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_SC):
        offs_s = s0 + tl.arange(0, BLOCK_SC)
        lse = tl.load(PART_LSE + rows[:, None] + offs_s[None, :], mask=g_mask[:, None] & (offs_s < num_splits)[None, :],
                      other=float("-inf"), cache_modifier=".cg")
        m = tl.maximum(m, tl.max(lse, 1))
    m = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_GC, BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_GC], tl.float32)
    for s0 in range(0, num_splits, BLOCK_SC):
        offs_s = s0 + tl.arange(0, BLOCK_SC)
        smask = g_mask[:, None] & (offs_s < num_splits)[None, :]
        lse = tl.load(PART_LSE + rows[:, None] + offs_s[None, :], mask=smask, other=float("-inf"),
                      cache_modifier=".cg")
        w = tl.math.exp2(lse - m[:, None])
        o = tl.load(PART_O + (rows[:, None] + offs_s[None, :])[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=smask[:, :, None] & d_mask[None, None, :], other=0.0, cache_modifier=".cg")
        acc += tl.sum(w[:, :, None] * o, 1)
        den += tl.sum(w, 1)
    o = acc / tl.maximum(den, 1e-30)[:, None]
    heads = kvh * GROUP + offs_g
    tl.store(OUT + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(OUT.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@jit(do_not_specialize=['stride_btb', 'num_splits'])
def _decode_split_kernel(Q, KC, VC, BT, CTX, OUT, PART_O, PART_LSE, CNT, qk_scale,
                         stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_btb,
                         stride_ob, stride_oh, num_splits,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                         WRITE_PARTIAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         PDL: tl.constexpr = False, COMBINE: tl.constexpr = False,
                         BLOCK_GC: tl.constexpr = 1, BLOCK_SC: tl.constexpr = 1):
    if PDL:     # launched with PDL: let the successor start, wait for the predecessor's writes
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(CTX + b)
    # Splits cover whole BLOCK_N tiles so that only a split's last tile needs a length mask.
    tiles_per_split = tl.cdiv(tl.cdiv(ctx, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:  # the interpreter's low-precision arithmetic is unreliable; work in fp32 there
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = BT + b.to(tl.int64) * stride_btb
    head_off = kvh * stride_ch
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + offs_n
        n_mask = offs < end
        page = tl.load(bt_row + offs // PAGE, mask=n_mask, other=0).to(tl.int64)
        rows = page * stride_cb + (offs % PAGE) * stride_ct + head_off
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(KC + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(VC + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (or context) has l_i == 0: it contributes zeros and an lse of -inf.
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if WRITE_PARTIAL:
        row = (b * tl.num_programs(1) * GROUP + heads).to(tl.int64) * num_splits + split
        tl.store(PART_O + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=out_mask)
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(PART_LSE + row, lse, mask=g_mask)
        if COMBINE:     # the last split of (b, kvh) to finish combines them: no reduce launch
            tl.debug_barrier()      # every thread's partials are written before the count
            count = CNT + b * tl.num_programs(1) + kvh
            if tl.atomic_add(count, 1) == num_splits - 1:
                _combine_splits(PART_O, PART_LSE, OUT, b, kvh, tl.num_programs(1), num_splits, stride_ob, stride_oh,
                                GROUP, BLOCK_GC, BLOCK_SC, HEAD_DIM, BLOCK_D)
                tl.store(count, 0)
    else:
        o_ptr = OUT + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptr, o.to(OUT.dtype.element_ty), mask=out_mask)


@jit(do_not_specialize=['num_splits'])
def _decode_reduce_kernel(PART_O, PART_LSE, OUT, stride_ob, stride_oh, num_heads, num_splits,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                          PDL: tl.constexpr = False):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    # Combine the splits of one (sequence, query head): weights 2^(lse_s - max lse).
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    row = (b * num_heads + h).to(tl.int64) * num_splits + offs_s
    lse = tl.load(PART_LSE + row, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    w = w / tl.maximum(tl.sum(w, 0), 1e-30)
    mask = s_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(PART_O + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    o = tl.sum(w[:, None] * o, 0)
    tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, o.to(OUT.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def _config(head_dim: int, interpreted: bool) -> dict:
    """Tile and launch shape, from an H100 sweep (docs/benchmarks.md). With 3 stages the compiler
    fetches page ids two tiles ahead and K/V one tile ahead (cp.async): 32 KB per program in
    flight at D=128, and 2-5 programs per multiprocessor cover HBM latency. Small tiles in the
    interpreter."""
    if interpreted:
        return dict(BLOCK_N=16, num_warps=1, num_stages=1)
    if head_dim <= 64:
        return dict(BLOCK_N=128, num_warps=4, num_stages=3)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


def auto_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int,
                    min_split_tokens: int = 256) -> int:
    """No split once there are two programs per multiprocessor; below that, about four programs
    per multiprocessor (rounded down: on H100, 16 x 8 heads x 16k ran 2.88 TB/s with 4 splits
    but 2.62 with 5, whose 640 programs fill the last wave unevenly), each split >= 256 tokens."""
    programs = batch * num_kv_heads
    if programs >= 2 * num_sms:
        return 1
    return max(1, min(4 * num_sms // programs, max_context // min_split_tokens, 64))


_COUNTERS: dict[str, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Arrival counters of the combining splits, zero between launches (the combining program
    resets its own); allocated at the eager warm-up that precedes graph capture."""
    have = _COUNTERS.get(str(device))
    if have is None or have.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("paged_decode_attention: combine counters must be allocated before graph capture")
        have = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _COUNTERS[str(device)] = have
    return have


def _launch(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, config=None, out=None,
            pdl=False, combine=False):
    op = "paged_decode_attention"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    B, Hq, D = q.shape
    dev = q.device
    check_tensor(op, "k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=dev, contiguous=True)
    _, page, Hk, _ = k_cache.shape
    check_shape(op, "k_cache", k_cache, (None, None, None, D))
    check_tensor(op, "v_cache", v_cache, dtypes=(q.dtype,), device=dev, contiguous=True)
    check_shape(op, "v_cache", v_cache, tuple(k_cache.shape))
    check_tensor(op, "block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=dev)
    check_shape(op, "block_tables", block_tables, (B, None))
    check_tensor(op, "context_lens", context_lens, ndim=1, dtypes=(torch.int32,), device=dev)
    check_shape(op, "context_lens", context_lens, (B,))
    if Hq % Hk:
        raise ValueError(f"{op}: query heads ({Hq}) must be a multiple of KV heads ({Hk})")
    if D < 16:
        raise ValueError(f"{op}: head_dim must be >= 16 for the tensor-core path, got {D}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{op}: num_splits must be None or >= 1, got {num_splits}")
    interpreted = is_interpreted(_decode_split_kernel)
    cfg = dict(_config(D, interpreted), **(config or {}))
    out = output_like(op, out, q)
    if B == 0:
        return out
    if num_splits is None:
        num_splits = auto_num_splits(B, Hk, block_tables.shape[1] * page, device_sms(q))
    group = Hq // Hk
    partial = num_splits > 1
    pdl = bool(pdl) and not interpreted and gdc_wait is not None
    extra = {"launch_pdl": True} if pdl else {}
    part_o = torch.empty((B, Hq, num_splits, D) if partial else (1,), dtype=torch.float32, device=dev)
    part_lse = torch.empty((B, Hq, num_splits) if partial else (1,), dtype=torch.float32, device=dev)
    block_d = next_pow2(D)
    combine = bool(combine) and partial
    cnt = _counters(dev, B * Hk) if combine else part_lse
    _decode_split_kernel[(B, Hk, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_o, part_lse, cnt, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), num_splits,
        GROUP=group, BLOCK_G=max(16, next_pow2(group)), HEAD_DIM=D, BLOCK_D=block_d,
        BLOCK_N=cfg["BLOCK_N"], PAGE=page, WRITE_PARTIAL=partial, UPCAST=interpreted,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PDL=pdl,
        COMBINE=combine, BLOCK_GC=next_pow2(group), BLOCK_SC=8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)
    if partial and not combine:
        _decode_reduce_kernel[(B, Hq)](part_o, part_lse, out, out.stride(0), out.stride(1), Hq,
                                       num_splits, HEAD_DIM=D, BLOCK_D=block_d,
                                       BLOCK_S=max(2, next_pow2(num_splits)), PDL=pdl, num_warps=4, **extra)
    return out


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                           num_splits: int | None = None, impl: str | None = None, out=None,
                           pdl: bool = False, combine: bool = False):
    """Attention of one query token per sequence over its paged KV (shapes as in the reference).
    num_splits: how many parts each context is split into (flash-decoding); None picks from the
    batch size, KV heads and the block table width. impl: None (Triton on CUDA, reference on
    CPU), "triton" or "torch". out: an optional [B, Hq, D] tensor (rows may be strided) written
    in place and returned. pdl: launch with programmatic dependent launch (Hopper): each kernel
    lets its successor start early and waits for its predecessor before reading (the fused
    decode path's chain, kernels/fused_gemv.py). combine: the last split of each (sequence, KV
    head) to finish combines the splits, instead of a second kernel."""
    if not use_triton("paged_decode_attention", impl, _decode_split_kernel, q, k_cache, v_cache,
                      block_tables, context_lens):
        ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale,
                                         num_splits)
        return ref if out is None else output_like("paged_decode_attention", out, q).copy_(ref)
    return _launch(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, out=out,
                   pdl=pdl, combine=combine)

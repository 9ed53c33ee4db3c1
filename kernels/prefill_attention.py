"""Causal prefill attention over variable-length sequences packed end to end, with grouped-query
attention and an optional cached prefix read from the paged KV cache.

Sequence b has `prefix_lens[b]` tokens already in the paged cache (prefix caching or an earlier
chunk) and new tokens q/k/v[cu_seqlens[b]:cu_seqlens[b+1]]. New token i of sequence b sits at
position prefix_lens[b] + i and attends to every prefix token and to new tokens 0..i.

Triton path (FlashAttention-2 forward): program (q_head, tile) holds BLOCK_M query rows of one
sequence and streams keys in three stages: the cached prefix (gathered through the block table),
the new keys left of the tile (no mask), then the diagonal tiles (causal mask). Tiles are found
without a host sync: sequence b owns the virtual tiles starting at cu_seqlens[b] // BLOCK_M + b,
so T // BLOCK_M + B programs per head cover every packing, and a program finds its sequence by
binary search over cu_seqlens.
"""
from __future__ import annotations

import torch

from kernels._launch import (FLOAT_DTYPES, output_like, check_shape, check_tensor, is_interpreted, jit, next_pow2, tl,
                             use_triton)

LOG2E = 1.4426950408889634


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
        qpos = torch.arange(n, device=q.device).unsqueeze(1) + p
        kpos = torch.arange(p + n, device=q.device).unsqueeze(0)
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


@jit
def _find_sequence(CU, tile, num_seqs, BLOCK_M: tl.constexpr):
    """The sequence owning virtual tile `tile`: the largest b with CU[b] // BLOCK_M + b <= tile."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        owns = tl.load(CU + mid) // BLOCK_M + mid <= tile
        lo = tl.where(owns, mid + 1, lo)
        hi = tl.where(owns, hi, mid)
    return lo - 1


@jit
def _softmax_step(acc, l_i, m_i, qk, v, qk_scale, mask, MASKED: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """One online-softmax update with a tile of raw scores qk [M, N] and its values v [N, D]."""
    if MASKED:
        qk = tl.where(mask, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_new[:, None]
    else:
        # scale after the row max: one fused multiply-add per score instead of two operations
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_new[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@jit
def _attend_prefix(acc, l_i, m_i, q, KC, VC, bt_row, head_off, stride_cb, stride_ct, prefix_len,
                   qk_scale, offs_n, offs_d, d_mask, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Stage 1: every cached prefix token is visible to every new token."""
    for n0 in range(0, prefix_len, BLOCK_N):
        offs = n0 + offs_n
        n_mask = offs < prefix_len
        page = tl.load(bt_row + offs // PAGE, mask=n_mask, other=0).to(tl.int64)
        rows = page * stride_cb + (offs % PAGE) * stride_ct + head_off
        mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(KC + rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(VC + rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v, qk_scale, n_mask[None, :], True,
                                      DOT_PRECISION)
    return acc, l_i, m_i


@jit
def _attend_new(acc, l_i, m_i, q, K, V, row0, col, stride_kt, stride_vt, lo, hi, seq_len, offs_m,
                qk_scale, offs_n, offs_d, d_mask, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
                DIAGONAL: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Stages 2 and 3: new keys [lo, hi). Left of the diagonal every key is in bounds and
    visible, so loads and scores need no mask there. K, V are pointers to the sequence's first
    row and KV head, or (USE_TMA) tensor descriptors of [T, Hk * D] read at (row0 + n, col)."""
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + offs_n
        if USE_TMA:
            # rows past T read as zeros; rows of the next sequence only reach masked scores
            k = K.load([row0 + n0, col])
            v = V.load([row0 + n0, col])
        else:
            k_ptrs = K + offs[:, None] * stride_kt + offs_d[None, :]
            v_ptrs = V + offs[:, None] * stride_vt + offs_d[None, :]
            if DIAGONAL:
                mask = (offs < seq_len)[:, None] & d_mask[None, :]
                k = tl.load(k_ptrs, mask=mask, other=0.0)
                v = tl.load(v_ptrs, mask=mask, other=0.0)
            elif EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=d_mask[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v, qk_scale,
                                      offs_m[:, None] >= offs[None, :], DIAGONAL, DOT_PRECISION)
    return acc, l_i, m_i


@jit(do_not_specialize=['num_seqs', 'stride_btb'])
def _prefill_kernel(Q, K, V, O, CU, KC, VC, BT, PLEN, qk_scale,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_ot, stride_oh, stride_cb, stride_ct, stride_ch, stride_btb, num_seqs,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                    HAS_PREFIX: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    h = tl.program_id(0)
    tile = tl.program_id(1)
    b = _find_sequence(CU, tile, num_seqs, BLOCK_M)
    seq_start = tl.load(CU + b)
    seq_len = tl.load(CU + b + 1) - seq_start
    num_tiles = tl.cdiv(seq_len, BLOCK_M)
    local = tile - (seq_start // BLOCK_M + b)
    if local < num_tiles:
        # Tiles with the most keys start first, so the short ones fill the tail of the grid.
        m_start = (num_tiles - 1 - local) * BLOCK_M
        kvh = h // GROUP
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        row_mask = (offs_m < seq_len)[:, None] & d_mask[None, :]
        tok = (seq_start + offs_m).to(tl.int64)
        q = tl.load(Q + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=row_mask,
                    other=0.0)
        if UPCAST:  # the interpreter's low-precision arithmetic is unreliable; work in fp32 there
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if HAS_PREFIX:
            acc, l_i, m_i = _attend_prefix(
                acc, l_i, m_i, q, KC, VC, BT + b.to(tl.int64) * stride_btb, kvh * stride_ch,
                stride_cb, stride_ct, tl.load(PLEN + b), qk_scale, offs_n, offs_d, d_mask,
                BLOCK_N, PAGE, UPCAST, DOT_PRECISION)
        if USE_TMA:
            k_src = K
            v_src = V
        else:
            k_src = K + seq_start.to(tl.int64) * stride_kt + kvh * stride_kh
            v_src = V + seq_start.to(tl.int64) * stride_vt + kvh * stride_vh
        col = kvh * HEAD_DIM
        acc, l_i, m_i = _attend_new(acc, l_i, m_i, q, k_src, v_src, seq_start, col, stride_kt,
                                    stride_vt, 0, m_start, seq_len, offs_m, qk_scale, offs_n,
                                    offs_d, d_mask, BLOCK_N, BLOCK_D == HEAD_DIM, False, USE_TMA,
                                    UPCAST, DOT_PRECISION)
        acc, l_i, m_i = _attend_new(acc, l_i, m_i, q, k_src, v_src, seq_start, col, stride_kt,
                                    stride_vt, m_start, tl.minimum(m_start + BLOCK_M, seq_len),
                                    seq_len, offs_m, qk_scale, offs_n, offs_d, d_mask, BLOCK_N,
                                    BLOCK_D == HEAD_DIM, True, USE_TMA, UPCAST, DOT_PRECISION)
        o = acc / l_i[:, None]
        tl.store(O + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 o.to(O.dtype.element_ty), mask=row_mask)


def _config(head_dim: int, interpreted: bool) -> dict:
    """Tile and launch shape per head dim, picked from an H100 sweep (docs/benchmarks.md): at
    D=128, 128x64 tiles, 8 warps, 3 stages beat 128x128 and 64x64 by 5-10% at 8k tokens; the
    bulk-copy (TMA) variant measured the same, so pointer loads stay the default. Small tiles in
    the interpreter so that tiny test sequences still span several tiles."""
    if interpreted:
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1)
    if head_dim <= 32:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def _tma_ok(q, k, v) -> bool:
    """The bulk-copy (TMA) path needs Hopper or newer, 16-bit data, a power-of-two head dim, heads
    adjacent within a token (a [T, Hk * D] view) and 16-byte aligned rows."""
    D = q.shape[2]
    return (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9
            and q.dtype in (torch.float16, torch.bfloat16) and D == next_pow2(D)
            and all(t.stride(1) == D and t.stride(0) * 2 % 16 == 0 and t.data_ptr() % 16 == 0
                    for t in (k, v)))


def _kv_descriptor(t: torch.Tensor, block_n: int):
    from triton.tools.tensor_descriptor import TensorDescriptor
    T, H, D = t.shape
    return TensorDescriptor(t, [T, H * D], [t.stride(0), 1], [block_n, D])


def _check(op, q, k, v, cu_seqlens, k_cache, v_cache, block_tables, prefix_lens):
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    T, Hq, D = q.shape
    dev = q.device
    check_tensor(op, "k", k, ndim=3, dtypes=(q.dtype,), device=dev)
    check_shape(op, "k", k, (T, None, D))
    check_tensor(op, "v", v, ndim=3, dtypes=(q.dtype,), device=dev)
    check_shape(op, "v", v, tuple(k.shape))
    if Hq % k.shape[1]:
        raise ValueError(f"{op}: query heads ({Hq}) must be a multiple of KV heads ({k.shape[1]})")
    if D < 16:
        raise ValueError(f"{op}: head_dim must be >= 16 for the tensor-core path, got {D}")
    check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=dev)
    if cu_seqlens.shape[0] < 1:
        raise ValueError(f"{op}: cu_seqlens must hold B+1 >= 1 offsets, got shape {tuple(cu_seqlens.shape)}")
    if prefix_lens is None:
        return
    B = cu_seqlens.shape[0] - 1
    if k_cache is None or v_cache is None or block_tables is None:
        raise ValueError(f"{op}: prefix_lens needs k_cache, v_cache and block_tables")
    check_tensor(op, "prefix_lens", prefix_lens, ndim=1, dtypes=(torch.int32,), device=dev)
    check_shape(op, "prefix_lens", prefix_lens, (B,))
    check_tensor(op, "k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=dev, contiguous=True)
    check_shape(op, "k_cache", k_cache, (None, None, k.shape[1], D))
    check_tensor(op, "v_cache", v_cache, dtypes=(q.dtype,), device=dev, contiguous=True)
    check_shape(op, "v_cache", v_cache, tuple(k_cache.shape))
    check_tensor(op, "block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=dev)
    check_shape(op, "block_tables", block_tables, (B, None))


def _launch(q, k, v, cu_seqlens, scale, k_cache, v_cache, block_tables, prefix_lens, config=None, out=None):
    _check("prefill_attention", q, k, v, cu_seqlens, k_cache, v_cache, block_tables, prefix_lens)
    T, Hq, D = q.shape
    B = cu_seqlens.shape[0] - 1
    interpreted = is_interpreted(_prefill_kernel)
    from kernels import prefill_attention_v2 as v2  # it imports this module's helpers
    if config is None and not interpreted:
        config = v2.default_variant(T, D)
    cfg = dict(_config(D, interpreted), **(config or {}))
    out = output_like("prefill_attention", out, q)
    if T == 0 or B == 0:
        return out
    has_prefix = prefix_lens is not None
    if not has_prefix:  # placeholders: HAS_PREFIX=False prunes every access to them
        k_cache = v_cache = k
        block_tables = prefix_lens = cu_seqlens
    cache_strides = k_cache.stride()[:3] if has_prefix else (0, 0, 0)
    if cfg.get("VARIANT") == "v2" and v2.v2_ok(q, k, v, out, interpreted):
        v2.launch_v2(q, k, v, out, cu_seqlens, scale, k_cache, v_cache, block_tables, prefix_lens,
                   cache_strides, has_prefix, cfg, interpreted)
        return out
    if cfg.get("VARIANT") == "v3" and v2.v2_ok(q, k, v, out, interpreted):
        from kernels.prefill_attention_v3 import launch_v3
        launch_v3(q, k, v, out, cu_seqlens, scale, k_cache, v_cache, block_tables, prefix_lens,
                  cache_strides, has_prefix, cfg, interpreted)
        return out
    use_tma = cfg.get("TMA", False) and _tma_ok(q, k, v)
    k_arg, v_arg = (_kv_descriptor(k, cfg["BLOCK_N"]), _kv_descriptor(v, cfg["BLOCK_N"])) if use_tma else (k, v)
    grid = (Hq, T // cfg["BLOCK_M"] + B)
    _prefill_kernel[grid](
        q, k_arg, v_arg, out, cu_seqlens, k_cache, v_cache, block_tables, prefix_lens, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), *cache_strides, block_tables.stride(0), B,
        GROUP=Hq // k.shape[1], HEAD_DIM=D, BLOCK_D=next_pow2(D), BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], PAGE=k_cache.shape[1] if has_prefix else 1, HAS_PREFIX=has_prefix,
        USE_TMA=use_tma, UPCAST=interpreted, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def prefill_attention(q, k, v, cu_seqlens, scale, k_cache=None, v_cache=None,
                      block_tables=None, prefix_lens=None, impl: str | None = None, out=None):
    """Causal varlen attention with GQA and an optional paged prefix (shapes as in the
    reference). cu_seqlens[-1] must equal q.shape[0]. impl: None (Triton on CUDA, reference on
    CPU), "triton" or "torch". out: an optional [T, Hq, D] tensor (rows may be strided) written
    in place and returned (a mixed batch writes both attentions into one output)."""
    if not use_triton("prefill_attention", impl, _prefill_kernel, q, k, v, cu_seqlens, k_cache,
                      v_cache, block_tables, prefix_lens):
        ref = prefill_attention_ref(q, k, v, cu_seqlens, scale, k_cache, v_cache, block_tables,
                                    prefix_lens)
        return ref if out is None else output_like("prefill_attention", out, q).copy_(ref)
    return _launch(q, k, v, cu_seqlens, scale, k_cache, v_cache, block_tables, prefix_lens, out=out)


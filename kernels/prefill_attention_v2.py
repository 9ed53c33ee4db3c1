"""The v2 prefill attention kernel (issue 18): the v1 kernel's work split and online softmax
(kernels/prefill_attention.py) written the way Triton's tutorial 06 writes fused attention for
Hopper, so that each of its techniques can be measured against v1 and cuDNN
(benchmarks/prefill_sweep.py): Q, K, V loads and O stores through tensor descriptors (TMA, made
on the host or in the kernel), one masked key loop that Hopper's warp specialisation accepts,
and persistent scheduling, longest tiles first.
`prefill_attention._launch` runs it for config VARIANT="v2" (V2_CONFIGS) and, by default, where
DEFAULT_V2_BY_TOKENS says so; otherwise, and for head dims it cannot take, v1 runs.

Hopper warp specialisation (checked with Triton 3.7.1 by compiling for sm_90 without a GPU:
benchmarks/prefill_v2_compile.py; the GPU host's 3.6 may differ) takes only: descriptors made in
the kernel (host ones fail to compile with it), num_warps=4 (8 warps compile without
specialising), one key loop with no loop before it (a diagonal loop after it, the diagonal tiles
unrolled before it, or the while-loop sequence search before it, fail to compile) and no branch
after it (the loop then compiles without specialising). Hence the unrolled search, the single
masked loop, the branch-free store, and no warp specialisation with a cached prefix (its loop
comes first).
"""
from __future__ import annotations

import torch

from kernels._launch import jit, next_pow2, tl
from kernels.prefill_attention import LOG2E, _attend_prefix, _softmax_step


@jit
def _find_sequence_unrolled(CU, tile, num_seqs, BLOCK_M: tl.constexpr, STEPS: tl.constexpr):
    """_find_sequence in STEPS >= log2(num_seqs + 1) unrolled steps: no loop before the key loop,
    which Hopper's warp specialisation pass does not accept."""
    lo = tile * 0
    hi = lo + num_seqs
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        owns = tl.load(CU + mid) // BLOCK_M + mid <= tile
        lo = tl.where(active & owns, mid + 1, lo)
        hi = tl.where(active & (owns == 0), mid, hi)
    return lo - 1


@jit
def _attend_new_tma(acc, l_i, m_i, q, K, V, row0, col, lo, hi, offs_m, qk_scale, offs_n,
                    BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, WS: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """v2 stages 2 and 3 through tensor descriptors K, V of [T, Hk * D] read at (row0 + n, col).
    Rows past T read as zeros; rows of the next sequence only reach masked scores (diagonal) or
    rows that are never stored. WS: Triton's warp specialisation of the loop (producer warps
    issue the bulk copies, consumer warps the MMAs and softmax)."""
    for n0 in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        n0 = tl.multiple_of(n0, BLOCK_N)
        k = K.load([row0 + n0, col])
        v = V.load([row0 + n0, col])
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v, qk_scale,
                                      offs_m[:, None] >= (n0 + offs_n)[None, :], DIAGONAL,
                                      DOT_PRECISION)
    return acc, l_i, m_i


@jit
def _prefill_tile_v2(w, QD, KD, VD, OD, O, CU, KC, VC, BT, PLEN, qk_scale, stride_ot, stride_oh,
                     stride_cb, stride_ct, stride_ch, stride_btb, num_seqs, num_heads,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HAS_PREFIX: tl.constexpr,
                     WS: tl.constexpr, SINGLE_LOOP: tl.constexpr,
                     SEARCH_STEPS: tl.constexpr, DEVICE_DESC: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """One work item w = virtual tile * num_heads + q head of the v2 kernel."""
    tile = w // num_heads
    h = w % num_heads
    b = _find_sequence_unrolled(CU, tile, num_seqs, BLOCK_M, SEARCH_STEPS)
    seq_start = tl.load(CU + b)
    seq_len = tl.load(CU + b + 1) - seq_start
    num_tiles = tl.cdiv(seq_len, BLOCK_M)
    local = tile - (seq_start // BLOCK_M + b)
    if local < num_tiles:
        m_start = (num_tiles - 1 - local) * BLOCK_M  # longest tiles first
        kvh = h // GROUP
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = QD.load([seq_start + m_start, h * HEAD_DIM])
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if HAS_PREFIX:
            acc, l_i, m_i = _attend_prefix(
                acc, l_i, m_i, q, KC, VC, BT + b.to(tl.int64) * stride_btb, kvh * stride_ch,
                stride_cb, stride_ct, tl.load(PLEN + b), qk_scale, offs_n, offs_d,
                offs_d < HEAD_DIM, BLOCK_N, PAGE, UPCAST, DOT_PRECISION)
        col = kvh * HEAD_DIM
        if SINGLE_LOOP:
            # one loop over every visible key tile, the causal mask on each (keys past the
            # sequence's end are right of every valid row, so the mask covers them too)
            acc, l_i, m_i = _attend_new_tma(acc, l_i, m_i, q, KD, VD, seq_start, col, 0,
                                            tl.minimum(m_start + BLOCK_M, seq_len), offs_m,
                                            qk_scale, offs_n, BLOCK_N, True, WS, UPCAST,
                                            DOT_PRECISION)
        else:
            acc, l_i, m_i = _attend_new_tma(acc, l_i, m_i, q, KD, VD, seq_start, col, 0, m_start,
                                            offs_m, qk_scale, offs_n, BLOCK_N, False, WS, UPCAST,
                                            DOT_PRECISION)
            acc, l_i, m_i = _attend_new_tma(acc, l_i, m_i, q, KD, VD, seq_start, col, m_start,
                                            tl.minimum(m_start + BLOCK_M, seq_len), offs_m,
                                            qk_scale, offs_n, BLOCK_N, True, False, UPCAST,
                                            DOT_PRECISION)
        o = (acc / l_i[:, None]).to(O.dtype.element_ty)
        # Rows past the sequence's end belong to the next one and must not be written. Hopper's
        # warp specialisation takes no branch after the loop, so with it the store is one
        # masked pointer store, or (DEVICE_DESC) a bulk store through a descriptor whose rows
        # end with this sequence; otherwise full tiles go through OD, the last one by pointer.
        if DEVICE_DESC:
            od = tl.make_tensor_descriptor(O, shape=[seq_start + seq_len, num_heads * HEAD_DIM],
                                           strides=[stride_ot, 1], block_shape=[BLOCK_M, HEAD_DIM])
            od.store([seq_start + m_start, h * HEAD_DIM], o)
        elif WS:
            tok = (seq_start + offs_m).to(tl.int64)
            tl.store(O + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :], o,
                     mask=(offs_m < seq_len)[:, None])
        elif m_start + BLOCK_M <= seq_len:
            OD.store([seq_start + m_start, h * HEAD_DIM], o)
        else:
            tok = (seq_start + offs_m).to(tl.int64)
            tl.store(O + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :], o,
                     mask=(offs_m < seq_len)[:, None])


@jit(do_not_specialize=['num_seqs', 'stride_btb', 'total_work', 'num_tokens'])
def _prefill_kernel_v2(QD, KD, VD, OD, O, CU, KC, VC, BT, PLEN, qk_scale, stride_qt, stride_kt,
                       stride_vt, stride_ot, stride_oh, stride_cb, stride_ct, stride_ch, stride_btb,
                       num_seqs, num_heads, num_kv_heads, total_work, num_tokens,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HAS_PREFIX: tl.constexpr,
                       WS: tl.constexpr, SINGLE_LOOP: tl.constexpr,
                       PERSISTENT: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                       DEVICE_DESC: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The v2 (tutorial-06-style Hopper) kernel: Q, K, V loads and full-tile O stores through
    tensor descriptors (TMA), made on the host or (DEVICE_DESC: QD..OD are the base pointers)
    in the kernel, which Hopper's warp specialisation needs; the keys in one masked loop
    (SINGLE_LOOP) or an unmasked then a masked diagonal loop; the key loop warp-specialised
    (WS; single loop only), and persistent
    scheduling: a grid of about one program per SM walking the work items in order, longest
    tiles first. See V2_CONFIGS."""
    if DEVICE_DESC:
        QD = tl.make_tensor_descriptor(QD, shape=[num_tokens, num_heads * HEAD_DIM],
                                       strides=[stride_qt, 1], block_shape=[BLOCK_M, HEAD_DIM])
        KD = tl.make_tensor_descriptor(KD, shape=[num_tokens, num_kv_heads * HEAD_DIM],
                                       strides=[stride_kt, 1], block_shape=[BLOCK_N, HEAD_DIM])
        VD = tl.make_tensor_descriptor(VD, shape=[num_tokens, num_kv_heads * HEAD_DIM],
                                       strides=[stride_vt, 1], block_shape=[BLOCK_N, HEAD_DIM])
        OD = tl.make_tensor_descriptor(OD, shape=[num_tokens, num_heads * HEAD_DIM],
                                       strides=[stride_ot, 1], block_shape=[BLOCK_M, HEAD_DIM])
    if PERSISTENT:
        for w in range(tl.program_id(0), total_work, tl.num_programs(0)):
            _prefill_tile_v2(w, QD, KD, VD, OD, O, CU, KC, VC, BT, PLEN, qk_scale, stride_ot,
                             stride_oh, stride_cb, stride_ct, stride_ch, stride_btb, num_seqs,
                             num_heads, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, PAGE, HAS_PREFIX, WS,
                             SINGLE_LOOP, SEARCH_STEPS, DEVICE_DESC, UPCAST, DOT_PRECISION)
    else:
        _prefill_tile_v2(tl.program_id(0), QD, KD, VD, OD, O, CU, KC, VC, BT, PLEN, qk_scale,
                         stride_ot, stride_oh, stride_cb, stride_ct, stride_ch, stride_btb,
                         num_seqs, num_heads, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, PAGE, HAS_PREFIX,
                         WS, SINGLE_LOOP, SEARCH_STEPS, DEVICE_DESC, UPCAST, DOT_PRECISION)


def _v2(bm, bn, w, st, **kw) -> dict:
    return dict(VARIANT="v2", BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, **kw)


# The v2 variants measured by benchmarks/prefill_sweep.py on the GPU (head dim 128), beside the
# v1 kernel. host / dev: tensor descriptors made on the host (TensorDescriptor) or in the kernel
# (tl.make_tensor_descriptor, which Hopper's warp specialisation needs); single: one key loop
# with the causal mask on every tile instead of an unmasked loop then a masked diagonal one;
# ws: that loop warp-specialised (sm_90: a 4-warp producer issuing the bulk copies and two
# 4-warp consumer warpgroups of 64 rows each, registers moved to them with setmaxnreg); persist: one
# program per SM walking the work items, longest tiles first. Tiles: v1's best (128x64, 8 warps,
# 3 stages) for the v1-shaped loops, the tutorial's Hopper ones (128x128 at 2 stages, the most
# that fits shared memory with warp specialisation; 128x64 at 3-4) for the single loop.
V2_CONFIGS = {
    "v2-host-128x64-w8-s3": _v2(128, 64, 8, 3),
    "v2-host-128x128-w8-s2": _v2(128, 128, 8, 2),
    "v2-dev-128x64-w8-s3": _v2(128, 64, 8, 3, DEVICE_DESC=True),
    "v2-persist-128x64-w8-s3": _v2(128, 64, 8, 3, PERSISTENT=True),
    "v2-single-dev-128x128-w4-s2": _v2(128, 128, 4, 2, DEVICE_DESC=True, SINGLE_LOOP=True),
    "v2-ws-single-dev-128x128-w4-s2": _v2(128, 128, 4, 2, DEVICE_DESC=True, SINGLE_LOOP=True, WS=True),
    "v2-ws-single-dev-persist-128x128-w4-s2": _v2(128, 128, 4, 2, DEVICE_DESC=True, SINGLE_LOOP=True,
                                                  WS=True, PERSISTENT=True),
}
# Not offered: warp-specialised 128x64 tiles (3 or 4 stages, persistent or not) compile on the
# H200's Triton 3.6 but write inf/NaN (2026-12-02 15:02 UTC run, docs/benchmarks.md).
# Removed after that run: a software-pipelined off-diagonal loop (FlashAttention-3's next-tile
# scores before the current softmax): Triton waits on the scores' MMA at once, so nothing
# overlapped, and it measured 0.77-0.81x cuDNN against v1's 0.87-0.91x.


# Per head dim, (minimum total tokens, config name or None for v1) rules in increasing order,
# the last match wins: which kernel replaces the v1 kernel by default. A name is a V2_CONFIGS or
# a V3_CONFIGS (kernels/prefill_attention_v3.py) entry. From the H200 sweep of 2026-12-03 06:12
# UTC (benchmarks/prefill_v3_sweep.py, one sequence, 32 q / 8 kv heads, docs/benchmarks.md,
# "Prefill attention v3"): v3 with 64x64 tiles and two programs per SM is 1.04-1.05x cuDNN at
# 2k tokens; v3 with 128x128 tiles is 0.96-1.00x cuDNN at 4k-16k (the earlier default, v2 with
# 128x64 tiles, 0.89-0.94x in the same run). Shorter prefills were not measured and keep v1.
DEFAULT_V2_BY_TOKENS: dict[int, list[tuple[int, str | None]]] = {
    128: [(2048, "v3-64x64-w4-s3"), (4096, "v3-128x128-w8-s3")]}


def named_config(name: str) -> dict:
    """A V2_CONFIGS or V3_CONFIGS entry by name."""
    if name in V2_CONFIGS:
        return V2_CONFIGS[name]
    from kernels.prefill_attention_v3 import V3_CONFIGS  # it imports this module
    return V3_CONFIGS[name]


def default_variant(num_tokens: int, head_dim: int) -> dict | None:
    name = None
    for min_tokens, cfg_name in DEFAULT_V2_BY_TOKENS.get(head_dim, []):
        if num_tokens >= min_tokens:
            name = cfg_name
    return named_config(name) if name else None


def v2_ok(q, k, v, out, interpreted: bool) -> bool:
    """The v2 kernel reads Q, K, V and writes O through tensor descriptors: a power-of-two head
    dim, heads adjacent within a token, 16-byte aligned rows; compiled, Hopper or newer and
    16-bit data (the interpreter runs it on CPU in any float dtype)."""
    D = q.shape[2]
    if D != next_pow2(D):
        return False
    if not interpreted and not (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9
                                and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    return all(t.stride(2) == 1 and t.stride(1) == D and t.stride(0) * t.element_size() % 16 == 0
               and t.data_ptr() % 16 == 0 for t in (q, k, v, out))


def _descriptor(t: torch.Tensor, rows: int):
    """A [T, H * D] view of a [T, H, D] tensor read in [rows, D] blocks."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    T, H, D = t.shape
    return TensorDescriptor(t, [T, H * D], [t.stride(0), 1], [rows, D])


def _scratch(size: int, align: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def _ensure_allocator() -> None:
    """Descriptors made in a kernel (tl.make_tensor_descriptor) need a global-memory scratch
    from the allocator Triton is given; torch's caching allocator serves it (CUDA graphs too).
    Triton keeps the allocator in a context variable, i.e. per thread, so it is set on every
    launch (a context-variable write) rather than once."""
    import triton
    triton.set_allocator(_scratch)


def _num_sms(dev) -> int:
    if dev.type != "cuda":
        return 3  # the interpreter: a few programs, so each walks several work items
    return torch.cuda.get_device_properties(dev).multi_processor_count


def _search_steps(num_seqs: int) -> int:
    """The unrolled search's steps, a constexpr: one value for every batch below 256 sequences.
    Steps past log2(num_seqs + 1) are no-ops; one value per batch size made Triton compile a
    kernel for each new batch size in a serving run (0.3 s a prefill batch at 48 req/s on the
    H200, 15:35 UTC)."""
    return 8 if num_seqs < 256 else num_seqs.bit_length()


def launch_v2(q, k, v, out, cu_seqlens, scale, k_cache, v_cache, block_tables, prefix_lens,
               cache_strides, has_prefix, cfg, interpreted):
    T, Hq, D = q.shape
    B = cu_seqlens.shape[0] - 1
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    total = (T // bm + B) * Hq
    persistent = bool(cfg.get("PERSISTENT", False))
    grid = (min(total, _num_sms(q.device) * cfg.get("PROGRAMS_PER_SM", 1)) if persistent else total,)
    device_desc = bool(cfg.get("DEVICE_DESC", False))
    if device_desc:
        _ensure_allocator()
        descs = (q, k, v, out)
    else:
        descs = (_descriptor(q, bm), _descriptor(k, bn), _descriptor(v, bn), _descriptor(out, bm))
    # Hopper's warp specialisation takes one key loop with no loop before it: with a cached
    # prefix (its own loop first) the variant runs without it.
    ws = bool(cfg.get("WS", False)) and not has_prefix
    _prefill_kernel_v2[grid](
        *descs, out, cu_seqlens, k_cache, v_cache, block_tables, prefix_lens, scale * LOG2E,
        q.stride(0), k.stride(0), v.stride(0), out.stride(0), out.stride(1), *cache_strides,
        block_tables.stride(0), B, Hq, k.shape[1], total, T,
        GROUP=Hq // k.shape[1], HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn,
        PAGE=k_cache.shape[1] if has_prefix else 1, HAS_PREFIX=has_prefix,
        WS=ws, SINGLE_LOOP=bool(cfg.get("SINGLE_LOOP")),
        PERSISTENT=persistent, SEARCH_STEPS=_search_steps(B), DEVICE_DESC=device_desc,
        UPCAST=interpreted, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


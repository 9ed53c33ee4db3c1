"""The v3 prefill attention kernel (issue 18): v2's default loop (kernels/prefill_attention_v2.py:
host-made tensor descriptors, an unmasked off-diagonal key loop then a masked diagonal loop,
longest tiles launched first) with two changes to measure against cuDNN
(benchmarks/prefill_v3_sweep.py):

* Several programs per SM. Compiled for sm_90 (Triton 3.6.0, the GPU host's; see
  benchmarks/prefill_v3_compile.py), v2's default 128x64 8-warp program runs one per SM
  (132 KB of shared memory, 141 registers) and its key loop holds four CTA-wide barriers (the
  bulk-copy issue), so its two warpgroups run their MMAs and their softmax in lockstep and the
  tensor cores idle during every softmax. Two independent programs per SM can overlap one's
  softmax with the other's MMAs (what FA3's ping-pong schedule does by hand): shapes whose shared
  memory and registers allow two per SM, where needed with a register cap (`maxnreg`, passed to
  the launch; ptxas then keeps 128 registers with an 8-byte spill; not applied with a cached
  prefix, whose loop would spill 416 bytes).
* FA4-style conditional rescaling (LAZY_TAU > 0): a row's running max m_i only moves when the
  tile's max exceeds it by more than LAZY_TAU (log2 units), and the [BLOCK_M, D] accumulator is
  rescaled only when some row of the program moved. Exact either way: acc, l_i and the
  probabilities always refer to the same m_i, and p <= 2**LAZY_TAU keeps fp32 sums and bf16
  probabilities far from overflow. It saves the accumulator multiply (64 of the loop's ~210
  FP32 instructions per thread at 128x64, 8 warps) at the cost of one CTA-wide reduction.

Unchanged from v2 (checked in its source and SASS): exp2 with log2(e) folded into qk_scale (one
FFMA per score, `ex2.approx.ftz`), only the diagonal tiles masked and processed last, longest
tiles first with the heads of one tile adjacent (KV reuse in L2).

`prefill_attention_v3` runs it directly (falling back to v1 where tensor descriptors cannot be
used); `launch_v3` takes prefill_attention._launch's arguments, so a config with VARIANT="v3"
can be routed there the way VARIANT="v2" is routed to launch_v2.
"""
from __future__ import annotations

import torch

from kernels._launch import jit, output_like, tl
from kernels.prefill_attention import LOG2E, _attend_prefix
from kernels.prefill_attention_v2 import _descriptor, _find_sequence_unrolled, _search_steps, v2_ok


@jit
def _softmax_step_v3(acc, l_i, m_i, qk, v, qk_scale, mask, MASKED: tl.constexpr,
                     LAZY_TAU: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax update with raw scores qk [M, N] and values v [N, D]. LAZY_TAU > 0:
    m_i moves only for rows whose max grew by more than LAZY_TAU, and acc is rescaled only when
    some row moved (a program-wide branch)."""
    if MASKED:
        qk = tl.where(mask, qk * qk_scale, float("-inf"))
        m_cand = tl.maximum(m_i, tl.max(qk, 1))
    else:
        m_cand = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if LAZY_TAU > 0:
        grow = m_cand > m_i + LAZY_TAU  # always true for a row's first scores (m_i = -inf)
        m_new = tl.where(grow, m_cand, m_i)
    else:
        m_new = m_cand
    if MASKED:
        qk = qk - m_new[:, None]
    else:
        qk = qk * qk_scale - m_new[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_new)
    if LAZY_TAU > 0:
        if tl.max(grow.to(tl.int32), 0) > 0:
            acc = acc * alpha[:, None]
    else:
        acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, l_i, m_new


@jit
def _attend_new_v3(acc, l_i, m_i, q, K, V, row0, col, lo, hi, offs_m, qk_scale, offs_n,
                   BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, LAZY_TAU: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """New keys [lo, hi) through tensor descriptors K, V of [T, Hk * D] read at (row0 + n, col).
    Rows past T read as zeros; rows of the next sequence only reach masked scores (diagonal) or
    query rows that are never stored."""
    for n0 in range(lo, hi, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        k = K.load([row0 + n0, col])
        v = V.load([row0 + n0, col])
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        acc, l_i, m_i = _softmax_step_v3(acc, l_i, m_i, qk, v, qk_scale,
                                         offs_m[:, None] >= (n0 + offs_n)[None, :], DIAGONAL,
                                         LAZY_TAU, DOT_PRECISION)
    return acc, l_i, m_i


@jit(do_not_specialize=['num_seqs', 'stride_btb'])
def _prefill_kernel_v3(QD, KD, VD, OD, O, CU, KC, VC, BT, PLEN, qk_scale, stride_ot, stride_oh,
                       stride_cb, stride_ct, stride_ch, stride_btb, num_seqs, num_heads,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HAS_PREFIX: tl.constexpr,
                       LAZY_TAU: tl.constexpr, SEARCH_STEPS: tl.constexpr, UPCAST: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Program w = virtual tile * num_heads + q head: the heads of one tile are adjacent and the
    tiles with the most keys come first (v2's order)."""
    w = tl.program_id(0)
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
        # keys left of the tile: every one visible, no mask
        acc, l_i, m_i = _attend_new_v3(acc, l_i, m_i, q, KD, VD, seq_start, col, 0, m_start,
                                       offs_m, qk_scale, offs_n, BLOCK_N, False, LAZY_TAU, UPCAST,
                                       DOT_PRECISION)
        # the diagonal tiles last, masked (always rescaled: one or two iterations)
        acc, l_i, m_i = _attend_new_v3(acc, l_i, m_i, q, KD, VD, seq_start, col, m_start,
                                       tl.minimum(m_start + BLOCK_M, seq_len), offs_m, qk_scale,
                                       offs_n, BLOCK_N, True, 0.0, UPCAST, DOT_PRECISION)
        o = (acc / l_i[:, None]).to(O.dtype.element_ty)
        # rows past the sequence's end belong to the next one: full tiles through OD, the last
        # one by a masked pointer store
        if m_start + BLOCK_M <= seq_len:
            OD.store([seq_start + m_start, h * HEAD_DIM], o)
        else:
            tok = (seq_start + offs_m).to(tl.int64)
            tl.store(O + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :], o,
                     mask=(offs_m < seq_len)[:, None])


def _v3(bm, bn, w, st, maxnreg=None, lazy=0.0) -> dict:
    cfg = dict(VARIANT="v3", BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, LAZY_TAU=lazy)
    if maxnreg:
        cfg["maxnreg"] = maxnreg
    return cfg


# The v3 variants benchmarks/prefill_v3_sweep.py measures (head dim 128). "2/SM": shared memory
# and registers allow two programs per SM (sm_90 compile, Triton 3.6.0: smem bytes, registers,
# spill bytes); "lazy": conditional rescaling with LAZY_TAU = 8 (a factor of 256).
V3_CONFIGS = {
    # v2's default, as a v3 build (parity with v2 in the same run)
    "v3-128x64-w8-s3": _v3(128, 64, 8, 3),                          # 132096 B, 141 regs, 1/SM
    "v3-lazy-128x64-w8-s3": _v3(128, 64, 8, 3, lazy=8.0),
    # two 8-warp programs per SM: 2 stages (98 KB) and a 128-register cap (8-byte spill)
    "v3-128x64-w8-s2-r128": _v3(128, 64, 8, 2, maxnreg=128),
    "v3-lazy-128x64-w8-s2-r128": _v3(128, 64, 8, 2, maxnreg=128, lazy=8.0),  # no spill
    "v3-128x64-w8-s2": _v3(128, 64, 8, 2),          # control: 2 stages, 143 regs, 1/SM
    # two 4-warp programs per SM (one warpgroup each, nothing shared between them)
    "v3-128x32-w4-s3": _v3(128, 32, 4, 3),                          # 81944 B, 232 regs, 2/SM
    "v3-lazy-128x32-w4-s3": _v3(128, 32, 4, 3, lazy=8.0),
    "v3-64x64-w4-s3": _v3(64, 64, 4, 3),                            # 115712 B, 138 regs, 2/SM
    "v3-lazy-64x64-w4-s3": _v3(64, 64, 4, 3, lazy=8.0),
    "v3-64x64-w4-s2": _v3(64, 64, 4, 2),                            # 82944 B, 138 regs, 2/SM
    "v3-128x32-w4-s4": _v3(128, 32, 4, 4),                          # 2/SM
    # larger tiles, one program per SM (fewer K/V bytes per FLOP)
    "v3-128x128-w8-s3": _v3(128, 128, 8, 3),                        # 230400 B, 187 regs
    "v3-256x64-w16-s2": _v3(256, 64, 16, 2),                        # 131088 B, 128 regs
}


def v3_ok(q, k, v, out, interpreted: bool) -> bool:
    """The same layout needs as v2 (tensor descriptors): see prefill_attention_v2.v2_ok."""
    return v2_ok(q, k, v, out, interpreted)


def launch_v3(q, k, v, out, cu_seqlens, scale, k_cache, v_cache, block_tables, prefix_lens,
              cache_strides, has_prefix, cfg, interpreted):
    """prefill_attention._launch's call of launch_v2, for the v3 kernel (cfg from V3_CONFIGS)."""
    T, Hq, D = q.shape
    B = cu_seqlens.shape[0] - 1
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = ((T // bm + B) * Hq,)
    extra = {}
    # the register cap only without a cached prefix: the prefix loop's pointer gathers then
    # spill 416 bytes at 128 registers (sm_90 compile), and even uncapped v2 takes 255 there
    if cfg.get("maxnreg") and not interpreted and not has_prefix:
        extra["maxnreg"] = cfg["maxnreg"]
    _prefill_kernel_v3[grid](
        _descriptor(q, bm), _descriptor(k, bn), _descriptor(v, bn), _descriptor(out, bm), out,
        cu_seqlens, k_cache, v_cache, block_tables, prefix_lens, scale * LOG2E,
        out.stride(0), out.stride(1), *cache_strides, block_tables.stride(0), B, Hq,
        GROUP=Hq // k.shape[1], HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn,
        PAGE=k_cache.shape[1] if has_prefix else 1, HAS_PREFIX=has_prefix,
        LAZY_TAU=float(cfg.get("LAZY_TAU", 0.0)), SEARCH_STEPS=_search_steps(B),
        UPCAST=interpreted, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)


def prefill_attention_v3(q, k, v, cu_seqlens, scale, k_cache=None, v_cache=None,
                         block_tables=None, prefix_lens=None, config: dict | str | None = None,
                         out=None) -> torch.Tensor:
    """prefill_attention (same arguments and result) through the v3 kernel with `config` (a
    V3_CONFIGS name or dict; default "v3-128x64-w8-s3"); where tensor descriptors cannot be
    used (odd head dim, pre-Hopper GPU, 8-bit or misaligned data) the v1 kernel runs."""
    from kernels import prefill_attention as mod
    from kernels._launch import is_interpreted
    if isinstance(config, str) or config is None:
        config = V3_CONFIGS[config or "v3-128x64-w8-s3"]
    out = output_like("prefill_attention", out, q)
    if not v3_ok(q, k, v, out, is_interpreted(_prefill_kernel_v3)):
        config = {}         # v1 with its own tiles
    # prefill_attention._launch checks the arguments and routes VARIANT "v3" to launch_v3.
    return mod._launch(q, k, v, cu_seqlens, scale, k_cache, v_cache, block_tables, prefix_lens,
                       config=config, out=out)

"""The decode step's GEMV with its neighbours folded in (issue 18): y = norm?(x) @ w.T, then an
epilogue, in one launch.

At batch 1-8 a decode step streams ~15 GB of weights through 4 matmuls per layer; between them
sat 7 small kernels per layer (RMSNorm twice, RoPE, KV write, SiLU-and-mul, attention split and
reduce) costing ~0.5 ms of a ~4.5 ms step on an H200, plus the ramp-up and tail of every
launch. This kernel takes the small ones into the matmuls:

  prologue  PRO_NORM: x is the residual stream; its RMSNorm (HF numerics: normalise in fp32,
            round, multiply by the weight, round) is applied tile by tile as x is loaded, from
            the per-row sum of squares `ssq` that the kernel which last wrote the residual
            accumulated in its epilogue, so no extra pass over x is needed.
  epilogue  EPI_STORE: y. EPI_RESIDUAL: res += y in place (rounded as HF's add), and the new
            rows' sums of squares are added into `ssq_out` for the next norm. EPI_ROPE_KV
            (after the qkv projection): RoPE on q and k, k and v scattered into the paged KV
            cache at `slots`, the whole qkv row stored. EPI_SILU (after gate_up):
            silu(gate) * up, the only thing the down projection reads.

Each program owns two tiles of HB output rows of w, OFF apart: OFF = HB for a plain GEMV,
head_dim / 2 for RoPE (so a program holds both halves it rotates) and the intermediate size for
SiLU (gate and its up). Optional split-K: SPLIT_K programs share a tile's K range, add their
fp32 partials into a workspace with atomics, and the last to arrive (a per-tile counter) reads
the sum back (zeroing it, so the workspace is clean for the next launch) and runs the epilogue.

Optional programmatic dependent launch (PDL, Hopper): the kernel lets its successor launch at
once and waits for its predecessor (`griddepcontrol.wait`) only before it reads activations;
with PREFETCH it first asks L2 for the start of its weight rows, which do not depend on the
predecessor, so the next matmul's weights stream while the previous kernel drains.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._launch import (FLOAT_DTYPES, INDEX_DTYPES, check_shape, check_tensor, gdc_launch_dependents, gdc_wait,
                             is_interpreted, jit, tl, use_triton)

PRO_NONE, PRO_NORM = 0, 1
EPI_STORE, EPI_RESIDUAL, EPI_ROPE_KV, EPI_SILU = 0, 1, 2, 3
MAX_ROWS = 16                   # one tensor-core tile of rows
# (HB, BLOCK_K, num_warps, num_stages, SPLIT_K)
DEFAULT_CONFIG = (16, 256, 4, 4, 1)
pdl_available = gdc_wait is not None


def fused_gemv_ref(x, w, bias=None, *, norm=None, residual=None, rope_kv=None, silu=False):
    """The unfused computation, with the same arguments as fused_gemv (see there)."""
    from kernels.kv_cache_write import write_kv_cache_ref
    from kernels.rope import apply_rope_ref
    from kernels.silu_and_mul import silu_and_mul_ref
    if norm is not None:
        ssq, g, eps = norm
        xf = x.float() * torch.rsqrt(ssq.float() / x.shape[-1] + eps)[:, None]
        x = g * xf.to(x.dtype)
    y = F.linear(x, w, bias)
    if residual is not None:
        res, ssq_out = residual
        res.copy_(y + res)
        ssq_out += res.float().pow(2).sum(-1)
        return res
    if rope_kv is not None:
        positions, cos_sin, k_cache, v_cache, slots, hq, hk = rope_kv
        d = cos_sin.shape[1]
        q, k, v = y.split([hq * d, hk * d, hk * d], dim=-1)
        q, k, v = q.view(-1, hq, d), k.view(-1, hk, d), v.view(-1, hk, d)
        apply_rope_ref(q, k, positions, cos_sin)
        write_kv_cache_ref(k, v, k_cache, v_cache, slots)
        return y
    if silu:
        return silu_and_mul_ref(y)
    return y


@jit
def _epilogue(acc1, acc2, base, cols, rm, m_mask, BIAS, OUT, stride_o, RES, stride_r, SSQ_OUT,
              POS, CS, stride_cs, KC, VC, SLOTS, slot_stride, q_size, kv_size,
              OFF: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
              HEAD_DIM: tl.constexpr):
    dt = OUT.dtype.element_ty
    mask = m_mask[:, None] & (cols >= 0)[None, :]        # [BLOCK_M, HB]
    if HAS_BIAS:
        acc1 += tl.load(BIAS + cols).to(tl.float32)[None, :]
        acc2 += tl.load(BIAS + OFF + cols).to(tl.float32)[None, :]
    # The unfused path rounds the matmul's output to the activation dtype before anything else.
    y1 = acc1.to(dt).to(tl.float32)
    y2 = acc2.to(dt).to(tl.float32)
    if EPILOGUE == 0:
        o_ptr = OUT + rm[:, None] * stride_o + cols[None, :]
        tl.store(o_ptr, y1.to(dt), mask=mask)
        tl.store(o_ptr + OFF, y2.to(dt), mask=mask)
    elif EPILOGUE == 1:
        r_ptr = RES + rm[:, None] * stride_r + cols[None, :]
        r1 = (y1 + tl.load(r_ptr, mask=mask, other=0.0).to(tl.float32)).to(dt)
        r2 = (y2 + tl.load(r_ptr + OFF, mask=mask, other=0.0).to(tl.float32)).to(dt)
        tl.store(r_ptr, r1, mask=mask)
        tl.store(r_ptr + OFF, r2, mask=mask)
        f1 = r1.to(tl.float32)
        f2 = r2.to(tl.float32)
        tl.atomic_add(SSQ_OUT + rm, tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1), mask=m_mask)
    elif EPILOGUE == 2:
        j = cols % HEAD_DIM                                 # in [0, HEAD_DIM / 2)
        o1 = y1
        o2 = y2
        if base < q_size + kv_size:                         # q or k: rotate-half RoPE
            pos = tl.load(POS + rm, mask=m_mask, other=0).to(tl.int64)
            cs = CS + pos[:, None] * stride_cs + j[None, :]
            cos = tl.load(cs, mask=mask, other=0.0).to(tl.float32)
            sin = tl.load(cs + OFF, mask=mask, other=0.0).to(tl.float32)
            o1 = y1 * cos - y2 * sin
            o2 = y2 * cos + y1 * sin
        o_ptr = OUT + rm[:, None] * stride_o + cols[None, :]
        tl.store(o_ptr, o1.to(dt), mask=mask)
        tl.store(o_ptr + OFF, o2.to(dt), mask=mask)
        if base >= q_size:                                  # k or v: into the paged cache
            slot = tl.load(SLOTS + rm, mask=m_mask, other=-1).to(tl.int64)
            smask = mask & (slot >= 0)[:, None]
            if base < q_size + kv_size:
                kvh = (base - q_size) // HEAD_DIM
                dst = KC + slot[:, None] * slot_stride + kvh * HEAD_DIM + j[None, :]
                tl.store(dst, o1.to(KC.dtype.element_ty), mask=smask)
                tl.store(dst + OFF, o2.to(KC.dtype.element_ty), mask=smask)
            else:
                kvh = (base - q_size - kv_size) // HEAD_DIM
                dst = VC + slot[:, None] * slot_stride + kvh * HEAD_DIM + j[None, :]
                tl.store(dst, o1.to(VC.dtype.element_ty), mask=smask)
                tl.store(dst + OFF, o2.to(VC.dtype.element_ty), mask=smask)
    else:
        # silu(gate) * up in fp32, rounded once (kernels/silu_and_mul.py); OUT is [M, OFF]
        act = y1 / (1.0 + tl.exp(-y1)) * y2
        tl.store(OUT + rm[:, None] * stride_o + cols[None, :], act.to(dt), mask=mask)


@jit(do_not_specialize=["M"])     # one compiled variant for every batch size
def _fused_gemv_kernel(X, W, BIAS, OUT, M, N, K, stride_x, stride_o,
                       SSQ_IN, NORM_W, eps, RES, stride_r, SSQ_OUT,
                       POS, CS, stride_cs, KC, VC, SLOTS, slot_stride, q_size, kv_size,
                       WS, CNT,
                       OFF: tl.constexpr, HB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, PROLOGUE: tl.constexpr,
                       EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HEAD_DIM: tl.constexpr,
                       USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, UPCAST: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    GROUP: tl.constexpr = OFF // HB
    base = (pid // GROUP) * (2 * OFF) + (pid % GROUP) * HB
    cols = base + tl.arange(0, HB)
    rm = tl.arange(0, BLOCK_M)
    m_mask = rm < M
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w1_ptr = W + cols[:, None].to(tl.int64) * K
    w2_ptr = w1_ptr + OFF * K
    if USE_PDL:
        gdc_launch_dependents()
        if PREFETCH > 0:
            # One L2 prefetch per 128-byte line of the first PREFETCH columns of both tiles: the
            # weights do not depend on the kernel still running before this one.
            lines = tl.minimum(k_start + tl.arange(0, PREFETCH // 64) * 64, K - 1)     # inside the row
            p1 = w1_ptr + lines[None, :]
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [p1], dtype=tl.int32,
                                      is_pure=False, pack=1)
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [p1 + OFF * K],
                                      dtype=tl.int32, is_pure=False, pack=1)
        gdc_wait()
    if PROLOGUE == 1:
        inv = tl.rsqrt(tl.load(SSQ_IN + rm, mask=m_mask, other=0.0) / K + eps)
    acc1 = tl.zeros([BLOCK_M, HB], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, HB], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w1 = tl.load(w1_ptr + rk[None, :])
            w2 = tl.load(w2_ptr + rk[None, :])
            x = tl.load(X + rm[:, None] * stride_x + rk[None, :], mask=m_mask[:, None], other=0.0)
        else:
            k_mask = rk < k_end
            w1 = tl.load(w1_ptr + rk[None, :], mask=k_mask[None, :], other=0.0)
            w2 = tl.load(w2_ptr + rk[None, :], mask=k_mask[None, :], other=0.0)
            x = tl.load(X + rm[:, None] * stride_x + rk[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)
        if PROLOGUE == 1:
            # HF RMSNorm: normalise in fp32, round to the activation dtype, times the weight, round.
            g = tl.load(NORM_W + rk, mask=rk < K, other=0.0).to(tl.float32)
            xn = (x.to(tl.float32) * inv[:, None]).to(X.dtype.element_ty).to(tl.float32)
            x = (xn * g[None, :]).to(X.dtype.element_ty)
        if UPCAST:      # the interpreter's bf16/fp16 dot is unreliable: fp32 there
            w1 = w1.to(tl.float32)
            w2 = w2.to(tl.float32)
            x = x.to(tl.float32)
        acc1 = tl.dot(x, tl.trans(w1), acc1, input_precision=DOT_PRECISION)
        acc2 = tl.dot(x, tl.trans(w2), acc2, input_precision=DOT_PRECISION)
    if SPLIT_K == 1:
        _epilogue(acc1, acc2, base, cols, rm, m_mask, BIAS, OUT, stride_o, RES, stride_r, SSQ_OUT,
                  POS, CS, stride_cs, KC, VC, SLOTS, slot_stride, q_size, kv_size,
                  OFF, EPILOGUE, HAS_BIAS, HEAD_DIM)
    else:
        wmask = m_mask[:, None] & (cols < N)[None, :]
        ws = WS + rm[:, None] * N + cols[None, :]
        # Relaxed: per-element acq_rel atomics serialise (split-K measured slower than none on
        # the H200 with them); the barrier and the counter's acq_rel atomic order them instead.
        tl.atomic_add(ws, acc1, mask=wmask, sem="relaxed")
        tl.atomic_add(ws + OFF, acc2, mask=wmask, sem="relaxed")
        tl.debug_barrier()                 # every thread's partials are in before the count
        arrived = tl.atomic_add(CNT + pid, 1)
        if arrived == SPLIT_K - 1:         # the last split of this tile: sum, reset, epilogue
            # Read the sums at L2 (an atomic add of zero: never a stale L1 line), then clear them.
            acc1 = tl.where(wmask, tl.atomic_add(ws, tl.zeros_like(acc1), mask=wmask, sem="relaxed"), 0.0)
            acc2 = tl.where(wmask, tl.atomic_add(ws + OFF, tl.zeros_like(acc2), mask=wmask, sem="relaxed"), 0.0)
            tl.store(ws, tl.zeros_like(acc1), mask=wmask)
            tl.store(ws + OFF, tl.zeros_like(acc2), mask=wmask)
            tl.store(CNT + pid, 0)
            _epilogue(acc1, acc2, base, cols, rm, m_mask, BIAS, OUT, stride_o, RES, stride_r, SSQ_OUT,
                      POS, CS, stride_cs, KC, VC, SLOTS, slot_stride, q_size, kv_size,
                      OFF, EPILOGUE, HAS_BIAS, HEAD_DIM)


_WORKSPACE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
WORKSPACE_COLUMNS = 1 << 16


def _workspace(device: torch.device, n: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial sums [MAX_ROWS, >= n] and per-tile arrival counters, zero between launches
    (the last program of each tile resets what it used). Allocated once per device, at the
    eager warm-up that precedes graph capture; the captured graphs then keep using it."""
    key = str(device)
    have = _WORKSPACE.get(key)
    if have is None or have[0].shape[1] < n or have[1].numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fused_gemv: split-K workspace must be allocated before graph capture")
        cols = max(n, WORKSPACE_COLUMNS)
        have = (torch.zeros((MAX_ROWS, cols), dtype=torch.float32, device=device),
                torch.zeros(max(tiles, cols), dtype=torch.int32, device=device))
        _WORKSPACE[key] = have
    return have


def check_config(config, n: int, k: int, off: int | None = None) -> str | None:
    """Why `config` cannot serve an N x K weight with tiles OFF apart (None: it can)."""
    hb, bk, _, _, split = config
    off = hb if off is None else off
    if hb < 16 or hb & (hb - 1) or bk < 16 or bk & (bk - 1):
        return f"HB {hb} and BLOCK_K {bk} must be powers of two >= 16"
    if off % hb or n % (2 * off):
        return f"N {n} must split into pairs of tiles of {hb} rows {off} apart"
    if split < 1 or split * bk > max(k, bk) and split > 1:
        return f"SPLIT_K {split} x BLOCK_K {bk} exceeds K {k}"
    return None


def fused_gemv(x, w, bias=None, *, norm=None, residual=None, rope_kv=None, silu=False,
               config=DEFAULT_CONFIG, pdl: bool = False, prefetch: int = 0, impl: str | None = None):
    """y = norm?(x) @ w.T (+ bias) for x [M <= 16, K], w [N, K] contiguous, then one epilogue:

    norm      (ssq [M] fp32, weight [K], eps): x is the residual stream and its HF RMSNorm is
              taken with the given per-row sums of squares of x.
    residual  (res [M, N], ssq_out [M] fp32): res = res + y in place, ssq_out += sum(res**2)
              per row; returns res.
    rope_kv   (positions [M], cos_sin [P, D], k_cache, v_cache [blocks, block size, Hk, D],
              slots [M], Hq, Hk): w is the fused q|k|v projection; q and k get RoPE, k and v are
              written to the caches at slots (negative: skipped); returns the [M, N] q|k|v rows.
    silu      True: w is gate|up; returns silu(gate) * up, [M, N / 2].

    config: (HB, BLOCK_K, num_warps, num_stages, SPLIT_K); pdl: launch with programmatic
    dependent launch (Hopper; the kernel waits for its predecessor before reading activations);
    prefetch: with pdl, columns of its weight rows to prefetch into L2 before that wait.
    impl: None (Triton on CUDA, the reference on CPU), "triton" or "torch"."""
    op = "fused_gemv"
    if sum(e is not None and e is not False for e in (residual, rope_kv, silu)) > 1:
        raise ValueError(f"{op}: at most one of residual, rope_kv and silu")
    if not use_triton(op, impl, _fused_gemv_kernel, x, w, bias):
        return fused_gemv_ref(x, w, bias, norm=norm, residual=residual, rope_kv=rope_kv, silu=silu)
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    dev, dt = x.device, x.dtype
    check_tensor(op, "w", w, ndim=2, dtypes=(dt,), device=dev, contiguous=True)
    M, K = x.shape
    N = w.shape[0]
    check_shape(op, "w", w, (None, K))
    if M > MAX_ROWS:
        raise ValueError(f"{op}: at most {MAX_ROWS} rows, got {M}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, dtypes=(dt,), device=dev, contiguous=True)
        check_shape(op, "bias", bias, (N,))
    hb, bk, warps, stages, split = config
    dummy = w
    ssq_in, norm_w, eps = dummy, dummy, 0.0
    if norm is not None:
        ssq_in, norm_w, eps = norm
        check_tensor(op, "norm ssq", ssq_in, ndim=1, dtypes=(torch.float32,), device=dev)
        check_shape(op, "norm ssq", ssq_in, (M,))
        check_tensor(op, "norm weight", norm_w, ndim=1, dtypes=(dt,), device=dev)
        check_shape(op, "norm weight", norm_w, (K,))
    res, ssq_out, pos, cs, kc, vc, slots = (dummy,) * 7
    q_size = kv_size = head_dim = 0
    off, epilogue = hb, EPI_STORE
    if residual is not None:
        res, ssq_out = residual
        check_tensor(op, "residual", res, ndim=2, dtypes=(dt,), device=dev)
        check_shape(op, "residual", res, (M, N))
        check_tensor(op, "ssq_out", ssq_out, ndim=1, dtypes=(torch.float32,), device=dev)
        check_shape(op, "ssq_out", ssq_out, (M,))
        epilogue, out = EPI_RESIDUAL, res
    elif rope_kv is not None:
        pos, cs, kc, vc, slots, hq, hk = rope_kv
        head_dim = cs.shape[-1]
        q_size, kv_size = hq * head_dim, hk * head_dim
        if N != q_size + 2 * kv_size:
            raise ValueError(f"{op}: w has {N} rows, but {hq} q and {hk} kv heads of {head_dim} need "
                             f"{q_size + 2 * kv_size}")
        check_tensor(op, "positions", pos, ndim=1, dtypes=INDEX_DTYPES, device=dev)
        check_shape(op, "positions", pos, (M,))
        check_tensor(op, "cos_sin", cs, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
        check_tensor(op, "k_cache", kc, ndim=4, dtypes=FLOAT_DTYPES, device=dev, contiguous=True)
        check_shape(op, "k_cache", kc, (None, None, hk, head_dim))
        check_tensor(op, "v_cache", vc, dtypes=(kc.dtype,), device=dev, contiguous=True)
        check_shape(op, "v_cache", vc, tuple(kc.shape))
        check_tensor(op, "slots", slots, ndim=1, dtypes=INDEX_DTYPES, device=dev)
        check_shape(op, "slots", slots, (M,))
        off, epilogue = head_dim // 2, EPI_ROPE_KV
        out = torch.empty((M, N), dtype=dt, device=dev)
    elif silu:
        off, epilogue = N // 2, EPI_SILU
        out = torch.empty((M, N // 2), dtype=dt, device=dev)
    else:
        out = torch.empty((M, N), dtype=dt, device=dev)
    why = check_config(config, N, K, off)
    if why:
        raise ValueError(f"{op}: config {config}: {why}")
    if M == 0:
        return out
    tiles = N // (2 * hb)
    ws, cnt = _workspace(dev, N, tiles) if split > 1 else (dummy, dummy)
    interpreted = is_interpreted(_fused_gemv_kernel)
    pdl = bool(pdl) and not interpreted
    if pdl and not pdl_available:
        raise ValueError(f"{op}: pdl=True needs triton.language.extra.cuda.gdc_wait (Triton >= 3.3)")
    if prefetch and (prefetch < 128 or prefetch & (prefetch - 1)):
        raise ValueError(f"{op}: prefetch must be 0 or a power of two >= 128, got {prefetch}")
    extra = {"launch_pdl": True} if pdl else {}
    _fused_gemv_kernel[(tiles, split)](
        x, w, bias if bias is not None else dummy, out, M, N, K, x.stride(0), out.stride(0),
        ssq_in, norm_w, float(eps), res, res.stride(0) if residual is not None else 0, ssq_out,
        pos, cs, cs.stride(0) if rope_kv is not None else 0, kc, vc, slots,
        kc.stride(1) if rope_kv is not None else 0, q_size, kv_size, ws, cnt,
        OFF=off, HB=hb, BLOCK_M=MAX_ROWS, BLOCK_K=bk, SPLIT_K=split, EVEN_K=K % (split * bk) == 0,
        PROLOGUE=PRO_NORM if norm is not None else PRO_NONE, EPILOGUE=epilogue,
        HAS_BIAS=bias is not None, HEAD_DIM=max(head_dim, 1), USE_PDL=pdl,
        PREFETCH=prefetch if pdl else 0, UPCAST=interpreted,
        DOT_PRECISION="ieee" if dt == torch.float32 or interpreted else "tf32",
        num_warps=warps, num_stages=stages, **extra)
    return out

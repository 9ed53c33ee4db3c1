"""The decode forward pass with fused kernels (issue 18): per layer four fused GEMVs and the
attention, instead of four matmuls and seven small kernels.

    qkv   = gemv(norm(residual; ssq), W_qkv) -> RoPE on q, k; k, v into the paged cache
    o     = decode attention(q)
    residual += gemv(o, W_o)                 (and ssq of the new residual, for the next norm)
    act   = silu_and_mul(gemv(norm(residual; ssq), W_gate_up))
    residual += gemv(act, W_down)            (and ssq)

Numerics are the unfused path's (model/llama.py with HF rounding): every intermediate is
rounded to the activation dtype where the unfused path stores it. The per-row sums of squares
that RMSNorm needs are accumulated by the kernel that writes the residual (one zeroed fp32
buffer per step), so a norm costs no pass of its own. Used for decode steps of at most
MAX_FUSED_ROWS rows on CUDA at tensor-parallel size 1 (an all-reduce would sit between the
matmul and the residual add); anything else takes the unfused path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._launch import device_sms
from kernels.decode_attention import auto_num_splits, paged_decode_attention
from kernels.fused_gemv import check_config, fused_gemv, DEFAULT_CONFIG
from kernels.fused_tune import config_for
from kernels.gemv import skinny_linear
from kernels.kv_cache_write import write_kv_cache
from kernels.rmsnorm import rmsnorm
from kernels.rope import apply_rope
from kernels.silu_and_mul import silu_and_mul

MAX_FUSED_ROWS = 8


@dataclass(frozen=True)
class FusedDecode:
    """How the fused path launches: pdl (programmatic dependent launch between the kernels of a
    step, Hopper), prefetch (with pdl: columns of each weight row asked of L2 before waiting
    for the previous kernel), impl (None: Triton on CUDA; "triton" runs the kernels in the
    interpreter on CPU, for tests)."""
    pdl: bool = False
    prefetch: int = 0
    impl: str | None = None
    split_tokens: int = 256     # decode attention: fewest context tokens per split
    combine: bool = False       # decode attention: the last split combines (no reduce kernel)
    # Projections ("qkv", "gate_up") run unfused (norm kernel, kernels/gemv.py's skinny matmul,
    # RoPE + KV write or SiLU kernels) where that measured faster: see choose_unfused.
    unfused: frozenset = frozenset()


def unsupported(model) -> str | None:
    """Why the fused path cannot run this model (None: it can)."""
    if model.tp.size != 1:
        return "tensor parallelism > 1 (an all-reduce sits between each matmul and the residual add)"
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    for name, w, off in (("qkv", attn.qkv_proj.weight, attn.head_dim // 2), ("o", attn.o_proj.weight, None),
                         ("gate_up", mlp.gate_up_proj.weight, mlp.inter), ("down", mlp.down_proj.weight, None)):
        why = check_config(DEFAULT_CONFIG, w.shape[0], w.shape[1], off)
        if why:
            return f"{name} projection {tuple(w.shape)}: {why}"
    if attn.o_proj.bias is not None or mlp.down_proj.bias is not None:
        return "o/down projections with a bias"
    return None


@torch.inference_mode()
def self_check(model, fused: FusedDecode) -> str | None:
    """Run each fused kernel mode once on layer 0's weights (one row, scratch KV) against its
    reference; the reason it failed, or None. A kernel that does not build or does not agree
    on this GPU then costs the fused path, never a serving step."""
    from kernels.fused_gemv import fused_gemv_ref
    attn, mlp, ln = model.layers[0].self_attn, model.layers[0].mlp, model.layers[0].input_layernorm
    w = attn.qkv_proj.weight
    dev, dt = w.device, w.dtype
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn((1, w.shape[1]), generator=gen, device=dev, dtype=dt)
    norm = (x.float().square().sum(-1), ln.weight, ln.eps)
    pos = torch.full((1,), 3, dtype=torch.int32, device=dev)   # a real rotation
    slots = torch.zeros(1, dtype=torch.int64, device=dev)
    kw = dict(pdl=fused.pdl, prefetch=fused.prefetch, impl=fused.impl)
    res = torch.randn((1, attn.o_proj.out_features), generator=gen, device=dev, dtype=dt)
    o_in = torch.randn((1, attn.q_size), generator=gen, device=dev, dtype=dt)
    act = torch.randn((1, mlp.inter), generator=gen, device=dev, dtype=dt)
    for name, lin, xin, extra, off in (
            ("qkv", attn.qkv_proj, x, "rope", attn.head_dim // 2), ("o", attn.o_proj, o_in, "residual", None),
            ("gate_up", mlp.gate_up_proj, x, "silu", mlp.inter), ("down", mlp.down_proj, act, "residual", None)):
        outs = []
        for fn in (fused_gemv, fused_gemv_ref):
            caches = [torch.zeros((1, 1, attn.num_kv_heads, attn.head_dim), device=dev, dtype=dt) for _ in range(2)]
            mode = {"rope": dict(norm=norm, rope_kv=(pos, model.cos_sin, *caches, slots, attn.num_heads,
                                                     attn.num_kv_heads)),
                    "residual": dict(residual=(res.clone(), torch.zeros(1, device=dev))),
                    "silu": dict(norm=norm, silu=True)}[extra]
            more = dict(config=config_for(lin.weight, fused.pdl, fused.prefetch, off), **kw) if fn is fused_gemv else {}
            try:
                outs.append(torch.cat([fn(xin, lin.weight, lin.bias, **mode, **more).float().flatten()]
                                      + [c.float().flatten() for c in caches]))
            except Exception as e:  # noqa: BLE001 - reported, and the unfused path serves
                return f"{name}: {type(e).__name__}: {str(e)[:300]}"
        err = float((outs[0] - outs[1]).norm() / outs[1].norm().clamp_min(1e-30))
        if not err < 2e-2:
            return f"{name}: relative error {err:.1e} against the unfused reference"
    return None


EXTRA_KERNEL_US = 2.0      # what each small kernel of the unfused path costs in a graph (H200 breakdown)


def choose_unfused(model, fused: FusedDecode) -> frozenset:
    """The norm-prologue projections whose fused GEMV measured slower than the unfused path's
    matmul plus its extra small kernels (qkv: norm, RoPE, KV write; gate_up: norm, SiLU), from
    the two tuners' timings at one row. Without timings, none."""
    from kernels.fused_tune import tuned_us
    from kernels.gemv import tuned_us as skinny_us
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    out = set()
    for name, w, extra in (("qkv", attn.qkv_proj.weight, 3), ("gate_up", mlp.gate_up_proj.weight, 2)):
        f, u = tuned_us(w, fused.pdl, fused.prefetch), skinny_us(w, 1)
        if f is not None and u is not None and f > u + extra * EXTRA_KERNEL_US:
            out.add(name)
    return frozenset(out)


def _unfused_qkv(model, attn, ln, residual, positions, k_cache, v_cache, meta):
    """The unfused path's front half of attention (model/llama.py), on the residual stream."""
    T = residual.shape[0]
    qkv = skinny_linear(rmsnorm(residual, ln.weight, ln.eps), attn.qkv_proj)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q = q.view(T, attn.num_heads, attn.head_dim)
    k = k.view(T, attn.num_kv_heads, attn.head_dim)
    apply_rope(q, k, positions, model.cos_sin)
    write_kv_cache(k, v.view(T, attn.num_kv_heads, attn.head_dim), k_cache, v_cache, meta.slot_mapping)
    return qkv


def applies(model, input_ids: torch.Tensor, meta) -> bool:
    fused = getattr(model, "fused_decode", None)
    return (fused is not None and meta.kind == "decode" and input_ids.shape[0] <= MAX_FUSED_ROWS
            and (input_ids.is_cuda or fused.impl == "triton"))


def forward(model, input_ids, positions, kv_cache, meta, layer_hook=None) -> torch.Tensor:
    """Hidden states after the final norm, [T, hidden]; same contract as LlamaModel.forward."""
    fused: FusedDecode = model.fused_decode
    kw = dict(pdl=fused.pdl, prefetch=fused.prefetch, impl=fused.impl)
    T = input_ids.shape[0]
    k0 = kv_cache[0][0]
    # More, shorter splits than the throughput default at batch <= 8: the step waits on latency
    num_splits = auto_num_splits(T, k0.shape[2], meta.block_tables.shape[1] * k0.shape[1], device_sms(k0),
                                 fused.split_tokens)
    residual = model.embed_tokens(input_ids)
    ssq = torch.zeros((2 * len(model.layers), T), dtype=torch.float32, device=residual.device)
    ssq_in = residual.float().square().sum(-1)
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        k_cache, v_cache = kv_cache[i][0], kv_cache[i][1]
        w = attn.qkv_proj.weight
        if "qkv" in fused.unfused:
            qkv = _unfused_qkv(model, attn, ln1, residual, positions, k_cache, v_cache, meta)
        else:
            qkv = fused_gemv(residual, w, attn.qkv_proj.bias, norm=(ssq_in, ln1.weight, ln1.eps),
                             rope_kv=(positions, model.cos_sin, k_cache, v_cache, meta.slot_mapping,
                                      attn.num_heads, attn.num_kv_heads),
                             config=config_for(w, fused.pdl, fused.prefetch, attn.head_dim // 2), **kw)
        q = qkv[:, :attn.q_size].view(T, attn.num_heads, attn.head_dim)
        o = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, attn.scale,
                                   num_splits=num_splits, pdl=fused.pdl, combine=fused.combine)
        w = attn.o_proj.weight
        fused_gemv(o.view(T, attn.q_size), w, residual=(residual, ssq[2 * i]),
                   config=config_for(w, fused.pdl, fused.prefetch), **kw)
        w = mlp.gate_up_proj.weight
        if "gate_up" in fused.unfused:
            act = silu_and_mul(skinny_linear(rmsnorm(residual, ln2.weight, ln2.eps), mlp.gate_up_proj))
        else:
            act = fused_gemv(residual, w, norm=(ssq[2 * i], ln2.weight, ln2.eps), silu=True,
                             config=config_for(w, fused.pdl, fused.prefetch, mlp.inter), **kw)
        w = mlp.down_proj.weight
        fused_gemv(act, w, residual=(residual, ssq[2 * i + 1]), config=config_for(w, fused.pdl, fused.prefetch), **kw)
        ssq_in = ssq[2 * i + 1]
        if layer_hook is not None:
            layer_hook(i)
    return rmsnorm(residual, model.norm.weight, model.norm.eps)

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
    # How the norm-prologue projections ("qkv", "gate_up") run, as (name, how) pairs: "fused"
    # (norm in the GEMV's prologue, the default), "apart" (an RMSNorm kernel, then the fused
    # GEMV with its epilogue) or "unfused" (the unfused path's kernels); model/fused_plan.py
    # picks from the tuners' timings.
    plan: tuple = ()

    def how(self, name: str) -> str:
        return dict(self.plan).get(name, "fused")


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


def _norm_input(how: str, residual, ssq, ln, epilogue: str):
    """(GEMV input, its norm argument, tuning mode): the raw residual with the norm folded into
    the prologue, or the output of a separate RMSNorm kernel."""
    if how == "fused":
        return residual, (ssq, ln.weight, ln.eps), "norm+" + epilogue
    return rmsnorm(residual, ln.weight, ln.eps), None, epilogue


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
        if fused.how("qkv") == "unfused":
            qkv = _unfused_qkv(model, attn, ln1, residual, positions, k_cache, v_cache, meta)
        else:
            x, norm, mode = _norm_input(fused.how("qkv"), residual, ssq_in, ln1, "rope")
            qkv = fused_gemv(x, w, attn.qkv_proj.bias, norm=norm,
                             rope_kv=(positions, model.cos_sin, k_cache, v_cache, meta.slot_mapping,
                                      attn.num_heads, attn.num_kv_heads),
                             config=config_for(w, fused.pdl, fused.prefetch, attn.head_dim // 2, mode), **kw)
        q = qkv[:, :attn.q_size].view(T, attn.num_heads, attn.head_dim)
        o = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, attn.scale,
                                   num_splits=num_splits, pdl=fused.pdl, combine=fused.combine)
        w = attn.o_proj.weight
        fused_gemv(o.view(T, attn.q_size), w, residual=(residual, ssq[2 * i]),
                   config=config_for(w, fused.pdl, fused.prefetch, None, "residual"), **kw)
        w = mlp.gate_up_proj.weight
        if fused.how("gate_up") == "unfused":
            act = silu_and_mul(skinny_linear(rmsnorm(residual, ln2.weight, ln2.eps), mlp.gate_up_proj))
        else:
            x, norm, mode = _norm_input(fused.how("gate_up"), residual, ssq[2 * i], ln2, "silu")
            act = fused_gemv(x, w, norm=norm, silu=True,
                             config=config_for(w, fused.pdl, fused.prefetch, mlp.inter, mode), **kw)
        w = mlp.down_proj.weight
        fused_gemv(act, w, residual=(residual, ssq[2 * i + 1]),
                   config=config_for(w, fused.pdl, fused.prefetch, None, "residual"), **kw)
        ssq_in = ssq[2 * i + 1]
        if layer_hook is not None:
            layer_hook(i)
    return rmsnorm(residual, model.norm.weight, model.norm.eps)

"""Llama-family decoder (Llama 2/3, Qwen2, Mistral) with grouped-query attention, a paged KV
cache and tensor parallelism (Megatron layout: q/k/v and gate/up split by output rows, o and
down by input columns, one all-reduce after each).

The whole model is this file. Kernels come from kernels/ (Triton on CUDA, torch references on CPU).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.model_config import ModelConfig
from model import fused_decode
from kernels.decode_attention import paged_decode_attention
from kernels.gemv import skinny_linear
from kernels.kv_cache_write import write_kv_cache
from kernels.prefill_attention import prefill_attention
from kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
from kernels.rope import apply_rope
from kernels.silu_and_mul import silu_and_mul
from model.attention_metadata import AttentionMetadata


class TPContext:
    """This rank's place in its tensor-parallel group."""

    def __init__(self, rank: int = 0, size: int = 1, group=None):
        self.rank, self.size, self.group = rank, size, group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None):
        if residual is None:
            return rmsnorm(x, self.weight, self.eps), x
        return fused_add_rmsnorm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext):
        super().__init__()
        if cfg.num_kv_heads % tp.size or cfg.num_heads % tp.size:
            raise ValueError(f"tensor-parallel size {tp.size} must divide num_heads {cfg.num_heads} "
                             f"and num_kv_heads {cfg.num_kv_heads}")
        self.tp = tp
        self.num_heads = cfg.num_heads // tp.size
        self.num_kv_heads = cfg.num_kv_heads // tp.size
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(self, x, positions, cos_sin, kv_cache, meta: AttentionMetadata):
        T = x.shape[0]
        q, k, v = skinny_linear(x, self.qkv_proj).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Views into the qkv output (row stride q+2kv): the kernels take strided rows, so no copies.
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        apply_rope(q, k, positions, cos_sin)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        prefix = meta.prefix_lens if meta.max_prefix_len else None
        if meta.kind == "prefill":
            o = prefill_attention(q, k, v, meta.cu_seqlens, self.scale, k_cache, v_cache,
                                  meta.block_tables, prefix)
        elif meta.kind == "decode":
            o = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale)
        else:   # mixed: prefill chunks in rows [0, n), decode tokens after them, one output
            n = meta.num_prefill_tokens
            o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            prefill_attention(q[:n], k[:n], v[:n], meta.cu_seqlens, self.scale, k_cache, v_cache,
                              meta.block_tables, prefix, out=o[:n])
            paged_decode_attention(q[n:], k_cache, v_cache, meta.decode_block_tables, meta.context_lens,
                                   self.scale, out=o[n:])
        return self.tp.all_reduce(skinny_linear(o.reshape(T, self.q_size), self.o_proj))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext):
        super().__init__()
        if cfg.intermediate_size % tp.size:
            raise ValueError(f"tensor-parallel size {tp.size} must divide intermediate_size {cfg.intermediate_size}")
        self.tp = tp
        self.inter = cfg.intermediate_size // tp.size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.inter, bias=False)
        self.down_proj = nn.Linear(self.inter, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.tp.all_reduce(skinny_linear(silu_and_mul(skinny_linear(x, self.gate_up_proj)), self.down_proj))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def forward(self, x, residual, positions, cos_sin, kv_cache, meta):
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, cos_sin, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """Decoder stack plus head. `layer_range` selects a pipeline stage's layers (all by default);
    the KV cache passed to forward holds exactly those layers."""

    def __init__(self, cfg: ModelConfig, tp: TPContext | None = None):
        super().__init__()
        self.cfg = cfg
        self.tp = tp or TPContext()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, self.tp) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)
        # model.fused_decode.FusedDecode when small decode batches take the fused kernels
        # (ModelRunner sets it on CUDA after tuning them); None: the unfused path below.
        self.fused_decode: fused_decode.FusedDecode | None = None

    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata, layer_hook=None):
        """Hidden states after the final norm, [T, hidden]. `layer_hook(i)` runs after layer i
        has written its KV (layer-wise KV transfer starts sending there)."""
        if fused_decode.applies(self, input_ids, meta):
            return fused_decode.forward(self, input_ids, positions, kv_cache, meta, layer_hook)
        x = self.embed_tokens(input_ids)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, self.cos_sin, kv_cache[i], meta)
            if layer_hook is not None:
                layer_hook(i)
        x, _ = self.norm(x, residual)
        return x

    def skinny_layers(self) -> list[nn.Linear]:
        """The per-layer linears a decode step streams (kernels.gemv.tune_skinny's input)."""
        return [m for layer in self.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                      layer.mlp.gate_up_proj, layer.mlp.down_proj)]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

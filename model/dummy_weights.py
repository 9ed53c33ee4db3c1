"""Random ("dummy") weights as a virtual HF checkpoint: benchmarks at real model shapes and the
embedded model use them. Apart from the loader, so that model/embedded.py can write the
embedded checkpoint without importing the loader (which resolves the embedded model)."""
from __future__ import annotations

import zlib

import torch

from engine.model_config import ModelConfig


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of an HF checkpoint of this architecture."""
    h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,),
              "lm_head.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


class DummyReader:
    """A virtual checkpoint of random weights: each tensor comes from a generator seeded by its
    name, so every tensor-parallel rank slices the same full tensor and TP=N runs the same
    model as TP=1. Norms are ones; everything else normal with std 0.02."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, device="cpu"):
        self.shapes = hf_shapes(cfg)
        self.seed, self.device = seed, torch.device(device)

    def has(self, name):
        return name in self.shapes

    def get(self, name, dim=None, rank=0, size=1):
        shape = self.shapes[name]
        if "norm" in name:
            full = torch.ones(shape, device=self.device)
        else:
            gen = torch.Generator(device=self.device)
            gen.manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) & (2**63 - 1))
            full = torch.randn(shape, generator=gen, device=self.device).mul_(0.02)
        if dim is None or size == 1:
            return full
        n = shape[dim] // size
        return full.narrow(dim, rank * n, n)

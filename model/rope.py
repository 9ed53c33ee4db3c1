"""The cos/sin table for rotary embeddings, with llama3 frequency scaling."""
from __future__ import annotations

import math

import torch

from engine.model_config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        inv = _llama3(inv, scaling)
    elif kind in ("linear",):
        inv = inv / float(scaling["factor"])
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")
    return inv


def _llama3(inv: torch.Tensor, s: dict) -> torch.Tensor:
    # Same formula as Meta's reference and HF's _compute_llama3_parameters.
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin_table(cfg: ModelConfig, max_positions: int, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[max_positions, head_dim]: cos of each frequency in the first half, sin in the second."""
    inv = inv_frequencies(cfg)
    t = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = torch.outer(t, inv)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device=device, dtype=dtype)

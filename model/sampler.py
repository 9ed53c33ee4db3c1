"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeds.

A seeded request draws token i from a generator seeded by (seed, i), so its tokens do not
depend on batching, on preemption and recompute, or on which worker samples them (the prefill
worker samples the first token, the decode worker the rest).
"""
from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams

_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def _row_generator(seed: int | None, token_index: int, device, fallback: torch.Generator):
    if seed is None:
        return fallback
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003) ^ (token_index * _MIX)) & _MASK)
    return g


def _filter(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    logits = logits / sp.temperature
    if sp.top_k and sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= sp.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, idx, sorted_logits)
    return logits


class Sampler:
    def __init__(self, device="cpu", seed: int = 0):
        self.device = torch.device(device)
        self.fallback = torch.Generator(device=self.device)
        self.fallback.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], token_indices: list[int]) -> list[int]:
        """logits: [B, V] fp32; token_indices[b]: index of the token being sampled among that
        request's outputs. Returns B token ids (one host transfer for the whole batch)."""
        greedy = logits.argmax(-1)
        if all(p.greedy for p in params):
            return greedy.tolist()
        out = greedy.clone()
        for b, sp in enumerate(params):
            if sp.greedy:
                continue
            probs = _filter(logits[b], sp).softmax(-1)
            g = _row_generator(sp.seed, token_indices[b], logits.device, self.fallback)
            out[b] = torch.multinomial(probs, 1, generator=g)[0]
        return out.tolist()

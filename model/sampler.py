"""Token sampling: greedy, temperature, top-k, top-p, min-p, presence/frequency/repetition
penalties and logprobs, batched with per-request parameters and seeds.

A seeded request draws token i from a generator seeded by (seed, i), so its tokens do not
depend on batching, on preemption and recompute, or on which worker samples them (the prefill
worker samples the first token, the decode worker the rest). Temperatures below
MIN_TEMPERATURE sample greedily, so no accepted parameter can make the probabilities inf/nan.
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


def apply_penalties(logits: torch.Tensor, sp: SamplingParams, prompt_ids, output_ids) -> torch.Tensor:
    """One row [V]: OpenAI presence/frequency penalties over the output, HF repetition penalty
    over prompt + output (ids outside the vocabulary are ignored)."""
    v = logits.shape[-1]
    logits = logits.clone()
    if sp.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({t for t in (*prompt_ids, *output_ids) if 0 <= t < v}),
                            dtype=torch.long, device=logits.device)
        if seen.numel():
            x = logits[seen]
            logits[seen] = torch.where(x > 0, x / sp.repetition_penalty, x * sp.repetition_penalty)
    if (sp.presence_penalty or sp.frequency_penalty) and output_ids:
        ids = torch.tensor([t for t in output_ids if 0 <= t < v], dtype=torch.long, device=logits.device)
        counts = torch.zeros(v, dtype=logits.dtype, device=logits.device).scatter_add_(
            0, ids, torch.ones_like(ids, dtype=logits.dtype))
        logits -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p for rows [R, V] of non-greedy requests, batched."""
    dev = logits.device
    temp = torch.tensor([sp.temperature for sp in params], dtype=logits.dtype, device=dev)
    logits = logits / temp.unsqueeze(1)
    v = logits.shape[-1]
    ks = [sp.top_k if 0 < sp.top_k < v else v for sp in params]
    if any(k < v for k in ks):     # decided on the host: no device sync (async scheduling)
        sorted_desc = logits.sort(-1, descending=True).values
        kth = sorted_desc.gather(1, torch.tensor(ks, device=dev).sub(1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = torch.tensor([sp.top_p for sp in params], dtype=logits.dtype, device=dev)
    if any(sp.top_p < 1.0 for sp in params):
        sorted_logits, idx = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (probs.cumsum(-1) - probs >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        drop[:, 0] = False          # a top_p below fp32's smallest value must still keep one
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)
    min_p = torch.tensor([sp.min_p for sp in params], dtype=logits.dtype, device=dev)
    if any(sp.min_p > 0 for sp in params):
        probs = logits.softmax(-1)
        keep = probs >= probs.max(-1, keepdim=True).values * min_p.unsqueeze(1)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def _logprob_entry(logprobs_row: torch.Tensor, token: int, k: int) -> dict:
    entry = {"token_id": token, "logprob": float(logprobs_row[token])}
    if k:
        vals, ids = logprobs_row.topk(k)
        entry["top"] = [[int(i), float(x)] for i, x in zip(ids.tolist(), vals.tolist())]
    else:
        entry["top"] = []
    return entry


class Sampler:
    def __init__(self, device="cpu", seed: int = 0):
        self.device = torch.device(device)
        self.fallback = torch.Generator(device=self.device)
        self.fallback.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], token_indices: list[int],
                 histories: list[tuple[list[int], list[int]]] | None = None) -> list[int]:
        """logits: [B, V] fp32; token_indices[b]: index of the token being sampled among that
        request's outputs; histories[b]: (prompt ids, output ids), needed only for penalties.
        Returns B token ids (one host transfer for the whole batch)."""
        return self.sample(logits, params, token_indices, histories)[0]

    def sample_requests(self, logits: torch.Tensor, reqs) -> tuple[list[int], list[dict | None]]:
        """Sample for engine Requests: (token ids, per-row logprobs entry or None)."""
        return self.sample(logits, [r.sampling for r in reqs], [r.num_output_tokens for r in reqs],
                           [(r.prompt_token_ids, r.output_token_ids) for r in reqs])

    def sample_device(self, logits: torch.Tensor, reqs) -> torch.Tensor:
        """The tokens of `sample_requests` as a device tensor [B] (int64), without waiting for
        the device: async scheduling feeds it to the next step and copies it to the host while
        that step runs. Only for requests without penalties or logprobs (they need the host's
        token history and values); the tokens equal `sample_requests`'s."""
        params = [r.sampling for r in reqs]
        if any(p.penalized or p.logprobs is not None for p in params):
            raise ValueError("sample_device: penalties and logprobs need the host path (sample_requests)")
        out = logits.argmax(-1)
        rand = [b for b, p in enumerate(params) if not p.greedy]
        if rand:
            probs = filter_logits(logits[rand], [params[b] for b in rand]).softmax(-1)
            # A row that is not a distribution samples greedily (as in `sample`); it is decided
            # on the device, so such a row draws from a uniform stand-in whose draw is dropped.
            ok = torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)
            probs = torch.where(ok.unsqueeze(1), probs, torch.ones_like(probs))
            for j, b in enumerate(rand):
                g = _row_generator(params[b].seed, reqs[b].num_output_tokens, logits.device, self.fallback)
                out[b] = torch.where(ok[j], torch.multinomial(probs[j], 1, generator=g)[0], out[b])
        return out

    def sample(self, logits, params, token_indices, histories=None) -> tuple[list[int], list[dict | None]]:
        if not any(p.needs_probs for p in params):
            return logits.argmax(-1).tolist(), [None] * len(params)
        raw = logits
        rows = [b for b, p in enumerate(params) if p.penalized]
        if rows:
            if histories is None:
                raise ValueError("penalties need each request's prompt and output token ids (histories)")
            logits = logits.clone()
            for b in rows:
                # Finite, so a tiny repetition_penalty cannot turn a logit into inf (then nan).
                logits[b] = apply_penalties(logits[b], params[b], *histories[b]).clamp(-1e30, 1e30)
        out = logits.argmax(-1)
        rand = [b for b, p in enumerate(params) if not p.greedy]
        if rand:
            probs = filter_logits(logits[rand], [params[b] for b in rand]).softmax(-1)
            # A row that is not a distribution (nan or inf logits from the model) samples greedily
            # rather than failing the whole batch.
            ok = (torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)).tolist()
            for j, b in enumerate(rand):
                if not ok[j]:
                    continue
                g = _row_generator(params[b].seed, token_indices[b], logits.device, self.fallback)
                out[b] = torch.multinomial(probs[j], 1, generator=g)[0]
        tokens = out.tolist()
        lp_rows = [b for b, p in enumerate(params) if p.logprobs is not None]
        entries: list[dict | None] = [None] * len(params)
        if lp_rows:
            # Log probabilities of the model's own distribution (before penalties and
            # temperature), as vLLM and OpenAI report them.
            lps = raw[lp_rows].float().log_softmax(-1).cpu()
            for j, b in enumerate(lp_rows):
                entries[b] = _logprob_entry(lps[j], tokens[b], params[b].logprobs)
        return tokens, entries

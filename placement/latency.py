"""Latency models: how long one forward pass of one instance takes.

Every model answers the same four questions for one instance (a fixed model shape, device,
tensor-parallel degree `tp` and pipeline degree `pp`):

    prefill_time(prompt_lens, cached_lens)          one prefill batch
    decode_time(batch_size, sum_context)            one decode step
    mixed_time(chunks, batch_size, sum_context)     one chunked-prefill step (Sarathi-style)
    kv_transfer_time(num_bytes, link)               moving one request's KV

`sum_context` is the number of tokens whose KV a decode step reads, summed over the batch
(each request's prompt plus its tokens so far, the step's input token included).
`RooflineModel` derives the times from a device spec; `placement.latency_profile.ProfiledModel` from
timings of our own engine. The simulator only ever talks to this interface.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import ConfigError
from engine.model_config import ModelConfig
from placement.gpus import DeviceSpec


@dataclass(frozen=True)
class Link:
    """The path one KV transfer takes: `num_streams` rank pairs send in parallel, each over a
    device link of `bandwidth` bytes/s that costs `latency_s` per message."""

    bandwidth: float
    latency_s: float
    same_node: bool = True
    num_streams: int = 1


class LatencyModel:
    """Interface of every latency model. Subclasses set `tp` and `pp` and implement the times."""

    serving = None      # placement.serving.ServingTerms: what serving costs beyond the engine

    tp: int = 1
    pp: int = 1

    def prefill_time(self, prompt_lens: Sequence[int], cached_lens: Sequence[int] | None = None) -> float:
        """Seconds from start to end of a prefill batch (all pipeline stages). `prompt_lens[i]`
        counts request i's tokens up to the end of this pass, `cached_lens[i]` those whose KV
        was already there (prefix cache hits, earlier chunks)."""
        raise NotImplementedError

    def prefill_interval(self, prefill_time_s: float) -> float:
        """How long a prefill batch occupies the first pipeline stage: the next batch may start
        after this, so a pipeline of `pp` stages holds up to `pp` batches at once."""
        return prefill_time_s / self.pp

    def decode_time(self, batch_size: int, sum_context: int) -> float:
        """Seconds of one decode step in which every one of `batch_size` requests gets a token."""
        raise NotImplementedError

    def decode_times(self, batch_size: int, sum_context: int, num_steps: int) -> np.ndarray:
        """Times of `num_steps` consecutive steps of an unchanging batch: the context sum grows
        by `batch_size` per step. Subclasses vectorise this; it is the simulator's hot path."""
        return np.array([self.decode_time(batch_size, sum_context + batch_size * k)
                         for k in range(num_steps)])

    def decode_line(self, batch_size: int, sum_context: int) -> tuple[float, float, int]:
        """`(first_s, growth_s, num_steps)`: step k of an unchanging batch, starting from
        `sum_context`, takes `first_s + k * growth_s` for every k < num_steps. The simulator
        fast-forwards that many steps in O(1). Default: no promise beyond one step."""
        return self.decode_time(batch_size, sum_context), 0.0, 1

    def mixed_time(self, chunks: Sequence[tuple[int, int]], batch_size: int, sum_context: int) -> float:
        """One step carrying prefill chunks `(num_new_tokens, num_context_tokens)` and a decode
        batch. Default: the prefill pass plus the decode step's context-dependent part."""
        if not chunks:
            return self.decode_time(batch_size, sum_context)
        lens = [n + c for n, c in chunks]
        prefill = self.prefill_time(lens, [c for _, c in chunks])
        if batch_size == 0:
            return prefill
        return prefill + self.decode_time(batch_size, sum_context) - self.decode_time(0, 0)

    def kv_transfer_time(self, num_bytes: float, link: Link) -> float:
        """Seconds to move `num_bytes` of KV over `link` (one message per stream)."""
        return link.latency_s + num_bytes / (link.bandwidth * link.num_streams)


class RooflineModel(LatencyModel):
    """Times from FLOPs and bytes with the costs measured engines show beyond them
    (docs/latency-model.md; constants fitted by `python -m placement.calibration --fit`).

    One pipeline stage's pass of M new tokens on tp ranks takes

        max(compute, memory) + 2 L (allreduce_latency + 2 (tp-1)/tp M h bytes / link bandwidth)
        + L layer_overhead + L b request_overhead (decode: b requests)

    with compute = linear FLOPs (M + gemm_half_tokens) / achieved rate (small-M GEMMs run
    below peak) + attention FLOPs / attention rate (long prompts run attention kernels closer
    to peak: efficiency n / (n + attention_half_tokens) for a prompt of n tokens), memory =
    weights + KV read at the achieved bandwidth; every pass pays the engine's step overhead.

    Prefill batches traverse the `pp` stages one after another (latency `pp` stage times; the
    pipeline holds `pp` batches). A decode step splits the batch into `pp` micro-batches that
    chase each other round the pipeline, so each stage reads its weights once per micro-batch
    and a batch smaller than `pp` leaves stages idle (the bubble): pipeline parallelism buys
    memory and compute throughput, not memory-bound latency.
    """

    def __init__(self, model: ModelConfig, device: DeviceSpec, tp: int = 1, pp: int = 1):
        if tp < 1 or pp < 1:
            raise ConfigError(f"tp and pp must be >= 1, got tp={tp}, pp={pp}")
        if pp > model.num_layers:
            raise ConfigError(f"pp={pp} exceeds the model's {model.num_layers} layers")
        self.model, self.device, self.tp, self.pp = model, device, tp, pp
        h, dt = model.hidden_size, model.dtype_bytes()
        lm_head = model.vocab_size * h
        self._linear_flops_per_token = model.flops_per_token() - 2 * lm_head
        self._lm_head_flops = 2 * lm_head
        self._attn_flops_per_pair = 4.0 * model.num_heads * model.head_dim * model.num_layers
        self._weight_bytes = float(model.weight_bytes())
        self._kv_bytes_per_token = float(model.kv_bytes_per_token())
        ranks = tp * pp
        self._flops_rate = ranks * device.peak_flops * device.compute_efficiency
        self._attn_rate = ranks * device.peak_flops * device.attention_efficiency
        self._byte_rate = ranks * device.memory_bandwidth * device.memory_efficiency
        self._gemm_fixed_s = self._linear_flops_per_token * device.gemm_half_tokens / self._flops_rate
        bw, _ = device.link(same_node=tp <= device.devices_per_node)
        layers_per_stage = model.num_layers / pp
        # Ring all-reduce moves 2 (tp-1)/tp of the activations; two all-reduces per layer.
        self._allreduce_s_per_token = 0.0
        self._allreduce_fixed_s = 0.0
        if tp > 1:
            self._allreduce_s_per_token = 2 * layers_per_stage * 2 * (tp - 1) / tp * h * dt / bw
            lat = device.allreduce_latency_s if tp <= device.devices_per_node else device.inter_node_latency_s
            self._allreduce_fixed_s = 2 * layers_per_stage * lat
        self._stage_fixed_s = self._allreduce_fixed_s + layers_per_stage * device.layer_overhead_s
        self._request_s = layers_per_stage * device.request_overhead_s
        # Activations cross pp - 1 stage boundaries, possibly between nodes.
        p2p_bw, p2p_lat = device.link(same_node=tp * pp <= device.devices_per_node)
        self._p2p_s_per_token = (pp - 1) * h * dt / p2p_bw
        self._p2p_fixed_s = (pp - 1) * p2p_lat
        # decode_line's constants: compute s per token and per context token, memory s for the
        # weights and per context token, fixed s per token and per step.
        self._line = ((self._linear_flops_per_token + self._lm_head_flops) / self._flops_rate,
                      self._attn_flops_per_pair / self._attn_rate,
                      self._weight_bytes / self._byte_rate, self._kv_bytes_per_token / self._byte_rate,
                      pp * (self._allreduce_s_per_token + self._request_s) + self._p2p_s_per_token,
                      pp * self._stage_fixed_s + self._p2p_fixed_s + device.step_overhead_s)

    # One stage's share (1/pp of the layers on tp ranks) of a pass of `num_tokens` new tokens,
    # `num_decoding` of them single tokens of running requests.
    def _stage_time(self, num_tokens, attn_pairs, context_tokens, num_sampled, num_decoding=0) -> float:
        compute = ((self._linear_flops_per_token * num_tokens + self._lm_head_flops * num_sampled)
                   / self._flops_rate + self._gemm_fixed_s + self._attn_flops_per_pair * attn_pairs / self._attn_rate)
        nbytes = self._weight_bytes + self._kv_bytes_per_token * (context_tokens + num_tokens)
        return (max(compute, nbytes / self._byte_rate) + self._allreduce_s_per_token * num_tokens
                + self._stage_fixed_s + self._request_s * num_decoding)

    def _prefill_pairs(self, new: int, cached: int) -> float:
        # Attention pairs of one prompt, weighted by the kernel's efficiency at that length.
        pairs = new * cached + new * (new + 1) / 2
        return pairs * (new + self.device.attention_half_tokens) / max(new, 1)

    def prefill_time(self, prompt_lens, cached_lens=None) -> float:
        cached_lens = cached_lens or [0] * len(prompt_lens)
        new = context = pairs = 0
        for length, cached in zip(prompt_lens, cached_lens):
            n = length - cached
            new += n
            context += cached
            pairs += self._prefill_pairs(n, cached)
        t = self.pp * self._stage_time(new, pairs, context, len(prompt_lens))
        return t + self._p2p_s_per_token * new + self._p2p_fixed_s + self.device.step_overhead_s

    def decode_time(self, batch_size: int, sum_context: int) -> float:
        if batch_size == 0:
            return self.device.step_overhead_s
        m = min(self.pp, batch_size)   # micro-batches; a round costs pp stage times either way
        b, s = batch_size / m, sum_context / m
        return (self.pp * self._stage_time(b, s, s - b, b, b) + self._p2p_s_per_token * b
                + self._p2p_fixed_s + self.device.step_overhead_s)

    def decode_line(self, batch_size, sum_context):
        # Compute and memory time are both linear in the context, which grows by batch_size
        # per step; the step time follows the larger line until the two cross.
        if batch_size == 0:
            return self.device.step_overhead_s, 0.0, 1 << 30
        pp = self.pp
        m = pp if pp < batch_size else batch_size
        b, s = batch_size / m, sum_context / m
        k = self._line
        c0, c1 = k[0] * b + k[1] * s + self._gemm_fixed_s, k[1] * b
        m0, m1 = k[2] + k[3] * s, k[3] * b
        fixed = k[4] * b + k[5]
        if c0 >= m0:
            x0, x1, y0, y1 = c0, c1, m0, m1
        else:
            x0, x1, y0, y1 = m0, m1, c0, c1
        steps = 1 << 30 if x1 >= y1 else min(int((x0 - y0) / (y1 - x1)) + 1, 1 << 30)
        return pp * x0 + fixed, pp * x1, steps

    def mixed_time(self, chunks, batch_size, sum_context) -> float:
        new = batch_size + sum(n for n, _ in chunks)
        context = sum(c for _, c in chunks) + sum_context - batch_size
        pairs = sum(self._prefill_pairs(n, c) for n, c in chunks) + sum_context
        t = self.pp * self._stage_time(new, pairs, context, len(chunks) + batch_size, batch_size)
        return t + self._p2p_s_per_token * new + self._p2p_fixed_s + self.device.step_overhead_s

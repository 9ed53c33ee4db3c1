"""Goodput of one configuration: candidate enumeration, capacity bounds and the rate search.

A candidate is one instance shape (device type, tp, pp) with its latency model and KV blocks.
Its goodput for one phase comes from simulating one instance of it alone (phase="prefill":
TTFT only; "decode": TPOT only; "colocated": both), searching on rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.model_config import ModelConfig
from placement.deployment import Deployment, InstanceGroup, make_latency
from placement.gpus import DeviceSpec
from placement.latency import LatencyModel
from placement.memory import num_kv_blocks
from placement.slo_metrics import Goodput, search_goodput
from placement.latency_profile import load_profile
from placement.simulator import simulate
from placement.workload import Workload

INF = float("inf")
# How far a goodput search may go beyond a configuration's capacity bound. The prefill and
# colocated bounds use mean prompts and are loose, so allow for what they miss. The decode
# bound is the steady-state throughput of a full batch, and a finite sample hides decode
# overload (queueing spreads over every output token of TPOT), so it caps the search exactly.
BOUND_SLACK = {"prefill": 1.15, "colocated": 1.15, "decode": 1.0}


@dataclass(frozen=True)
class Candidate:
    """One instance shape that fits in memory."""

    device: DeviceSpec
    tp: int
    pp: int
    num_blocks: int
    latency: LatencyModel

    @property
    def ranks(self) -> int:
        return self.tp * self.pp

    @property
    def label(self) -> str:
        return f"{self.device.name} tp{self.tp} pp{self.pp}"

    def group(self, num_instances: int = 1, mode: str = "prefill_first", max_batch_tokens: int = 8192,
              max_batch_size: int = 256, nodes: list[str] | None = None) -> InstanceGroup:
        return InstanceGroup(num_instances, self.latency, self.device, self.num_blocks, max_batch_tokens,
                             max_batch_size, nodes or [], mode)


def valid_tps(model: ModelConfig, max_tp: int) -> list[int]:
    """Every TP degree up to `max_tp` the runtime can shard the model over: it must divide the
    attention heads, the KV heads and the MLP width (model/llama.py), powers of two or not."""
    return [t for t in range(1, max_tp + 1)
            if not (model.num_heads % t or model.num_kv_heads % t or model.intermediate_size % t)]


def enumerate_candidates(model: ModelConfig, device: DeviceSpec, max_devices: int, latency: str,
                         block_size: int, min_tokens: int, gpu_memory_utilization: float = 0.9,
                         max_batch_tokens: int = 8192) -> list[Candidate]:
    """Every tp x pp (tp: every degree the model allows within one node; pp: powers of two up
    to the layer count) whose KV cache holds at least `min_tokens` (the longest request, or a
    full prefill batch)."""
    tps = valid_tps(model, device.devices_per_node)
    pps = [1 << i for i in range(8) if (1 << i) <= model.num_layers]
    if latency != "roofline":
        profile_tps = {int(t) for t in load_profile(latency)["tp"]}
        tps, pps = [t for t in tps if t in profile_tps], [1]
    out = []
    for tp in tps:
        for pp in pps:
            if tp * pp > max_devices:
                continue
            blocks = num_kv_blocks(model, device, tp, pp, block_size, gpu_memory_utilization, max_batch_tokens)
            if blocks * block_size < min_tokens:
                continue
            out.append(Candidate(device, tp, pp, blocks, make_latency(latency, model, device, tp, pp)))
    return out


def capacity_bound(c: Candidate, phase: str, wl: Workload, block_size: int,
                   max_batch_tokens: int, max_batch_size: int, tpot_s: float) -> float:
    """An optimistic rate (req/s) one instance can sustain: no configuration's goodput exceeds
    it, so configurations whose bound per device is below the best goodput per device so far
    need no simulation."""
    mean_prompt = float(np.mean(wl.prompt_lens))
    mean_out = float(np.mean(wl.output_lens))
    prefill_rate = INF
    decode_rate = INF
    if phase in ("prefill", "colocated"):
        # Full batches of mean-length prompts: attention grows with the square of the length,
        # so the mean prompt underestimates the work (an optimistic bound, as it should be).
        k = max(1, int(max_batch_tokens // mean_prompt))
        t = c.latency.prefill_time([int(mean_prompt)] * k)
        prefill_rate = k / c.latency.prefill_interval(t)
    if phase in ("decode", "colocated"):
        context = mean_prompt + mean_out / 2
        batch = min(max_batch_size, max(1, int(c.num_blocks * block_size / (context + block_size))))
        # Steps must stay within the TPOT target, so the batch is at most what one step allows.
        while batch > 1 and c.latency.decode_time(batch, batch * context) > tpot_s:
            batch = int(batch * 0.8)
        decode_rate = batch / (c.latency.decode_time(batch, batch * context) * max(mean_out - 1, 1))
    if phase == "colocated":
        return 1.0 / (1.0 / prefill_rate + 1.0 / decode_rate)
    return min(prefill_rate, decode_rate)


def _slo_for(phase: str, ttft_s: float, tpot_s: float) -> tuple[float, float]:
    return {"prefill": (ttft_s, INF), "decode": (INF, tpot_s)}.get(phase, (ttft_s, tpot_s))


def deployment_goodput(dep: Deployment, wl: Workload, ttft_s: float, tpot_s: float, target: float,
                       start_rate: float, phase: str = "both", rel_tol: float = 0.04,
                       max_probes: int = 14, max_rate: float = INF, step: float = 2.0,
                       accelerate: bool = False, stop_below: float = 0.0) -> Goodput:
    """Goodput of a whole deployment by simulation and search on rate (probes that cannot reach
    the target stop early). `max_rate` caps the search: a finite sample can end before the
    queues of an overloaded instance grow long enough to miss, so rates beyond the capacity
    bound are not believed. `stop_below`: see `search_goodput`."""
    slo = _slo_for(phase, ttft_s, tpot_s)
    max_misses = int(math.floor((1 - target) * wl.num_requests + 1e-9))
    passed: dict[float, object] = {}

    def attainment_at(rate):
        r = simulate(dep, wl.at_rate(rate), phase=phase, slo=slo, max_misses=max_misses)
        a = r.attainment(*slo)
        if r.completed and a >= target:
            passed.clear()          # only the highest passing rate can be the answer
            passed[rate] = r
        return a

    g = search_goodput(attainment_at, target, min(start_rate, max_rate), rel_tol, max_probes,
                       max_rate=max_rate, step=step, accelerate=accelerate, stop_below=stop_below)
    if phase == "both":     # a single-phase run is not what a plain `simulate` would give
        g.result = passed.get(g.rate)
    return g


def candidate_goodput(c: Candidate, phase: str, wl: Workload, block_size: int, kv_bytes_per_token: int,
                      ttft_s: float, tpot_s: float, target: float, max_batch_tokens: int,
                      max_batch_size: int, chunked: bool = False, rel_tol: float = 0.04,
                      start_fraction: float = 0.7, stop_below: float = 0.0) -> Goodput:
    """Goodput of one instance of `c` for `phase` ("prefill", "decode" or "colocated"), the
    search starting at `start_fraction` of its capacity bound (and stopping once it is known
    to be under `stop_below`)."""
    bound = capacity_bound(c, phase, wl, block_size, max_batch_tokens, max_batch_size, tpot_s)
    if phase == "colocated":
        # Chunked prefill mixes decode tokens into prefill steps; the prefill-first bound holds.
        g = c.group(1, "chunked" if chunked else "prefill_first", max_batch_tokens, max_batch_size)
        dep = Deployment(block_size, kv_bytes_per_token, colocated=g)
        sim_phase = "both"
    else:
        g = c.group(1, "prefill_first", max_batch_tokens, max_batch_size)
        dep = Deployment(block_size, kv_bytes_per_token, prefill=g, decode=g)
        sim_phase = phase
    return deployment_goodput(dep, wl, ttft_s, tpot_s, target, start_rate=max(bound * start_fraction, 1e-3),
                              phase=sim_phase, rel_tol=rel_tol, max_rate=bound * BOUND_SLACK[phase], step=1.25,
                              stop_below=stop_below)


def plan_goodput(dep: Deployment, wl: Workload, ttft_s: float, tpot_s: float, target: float,
                 hint: float) -> Goodput:
    """The goodput of a whole plan, as `disagg place` prints it and `disagg simulate` reports it:
    one search for both, so the two agree. From a hint that is already the answer (simulate
    re-checking a plan) it takes two probes (the hint passes, 1.5% more fails); bisection to
    1.5% keeps the two within 3%."""
    return deployment_goodput(dep, wl, ttft_s, tpot_s, target, start_rate=max(hint, 1e-3),
                              step=1.015, rel_tol=0.015, max_probes=24, accelerate=True)

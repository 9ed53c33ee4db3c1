"""The placement optimizer: which TP x PP and how many instances per phase, on which devices.

DistServe's Algorithm 1: every configuration of each phase that fits in memory gets its goodput
from a simulation of one instance alone (prefill under the TTFT target, decode under the TPOT
target) and a search on rate; the best goodput per device (per dollar when device types differ
in price) wins in each phase, and replica counts follow from the target rate (or fill the
devices). Algorithm 2 ("pairing"): a unit of `pp` nodes holds stage k of every prefill and
decode instance of the unit on node k, so KV moves over NVLink only; the best unit is found
from the phase goodputs and checked by simulating the unit whole, then replicated over nodes.
Configurations whose capacity bound cannot beat the best goodput found so far are not
simulated. The chosen plan is simulated whole at the end (goodput search on the whole plan).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

from engine.errors import ConfigError
from engine.model_config import ModelConfig
from engine.plan import PhaseConfig, Plan
from placement.deployment import Deployment
from placement.gpus import DeviceSpec
from placement.search import (BOUND_SLACK, Candidate, candidate_goodput, capacity_bound,
                              deployment_goodput, enumerate_candidates)
from placement.simulator import simulate
from placement.workload import Workload


@dataclass(frozen=True)
class DevicePool:
    """`num_nodes` nodes of `devices_per_node` devices of one type."""

    device: DeviceSpec
    devices_per_node: int
    num_nodes: int = 1

    @property
    def num_devices(self) -> int:
        return self.devices_per_node * self.num_nodes


@dataclass
class PlaceSpec:
    """What to plan for. `workload` is the (sub)sample the searches simulate."""

    model: ModelConfig
    model_name: str
    pools: list[DevicePool]
    ttft_s: float
    tpot_s: float
    attainment: float
    workload: Workload
    workload_name: str
    rate: float | None = None
    latency: str = "roofline"
    pairing: str = "auto"               # auto | on | off
    block_size: int = 16
    max_batch_tokens: int = 8192
    max_batch_size: int = 256
    baselines: bool = False             # also search colocated baselines (for the report)

    def __post_init__(self):
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise ConfigError("--ttft and --tpot must be > 0 seconds")
        if not 0 < self.attainment <= 1:
            raise ConfigError(f"--attainment must be in (0, 1], got {self.attainment}")
        if self.rate is not None and self.rate <= 0:
            raise ConfigError(f"--rate must be > 0, got {self.rate}")
        if self.pairing not in ("auto", "on", "off"):
            raise ConfigError(f"pairing must be auto, on or off, got {self.pairing!r}")
        if not self.pools:
            raise ConfigError("no devices to place on")


@dataclass
class Scored:
    """A candidate with its goodput (req/s of one instance) for one phase."""

    candidate: Candidate
    phase: str
    pool: int
    bound: float
    goodput: float | None = None        # None: pruned (its bound could not win)

    def per_unit(self, cost: bool) -> float:
        unit = self.candidate.ranks * (self.candidate.device.cost_per_hour if cost else 1.0)
        return (self.goodput or 0.0) / unit

    def row(self) -> dict:
        c = self.candidate
        return {"phase": self.phase, "gpu_type": c.device.name, "tp": c.tp, "pp": c.pp,
                "num_kv_blocks": c.num_blocks, "capacity_bound_rps": self.bound,
                "goodput_rps": self.goodput, "goodput_per_device": None if self.goodput is None
                else self.goodput / c.ranks, "simulated": self.goodput is not None}


class Optimizer:
    """One placement search (see the module docstring). `progress(message)` hears of each step."""

    def __init__(self, spec: PlaceSpec, progress=None):
        self.spec = spec
        self.progress = progress or (lambda message: None)
        self.by_cost = len({p.device.cost_per_hour for p in spec.pools}) > 1
        self.kv_bytes = spec.model.kv_bytes_per_token()
        self.scored: dict[str, list[Scored]] = {}

    # Step 1: goodput of every configuration of one phase ------------------------------------
    def candidates(self, pool_index: int) -> list[Candidate]:
        s, pool = self.spec, self.spec.pools[pool_index]
        device = replace(pool.device, devices_per_node=pool.devices_per_node)
        longest = int((s.workload.prompt_lens + s.workload.output_lens).max())
        return enumerate_candidates(s.model, device, pool.num_devices, s.latency, s.block_size,
                                    max(longest, s.max_batch_tokens), max_batch_tokens=s.max_batch_tokens)

    def score_phase(self, phase: str, only=None) -> list[Scored]:
        """Goodput of the configurations of `phase`, best bound first; a configuration whose
        bound (with slack) is below the best goodput found is pruned."""
        s = self.spec
        rows = []
        for i in range(len(s.pools)):
            for c in self.candidates(i):
                if only is None or only(c):
                    bound = capacity_bound(c, phase.split("-")[0], s.workload, s.block_size,
                                           s.max_batch_tokens, s.max_batch_size, s.tpot_s)
                    rows.append(Scored(c, phase, i, bound))
        unit = lambda r: r.candidate.ranks * (r.candidate.device.cost_per_hour if self.by_cost else 1.0)
        rows.sort(key=lambda r: -r.bound / unit(r))
        best, fraction = 0.0, 0.7
        for r in rows:
            if r.bound * BOUND_SLACK[phase.split("-")[0]] / unit(r) < best:
                continue
            self.progress(f"{phase}: simulating {r.candidate.label}")
            g = candidate_goodput(r.candidate, "colocated" if phase.startswith("colocated") else phase,
                                  s.workload, s.block_size, self.kv_bytes, s.ttft_s, s.tpot_s, s.attainment,
                                  s.max_batch_tokens, s.max_batch_size, chunked=phase == "colocated-chunked",
                                  start_fraction=fraction)
            r.goodput = g.rate
            if g.rate > 0:      # configurations of a phase reach similar fractions of their bound
                fraction = min(1.0, g.rate / r.bound)
            best = max(best, r.per_unit(self.by_cost))
        self.scored[phase] = rows
        return rows

    def best(self, phase: str) -> Scored:
        rows = [r for r in self.scored[phase] if r.goodput]
        if not rows:
            raise ConfigError(f"no {phase} configuration meets the SLO at any rate; relax --ttft/--tpot "
                              "or use larger devices")
        return max(rows, key=lambda r: r.per_unit(self.by_cost))


def replica_counts(goodput_p: float, ranks_p: int, goodput_d: float, ranks_d: int,
                   rate: float | None, devices: int, devices_d: int | None = None) -> tuple[int, int] | None:
    """Prefill and decode instance counts (DistServe Alg. 1): with a target `rate`, enough of
    each to carry it; without, the split of the devices that maximises min(n_p g_p, n_d g_d).
    `devices_d` set means decode has a pool of its own. None when the devices cannot hold it."""
    if rate is not None:
        n_p, n_d = max(1, math.ceil(rate / goodput_p - 1e-9)), max(1, math.ceil(rate / goodput_d - 1e-9))
        if devices_d is None:
            return (n_p, n_d) if n_p * ranks_p + n_d * ranks_d <= devices else None
        return (n_p, n_d) if n_p * ranks_p <= devices and n_d * ranks_d <= devices_d else None
    if devices_d is not None:
        n_p, n_d = devices // ranks_p, devices_d // ranks_d
        return (n_p, n_d) if n_p and n_d else None
    best, best_rate = None, -1.0
    for n_p in range(1, devices // ranks_p + 1):
        n_d = (devices - n_p * ranks_p) // ranks_d
        if n_d >= 1 and min(n_p * goodput_p, n_d * goodput_d) > best_rate:
            best, best_rate = (n_p, n_d), min(n_p * goodput_p, n_d * goodput_d)
    return best


def best_split(opt: "Optimizer") -> "Choice | None":
    """Alg. 1 over every pair of simulated prefill and decode configurations: the most goodput
    per device (or per dollar) for the target rate, or from all the devices."""
    s = opt.spec
    best, best_key = None, -1.0
    for p in (r for r in opt.scored["prefill"] if r.goodput):
        for d in (r for r in opt.scored["decode"] if r.goodput):
            same = p.pool == d.pool
            counts = replica_counts(p.goodput, p.candidate.ranks, d.goodput, d.candidate.ranks, s.rate,
                                    s.pools[p.pool].num_devices, None if same else s.pools[d.pool].num_devices)
            if counts is None:
                continue
            c = Choice(p, d, *counts)
            rate = min(c.num_prefill * p.goodput, c.num_decode * d.goodput)
            key = rate / (c.cost_per_hour if opt.by_cost else c.num_devices)
            if key > best_key:
                best, best_key = c, key
    if best is not None:
        lay_out(best, s.pools)
    return best


@dataclass
class Choice:
    """A disaggregated plan under evaluation."""

    prefill: Scored
    decode: Scored
    num_prefill: int
    num_decode: int
    prefill_nodes: list[str] = field(default_factory=list)
    decode_nodes: list[str] = field(default_factory=list)
    paired: bool = False

    @property
    def num_devices(self) -> int:
        return self.num_prefill * self.prefill.candidate.ranks + self.num_decode * self.decode.candidate.ranks

    @property
    def cost_per_hour(self) -> float:
        p, d = self.prefill.candidate, self.decode.candidate
        return (self.num_prefill * p.ranks * p.device.cost_per_hour
                + self.num_decode * d.ranks * d.device.cost_per_hour)

    def deployment(self, spec: PlaceSpec) -> Deployment:
        p = self.prefill.candidate.group(self.num_prefill, "prefill_first", spec.max_batch_tokens,
                                         spec.max_batch_size, self.prefill_nodes or None)
        d = self.decode.candidate.group(self.num_decode, "prefill_first", spec.max_batch_tokens,
                                        spec.max_batch_size, self.decode_nodes or None)
        return Deployment(spec.block_size, spec.model.kv_bytes_per_token(), prefill=p, decode=d)


def lay_out(choice: Choice, pools: list[DevicePool]) -> None:
    """Node names per instance: prefill instances first, then decode, filling nodes in order
    (Alg. 1 does not pair; KV may cross nodes)."""
    used: dict[int, int] = {}
    for kind in ("prefill", "decode"):
        scored, count = getattr(choice, kind), getattr(choice, f"num_{kind}")
        pool = pools[scored.pool]
        ranks = scored.candidate.ranks
        nodes = []
        for _ in range(count):
            start = used.get(scored.pool, 0)
            nodes.append(f"{pool.device.name}:{start // pool.devices_per_node}")
            used[scored.pool] = start + ranks
        setattr(choice, f"{kind}_nodes", nodes)


def to_plan(spec: PlaceSpec, choice: Choice, predicted: dict) -> Plan:
    """The plan file for a choice; `predicted` carries the optimizer's numbers."""
    def phase(scored: Scored, count: int) -> PhaseConfig:
        c = scored.candidate
        cpu = c.device.device == "cpu"
        return PhaseConfig(num_instances=count, tp=c.tp, pp=c.pp, device=c.device.device,
                           gpu_type=c.device.name, num_gpus_per_rank=0.0 if cpu else 1.0,
                           max_batch_tokens=spec.max_batch_tokens, max_batch_size=spec.max_batch_size)
    return Plan(model=spec.model_name, mode="disaggregated", block_size=spec.block_size,
                prefill=phase(choice.prefill, choice.num_prefill), decode=phase(choice.decode, choice.num_decode),
                colocated=phase(choice.decode, choice.num_prefill + choice.num_decode),
                slo_ttft_s=spec.ttft_s, slo_tpot_s=spec.tpot_s, slo_attainment=spec.attainment,
                workload=spec.workload_name, predicted=predicted)


def evaluate(spec: PlaceSpec, choice: Choice) -> dict:
    """Whole-plan numbers: goodput by search on rate, attainment at the target rate."""
    dep = choice.deployment(spec)
    p, d = choice.prefill, choice.decode
    est = min(choice.num_prefill * p.goodput, choice.num_decode * d.goodput)
    cap = min(BOUND_SLACK["prefill"] * choice.num_prefill * p.bound,
              BOUND_SLACK["decode"] * choice.num_decode * d.bound) if p.bound and d.bound else float("inf")
    g = deployment_goodput(dep, spec.workload, spec.ttft_s, spec.tpot_s, spec.attainment,
                           start_rate=max(min(est, cap), 1e-3), max_rate=cap, step=1.25)
    out = {"goodput_rps": g.rate, "goodput_per_device": g.rate / choice.num_devices,
           "goodput_per_dollar_hour": g.rate / choice.cost_per_hour if choice.cost_per_hour else None,
           "num_devices": choice.num_devices, "cost_per_hour": choice.cost_per_hour,
           "estimated_rps": est}
    rate = spec.rate or g.rate
    if rate > 0:
        r = simulate(dep, spec.workload.at_rate(rate))
        out["attainment_at_rate"] = {"rate": rate, "attainment": r.attainment(spec.ttft_s, spec.tpot_s)}
    return out


def place(spec: PlaceSpec, progress=None) -> Plan:
    """Search and return the plan (see the module docstring)."""
    from placement.pairing import best_paired        # Alg. 2 lives beside Alg. 1
    t0 = time.perf_counter()
    opt = Optimizer(spec, progress)
    opt.score_phase("prefill")
    opt.score_phase("decode")
    opt.best("prefill"), opt.best("decode")          # a clear error when a phase cannot meet its SLO
    choice = best_split(opt)
    candidates = [("alg1", choice)] if choice is not None else []
    multi_node = any(pool.num_nodes > 1 for pool in spec.pools)
    if spec.pairing == "on" or (spec.pairing == "auto" and (multi_node or choice is None)):
        paired = best_paired(opt, spec)
        if paired is not None:
            candidates.append(("alg2", paired))
    if not candidates:
        raise ConfigError(f"the devices cannot carry rate {spec.rate} req/s within the SLO; lower --rate "
                          "or add devices (--gpu, --nodes)")
    opt.progress("simulating the whole plan")
    scored = [(name, c, evaluate(spec, c)) for name, c in candidates]
    key = "goodput_per_dollar_hour" if opt.by_cost else "goodput_per_device"
    name, choice, numbers = max(scored, key=lambda t: t[2][key] or 0.0)
    predicted = {
        "algorithm": name, "latency_model": spec.latency, "workload": spec.workload_name,
        "search_requests": spec.workload.num_requests, "target_rate": spec.rate,
        **numbers,
        "prefill": {**choice.prefill.row(), "num_instances": choice.num_prefill},
        "decode": {**choice.decode.row(), "num_instances": choice.num_decode},
        "layout": {"prefill": choice.prefill_nodes, "decode": choice.decode_nodes},
        "configs": [r.row() for ph in ("prefill", "decode") for r in opt.scored[ph]],
        "alternatives": {n: nums for n, _, nums in scored},
    }
    if spec.baselines:
        predicted["baselines"] = baselines(opt, numbers["num_devices"])
    predicted["search_time_s"] = time.perf_counter() - t0
    return to_plan(spec, choice, predicted)


def baselines(opt: Optimizer, num_devices: int) -> dict:
    """Best colocated configuration in each policy mode, scaled to the same device count."""
    out = {}
    for mode in ("prefill_first", "chunked"):
        phase = "colocated" if mode == "prefill_first" else "colocated-chunked"
        opt.score_phase(phase)
        b = opt.best(phase)
        n = max(1, num_devices // b.candidate.ranks)
        out[mode] = {**b.row(), "num_instances": n, "per_instance_goodput_rps": b.goodput,
                     "configs": [r.row() for r in opt.scored[phase]]}
    return out

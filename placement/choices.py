"""What a placement search works on: the devices, the request (`PlaceSpec`), scored instance
shapes, and the candidate plans of each kind (`Choice`: disaggregated; `ColocatedChoice`).

Kept apart from the search (optimizer.py, pairing.py) so that both algorithms import the same
types without importing each other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import ConfigError
from engine.model_config import ModelConfig
from placement.deployment import Deployment
from placement.gpus import DeviceSpec
from placement.search import Candidate
from placement.workload import Workload

OBJECTIVES = ("auto", "goodput", "cost")
# The kinds of plan the planner compares; the names are the report's system names.
KINDS = ("disaggregated", "colocated-prefill-first", "colocated-chunked")
SCHEDULE_OF = {"colocated-prefill-first": "prefill_first", "colocated-chunked": "chunked"}


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
    """What to plan for. `workload` is the (sub)sample the per-configuration searches simulate;
    `final_workload` the requests the final candidates are scored on, which should be what
    `disagg simulate` replays (None: `workload`)."""

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
    baselines: bool = False             # kept for old callers: colocated kinds are always searched
    kinds: tuple[str, ...] = KINDS
    objective: str = "auto"             # auto: per dollar when device prices differ, else per GPU
    final_workload: Workload | None = None
    chunk_tokens: int = 512

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
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"kinds must be among {', '.join(KINDS)}, got {', '.join(self.kinds) or 'none'}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")

    @property
    def by_cost(self) -> bool:
        if self.objective == "auto":
            return len({p.device.cost_per_hour for p in self.pools}) > 1
        return self.objective == "cost"

    @property
    def scoring_workload(self) -> Workload:
        return self.final_workload if self.final_workload is not None else self.workload


@dataclass
class Scored:
    """A candidate with its goodput (req/s of one instance) for one phase."""

    candidate: Candidate
    phase: str
    pool: int
    bound: float
    goodput: float | None = None        # None: pruned (its bound could not win) or cut short:
    goodput_below: float | None = None  # simulated until its goodput was shown to be below this

    def per_unit(self, cost: bool) -> float:
        unit = self.candidate.ranks * (self.candidate.device.cost_per_hour if cost else 1.0)
        return (self.goodput or 0.0) / unit

    def row(self) -> dict:
        c = self.candidate
        return {"phase": self.phase, "gpu_type": c.device.name, "tp": c.tp, "pp": c.pp,
                "num_kv_blocks": c.num_blocks, "capacity_bound_rps": self.bound,
                "goodput_rps": self.goodput, "goodput_per_device": None if self.goodput is None
                else self.goodput / c.ranks, "simulated": self.goodput is not None or self.goodput_below is not None,
                **({"goodput_below_rps": self.goodput_below} if self.goodput_below is not None else {})}


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
    kind = "disaggregated"

    @property
    def num_devices(self) -> int:
        return self.num_prefill * self.prefill.candidate.ranks + self.num_decode * self.decode.candidate.ranks

    @property
    def cost_per_hour(self) -> float:
        p, d = self.prefill.candidate, self.decode.candidate
        return (self.num_prefill * p.ranks * p.device.cost_per_hour
                + self.num_decode * d.ranks * d.device.cost_per_hour)

    @property
    def estimate(self) -> float:
        """Rate the phases' single-instance goodputs promise (Alg. 1)."""
        return min(self.num_prefill * (self.prefill.goodput or 0.0), self.num_decode * (self.decode.goodput or 0.0))

    @property
    def config(self) -> str:
        p, d = self.prefill.candidate, self.decode.candidate
        gpus = p.device.name if p.device.name == d.device.name else f"{p.device.name}/{d.device.name}"
        return (f"{self.num_prefill} x prefill tp{p.tp} pp{p.pp} + {self.num_decode} x decode "
                f"tp{d.tp} pp{d.pp} ({gpus})")

    def deployment(self, spec: PlaceSpec) -> Deployment:
        p = self.prefill.candidate.group(self.num_prefill, "prefill_first", spec.max_batch_tokens,
                                         spec.max_batch_size, self.prefill_nodes or None)
        d = self.decode.candidate.group(self.num_decode, "prefill_first", spec.max_batch_tokens,
                                        spec.max_batch_size, self.decode_nodes or None)
        return Deployment(spec.block_size, spec.model.kv_bytes_per_token(), prefill=p, decode=d)

    def with_counts(self, pools: list[DevicePool], num_prefill: int, num_decode: int) -> "Choice":
        c = Choice(self.prefill, self.decode, num_prefill, num_decode, paired=self.paired)
        lay_out(c, pools)
        return c


@dataclass
class ColocatedChoice:
    """`num_instances` colocated instances of one shape, scheduling `schedule`."""

    scored: Scored
    num_instances: int
    schedule: str                       # prefill_first | chunked
    nodes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "colocated-chunked" if self.schedule == "chunked" else "colocated-prefill-first"

    @property
    def num_devices(self) -> int:
        return self.num_instances * self.scored.candidate.ranks

    @property
    def cost_per_hour(self) -> float:
        return self.num_devices * self.scored.candidate.device.cost_per_hour

    @property
    def estimate(self) -> float:
        return self.num_instances * (self.scored.goodput or 0.0)

    @property
    def config(self) -> str:
        c = self.scored.candidate
        return f"{self.num_instances} x colocated tp{c.tp} pp{c.pp} ({self.schedule}, {c.device.name})"

    def deployment(self, spec: PlaceSpec) -> Deployment:
        g = self.scored.candidate.group(self.num_instances, self.schedule, spec.max_batch_tokens,
                                        spec.max_batch_size, self.nodes or None)
        g.chunk_tokens = spec.chunk_tokens
        return Deployment(spec.block_size, spec.model.kv_bytes_per_token(), colocated=g)


def colocated_count(goodput: float, ranks: int, devices: int, rate: float | None) -> int | None:
    """Instances of one colocated shape: enough for `rate`, or as many as the devices hold."""
    most = devices // ranks
    if rate is None:
        return most or None
    n = max(1, math.ceil(rate / goodput - 1e-9)) if goodput > 0 else most + 1
    return n if n <= most else None


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

"""What the simulator simulates: instance groups with their latency models, KV memory and
node placement, built from a plan file (or by the optimizer directly)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from engine.errors import ConfigError
from engine.model_config import ModelConfig, load_model_config
from engine.plan import PhaseConfig, Plan
from placement.gpus import DeviceSpec, get_device
from placement.latency import LatencyModel, Link, RooflineModel
from placement.memory import num_kv_blocks
from placement.latency_profile import ProfiledModel, load_profile

POLICY_MODES = ("prefill_first", "chunked")


@dataclass
class InstanceGroup:
    """`num_instances` identical instances of one phase. `nodes[i]` names the node instance i
    sits on ("H100:0"); instances on one node move KV over NVLink. `mode` is the
    ColocatedPolicy mode for decode and colocated instances."""

    num_instances: int
    latency: LatencyModel
    device: DeviceSpec
    num_blocks: int
    max_batch_tokens: int = 8192
    max_batch_size: int = 256
    nodes: list[str] = field(default_factory=list)
    mode: str = "prefill_first"
    chunk_tokens: int = 512

    def __post_init__(self):
        if self.num_instances < 1 or self.num_blocks < 1:
            raise ConfigError(f"an instance group needs >= 1 instance and >= 1 KV block, "
                              f"got {self.num_instances} and {self.num_blocks}")
        if self.mode not in POLICY_MODES:
            raise ConfigError(f"mode must be one of {POLICY_MODES}, got {self.mode!r}")
        if not self.nodes:
            self.nodes = pack_nodes(self.device, self.num_instances, self.ranks)

    @property
    def ranks(self) -> int:
        return self.latency.tp * self.latency.pp

    @property
    def num_devices(self) -> int:
        return self.num_instances * self.ranks


@dataclass
class Deployment:
    """Either `prefill` + `decode` (disaggregated) or `colocated`.

    `shared` pairs (prefill instance, decode instance) that run on the same GPUs (a plan whose
    ranks take fractions of a GPU, e.g. 1P + 1D at 0.5 GPU each over CUDA IPC). The two time-
    slice the device: while both are busy the prefill runs at `shared_speeds[0]` and the decode
    at `shared_speeds[1]` of their own models' speeds (processes without MPS never run kernels
    at the same time, so the two add up to about 1; (0.5, 0.5) is an even split, and
    benchmarks/fidelity.py measures the split on a running cluster). `shared_speed_table`, when
    given, replaces that scalar split by one that follows the decode's current batch: rows
    `(decode_batch, prefill_speed, decode_speed)`, interpolated (placement.serving.speeds_at)."""

    block_size: int
    kv_bytes_per_token: int
    prefill: InstanceGroup | None = None
    decode: InstanceGroup | None = None
    colocated: InstanceGroup | None = None
    shared: list[tuple[int, int]] = field(default_factory=list)
    shared_speeds: tuple[float, float] = (0.5, 0.5)
    shared_speed_table: tuple[tuple[float, float, float], ...] | None = None

    def __post_init__(self):
        if (self.prefill is None) != (self.decode is None):
            raise ConfigError("a deployment needs both prefill and decode groups or neither")
        if self.colocated is None and self.prefill is None:
            raise ConfigError("a deployment needs prefill and decode groups, or a colocated group")
        if self.shared:
            if self.prefill is None:
                raise ConfigError("shared devices pair prefill and decode instances; a colocated "
                                  "deployment has none")
            ps = [p for p, _ in self.shared]
            ds = [d for _, d in self.shared]
            if len(set(ps)) != len(ps) or len(set(ds)) != len(ds) \
                    or not all(0 <= p < self.prefill.num_instances for p in ps) \
                    or not all(0 <= d < self.decode.num_instances for d in ds):
                raise ConfigError(f"shared pairs must name distinct prefill and decode instances "
                                  f"that exist, got {self.shared}")
            if self.prefill.ranks != self.decode.ranks:
                raise ConfigError("instances sharing devices need the same tp x pp on both sides")
        if len(self.shared_speeds) != 2 or not all(0 < v <= 1 for v in self.shared_speeds):
            raise ConfigError(f"shared_speeds must be two speeds in (0, 1] (prefill, decode), "
                              f"got {self.shared_speeds}")
        if self.shared_speed_table is not None:
            from placement.serving import check_speed_table, speed_table
            self.shared_speed_table = speed_table(self.shared_speed_table)
            check_speed_table(self.shared_speed_table, "shared_speed_table")

    @property
    def disaggregated(self) -> bool:
        return self.colocated is None

    @property
    def mixed(self) -> bool:
        """A colocated pool beside prefill and decode pools."""
        return self.colocated is not None and self.prefill is not None and self.decode is not None

    @property
    def num_devices(self) -> int:
        groups = [g for g in (self.colocated, self.prefill, self.decode) if g is not None]
        shared = len(self.shared) * self.prefill.ranks if self.shared else 0
        return sum(g.num_devices for g in groups) - shared

    def link(self, prefill_index: int, decode_index: int) -> Link:
        """The link from prefill instance i to decode instance j."""
        p, d = self.prefill, self.decode
        same = p.nodes[prefill_index] == d.nodes[decode_index]
        if same:
            bw, lat = p.device.link(True)
        else:
            bw = min(p.device.inter_node_bandwidth, d.device.inter_node_bandwidth)
            lat = max(p.device.inter_node_latency_s, d.device.inter_node_latency_s)
        return Link(bw, lat, same, max(1, min(p.ranks, d.ranks)))


def pack_nodes(device: DeviceSpec, num_instances: int, ranks: int, first_node: int = 0) -> list[str]:
    """Fill nodes in order: instance i goes on the node where its first rank lands."""
    per_node = device.devices_per_node
    return [f"{device.name}:{first_node + (i * ranks) // per_node}" for i in range(num_instances)]


def make_latency(latency: str, model: ModelConfig, device: DeviceSpec, tp: int, pp: int) -> LatencyModel:
    """"roofline" or the path of a profile JSON."""
    if latency == "roofline":
        return RooflineModel(model, device, tp, pp)
    return ProfiledModel(load_profile(latency), tp, pp)


def group_from_phase(phase: PhaseConfig, model: ModelConfig, block_size: int, latency: str,
                     mode: str = "prefill_first", nodes: list[str] | None = None) -> InstanceGroup:
    """An instance group for one phase of a plan; KV blocks from the plan or from memory."""
    device = get_device(phase.gpu_type or ("cpu" if phase.device == "cpu" else "H100"))
    blocks = phase.num_kv_blocks or num_kv_blocks(
        model, device, phase.tp, phase.pp, block_size, phase.gpu_memory_utilization,
        phase.max_batch_tokens)
    if blocks < 1:
        raise ConfigError(f"{model.name or 'the model'} with tp={phase.tp} pp={phase.pp} does not fit "
                          f"in {device.name} memory; use more devices per instance")
    lat = make_latency(latency, model, device, phase.tp, phase.pp)
    return InstanceGroup(phase.num_instances, lat, device, blocks, phase.max_batch_tokens,
                         phase.max_batch_size, nodes or [], mode, phase.chunk_tokens)


def deployment_from_plan(plan: Plan, latency: str = "roofline", colocated_mode: str | None = None,
                         model: ModelConfig | None = None) -> Deployment:
    """The deployment a plan describes. Node placement comes from plan.predicted["layout"]
    when the optimizer wrote one, else instances are packed onto nodes prefill first (a mixed
    plan's colocated pool first). Colocated instances schedule as `plan.colocated.schedule`
    unless `colocated_mode` says otherwise."""
    model = model or load_model_config(plan.model)
    layout = plan.predicted.get("layout", {}) if isinstance(plan.predicted, dict) else {}
    kv = model.kv_bytes_per_token(None if plan.dtype == "auto" else plan.dtype)
    colocated = None
    if plan.mode in ("colocated", "mixed"):
        colocated = group_from_phase(plan.colocated, model, plan.block_size, latency,
                                     colocated_mode or plan.colocated.schedule, layout.get("colocated"))
    if plan.mode == "colocated":
        return Deployment(plan.block_size, kv, colocated=colocated)
    p = group_from_phase(plan.prefill, model, plan.block_size, latency, "prefill_first",
                         layout.get("prefill"))
    if colocated is not None and not layout.get("prefill") and p.device.name == colocated.device.name:
        first = colocated.num_devices
        p.nodes = [f"{p.device.name}:{(first + i * p.ranks) // p.device.devices_per_node}"
                   for i in range(p.num_instances)]
    d = group_from_phase(plan.decode, model, plan.block_size, latency, "prefill_first",
                         layout.get("decode"))
    shared = shared_pairs(plan)
    if shared:
        d.nodes = [p.nodes[i] for i in range(d.num_instances)]      # pair i on pair i's GPUs
    elif not layout.get("decode") and d.device.name == p.device.name:
        # Decode instances continue on the nodes after the prefill instances' devices.
        used = p.num_devices + (colocated.num_devices if colocated is not None
                                and colocated.device.name == p.device.name else 0)
        d.nodes = [f"{d.device.name}:{(used + i * d.ranks) // d.device.devices_per_node}"
                   for i in range(d.num_instances)]
    # A calibrated profile carries the speeds measured on the shared GPU (placement/serving.py).
    terms = getattr(p.latency, "serving", None)
    speeds = terms.shared_speeds if shared and terms is not None and terms.shared_speeds else (0.5, 0.5)
    table = terms.shared_speeds_by_batch if shared and terms is not None else None
    return Deployment(plan.block_size, kv, prefill=p, decode=d, colocated=colocated, shared=shared,
                      shared_speeds=speeds, shared_speed_table=table)


def shared_pairs(plan: Plan) -> list[tuple[int, int]]:
    """Prefill and decode instances that share GPUs in a plan: both phases on CUDA, ranks taking
    fractions that fit on one GPU together, as many instances with the same tp x pp on each
    side (Ray then packs prefill instance i with decode instance i). Empty otherwise."""
    p, d = plan.prefill, plan.decode
    if plan.mode != "disaggregated" or p.device != "cuda" or d.device != "cuda":
        return []
    if not (p.num_gpus_per_rank < 1 and d.num_gpus_per_rank < 1
            and p.num_gpus_per_rank + d.num_gpus_per_rank <= 1 + 1e-9):
        return []
    if p.num_instances != d.num_instances or p.ranks_per_instance != d.ranks_per_instance:
        return []
    return [(i, i) for i in range(p.num_instances)]


def with_instances(group: InstanceGroup, num_instances: int) -> InstanceGroup:
    """The same group with another instance count (nodes re-packed)."""
    return replace(group, num_instances=num_instances, nodes=[])

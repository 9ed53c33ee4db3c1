"""Instances of a plan as Ray actors: one actor per rank, packed by a placement group, in any
role (colocated, prefill, decode); and the KV channels between every prefill and decode
instance."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actors import remote_class
from engine.errors import ConfigError
from engine.plan import PhaseConfig, Plan
from kv_transfer.shard_plan import Layout
from kv_transfer.transports import choose
from model.rank_runtime import WorkerConfig


@dataclass
class Instance:
    instance_id: str
    role: str
    phase: PhaseConfig
    layout: Layout
    ranks: list = field(default_factory=list)
    pg: object = None
    num_blocks: int = 0
    max_model_len: int = 0
    node_ids: list = field(default_factory=list)
    gpu_uuids: list = field(default_factory=list)
    alive: bool = True
    draining: bool = False      # changing role: takes no new work (cluster/roles.py)

    @property
    def routable(self) -> bool:
        """Admission may give it new work."""
        return self.alive and not self.draining

    @property
    def driver(self):
        return self.ranks[0]


def worker_config(plan: Plan, phase: PhaseConfig, instance_id: str, rank: int) -> WorkerConfig:
    return WorkerConfig(
        instance_id=instance_id, model=plan.model, device=phase.device, dtype=plan.dtype, tp=phase.tp,
        pp=phase.pp, rank=rank, block_size=plan.block_size, num_kv_blocks=phase.num_kv_blocks,
        gpu_memory_utilization=phase.gpu_memory_utilization,
        gpu_share=phase.num_gpus_per_rank if phase.device == "cuda" else 1.0,
        max_batch_tokens=phase.max_batch_tokens, max_batch_size=phase.max_batch_size,
        max_model_len=plan.max_model_len, enable_prefix_caching=plan.enable_prefix_caching,
        kv_timeout_s=plan.kv_transfer_timeout_s, kv_layer_groups=4 if plan.layerwise_transfer else 1,
        torch_threads=phase.torch_threads, max_queue=phase.max_queue, schedule=phase.schedule,
        chunk_tokens=phase.chunk_tokens, async_scheduling=phase.async_scheduling)


async def create_instance(plan: Plan, role: str, index: int, phase: PhaseConfig, num_layers: int,
                          num_kv_heads: int, actor_cls: type | None = None, instance_id: str | None = None) -> Instance:
    """Start one instance of `role` (its ranks as `actor_cls` actors, RankActor by default),
    named `role-index` unless `instance_id` is given (a restart keeps the id, which stays
    the same across role changes)."""
    if phase.pp != 1:
        raise ConfigError(f"{role}: pipeline parallelism (pp={phase.pp}) is planned and simulated but not "
                          "run by the runtime yet; use pp=1")
    if num_kv_heads % phase.tp:
        raise ConfigError(f"{role}: tp={phase.tp} must divide the model's {num_kv_heads} KV heads")
    inst = Instance(instance_id or f"{role}-{index}", role, phase, Layout(phase.tp, phase.pp, num_layers, num_kv_heads))
    world = phase.tp * phase.pp
    gpus = phase.num_gpus_per_rank if phase.device == "cuda" else 0
    cpus = max(phase.num_cpus_per_rank, 0.001)
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    inst.pg = placement_group([dict(bundle) for _ in range(world)], strategy="STRICT_PACK" if world > 1 else "PACK")
    try:
        await asyncio.wait_for(inst.pg.ready(), timeout=120)
    except asyncio.TimeoutError:
        remove_placement_group(inst.pg)
        raise ConfigError(f"{inst.instance_id}: the Ray cluster cannot place {world} x {bundle} "
                          f"(available: {ray.available_resources()})") from None
    for r in range(world):
        strategy = PlacementGroupSchedulingStrategy(inst.pg, placement_group_bundle_index=r)
        inst.ranks.append(remote_class(actor_cls).options(scheduling_strategy=strategy, num_cpus=cpus, num_gpus=gpus).remote(
            role, worker_config(plan, phase, inst.instance_id, r)))
    try:
        tp_addr = await inst.ranks[0].open_tp.remote() if world > 1 else None
        infos = await asyncio.gather(*[a.init.remote(tp_addr) for a in inst.ranks])
    except Exception as e:  # noqa: BLE001 - a worker could not start: one clear line, nothing left behind
        await shutdown_instance(inst)
        cause = getattr(e, "cause", None) or e
        raise ConfigError(f"{inst.instance_id}: a worker failed to start: {type(cause).__name__}: "
                          f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}") from None
    inst.num_blocks = infos[0]["num_blocks"]
    inst.max_model_len = infos[0]["max_model_len"]
    inst.node_ids = [i["node_id"] for i in infos]
    inst.gpu_uuids = [i["gpu_uuid"] for i in infos]
    await asyncio.gather(*[a.start_loop.remote() for a in inst.ranks])
    return inst


def choose_transport(requested: str, p: Instance, d: Instance) -> str:
    """The KV transport between prefill instance p and decode instance d, from what each
    registered transport can do (kv_transfer/transports.py): gloo on CPU, cuda_ipc when the two
    share a GPU (NCCL refuses two ranks on one GPU), NCCL between distinct GPUs."""
    devices = {p.phase.device, d.phase.device}
    if len(devices) != 1:
        raise ConfigError("prefill and decode must both run on CPU or both on CUDA")
    shared = bool((set(p.gpu_uuids) & set(d.gpu_uuids)) - {None})
    same_node = set(p.node_ids) == set(d.node_ids) and len(set(p.node_ids)) == 1
    return choose(requested, devices.pop(), shared, same_node).name


async def connect_pair(p: Instance, d: Instance, epoch: int, kind: str) -> None:
    """(Re)build every channel between prefill instance p and decode instance d."""
    addrs = await asyncio.gather(*[r.open_kv.remote(d.instance_id, d.layout, epoch, kind) for r in p.ranks])
    per_dst: dict[int, dict] = {i: {} for i in range(len(d.ranks))}
    for src, a in enumerate(addrs):
        for dst, addr in a.items():
            per_dst[int(dst)][src] = addr
    await asyncio.gather(
        *[r.connect_kv_sender.remote(d.instance_id) for r in p.ranks],
        *[r.connect_kv_receiver.remote(p.instance_id, p.layout, epoch, per_dst[i]) for i, r in enumerate(d.ranks)])


async def shutdown_instance(inst: Instance) -> None:
    try:
        await asyncio.wait_for(asyncio.gather(*[r.shutdown.remote() for r in inst.ranks], return_exceptions=True), 20)
    except asyncio.TimeoutError:
        pass
    for r in inst.ranks:
        ray.kill(r, no_restart=True)
    if inst.pg is not None:
        remove_placement_group(inst.pg)


class Pools:
    """The plan's instances by role (colocated, prefill, decode) and the KV channels between
    every prefill and every decode instance, each under an epoch that a rebuild bumps."""

    ROLES = ("colocated", "prefill", "decode")

    def __init__(self, plan: Plan, model_config, actor_cls: type | None = None):
        self.plan, self.model_config, self.actor_cls = plan, model_config, actor_cls
        self._by_role: dict[str, list[Instance]] = {r: [] for r in self.ROLES}
        self.epochs: dict[tuple[str, str], int] = {}
        self.transports: dict[tuple[str, str], str] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def of(self, role: str) -> list[Instance]:
        return self._by_role[role]

    @property
    def all(self) -> list[Instance]:
        return [i for r in self.ROLES for i in self._by_role[r]]

    def peers(self, inst: Instance) -> list[Instance]:
        """The instances `inst` has KV channels with."""
        return {"prefill": self.of("decode"), "decode": self.of("prefill")}.get(inst.role, [])

    async def create(self, role: str, index: int, instance_id: str | None = None,
                     phase: PhaseConfig | None = None) -> Instance:
        """A new instance; a restart passes the old one's id and phase (after a role change
        they are those it started with, not the ones its role's name suggests)."""
        mc = self.model_config
        return await create_instance(self.plan, role, index, phase or self.plan.phases[role], mc.num_layers,
                                     mc.num_kv_heads, self.actor_cls, instance_id)

    def move(self, inst: Instance, role: str) -> None:
        """`inst` now serves `role` (its actors already switched)."""
        self._by_role[inst.role].remove(inst)
        inst.role = role
        self._by_role[role].append(inst)

    async def disconnect(self, inst: Instance) -> None:
        """Close the peers' side of every channel with `inst` (which closes its own side itself)."""
        peers = self.peers(inst)
        for p in peers:
            self.transports.pop((inst.instance_id, p.instance_id) if inst.role == "prefill"
                                else (p.instance_id, inst.instance_id), None)
        await asyncio.gather(*[r.drop_kv.remote(inst.instance_id) for p in peers if p.alive for r in p.ranks],
                             return_exceptions=True)

    async def connect_all(self, inst: Instance) -> None:
        """Channels between `inst` and every live peer of its (new) role."""
        await asyncio.gather(*[self.connect(inst, d) if inst.role == "prefill" else self.connect(d, inst)
                               for d in self.peers(inst) if d.alive])

    async def start(self) -> None:
        """Every instance of the plan, and their channels; nothing left running on failure."""
        roles = [(role, i) for role, phase in self.plan.phases.items() for i in range(phase.num_instances)]
        made = await asyncio.gather(*[self.create(role, i) for role, i in roles], return_exceptions=True)
        failed = [m for m in made if isinstance(m, BaseException)]
        if failed:
            await asyncio.gather(*[shutdown_instance(m) for m in made if isinstance(m, Instance)],
                                 return_exceptions=True)
            raise failed[0]
        for inst in made:
            self._by_role[inst.role].append(inst)
        try:
            await asyncio.gather(*[self.connect(p, d) for p in self.of("prefill") for d in self.of("decode")])
        except BaseException:
            await self.shutdown()
            raise

    async def connect(self, p: Instance, d: Instance) -> None:
        """(Re)build the channels between prefill instance p and decode instance d."""
        key = (p.instance_id, d.instance_id)
        self.transports[key] = choose_transport(self.plan.kv_transport, p, d)
        self.epochs[key] = self.epochs.get(key, -1) + 1
        await connect_pair(p, d, self.epochs[key], self.transports[key])

    def lock(self, p: Instance, d: Instance) -> asyncio.Lock:
        """Held while the channels of (p, d) are rebuilt: one rebuild at a time."""
        return self._locks.setdefault((p.instance_id, d.instance_id), asyncio.Lock())

    async def shutdown(self) -> None:
        await asyncio.gather(*[shutdown_instance(i) for i in self.all], return_exceptions=True)

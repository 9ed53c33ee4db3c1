"""The one builder of an instance's rank: its model shard, KV cache, runner, sampler and
tokenizer, and the way rank 0 hands each step to its tensor-parallel peers (a broadcast on a
CPU gloo group).

Every role (model/instance.py: colocated; prefill_worker/, decode_worker/), the in-process `LLM`
and the profiler build their rank with it; none needs Ray to run.
"""
from __future__ import annotations

import datetime
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from kv_transfer.shard_plan import Layout
from model.kv_cache import allocate_kv_cache, num_blocks_for_memory
from model.llama import TPContext
from model.loader import build_model, model_context_len
from model.runner import ModelRunner
from model.sampler import Sampler
from model.tokenizer import load_tokenizer


@dataclass
class WorkerConfig:
    """Everything a rank needs to build itself (picklable: sent to Ray actors)."""
    instance_id: str
    model: str = "embedded"
    device: str = "cpu"
    dtype: str = "auto"
    tp: int = 1
    pp: int = 1
    rank: int = 0
    block_size: int = 16
    num_kv_blocks: int = 0
    gpu_memory_utilization: float = 0.85
    gpu_share: float = 1.0
    max_batch_tokens: int = 4096
    max_batch_size: int = 64
    max_model_len: int = 0
    enable_prefix_caching: bool = True
    max_queue: int = 1024             # waiting requests before new ones are refused (overload)
    schedule: str = "prefill_first"   # colocated role: "prefill_first" or "chunked"
    chunk_tokens: int = 512           # chunked schedule: tokens per step, decodes included
    kv_timeout_s: float = 30.0
    kv_layer_groups: int = 4          # messages per piece: > 1 overlaps sending with compute
    torch_threads: int = 0
    seed: int = 0
    dummy_seed: int = 0
    # Async scheduling (model/async_step.py): None = DISAGG_ASYNC_SCHEDULING, else on for CUDA.
    async_scheduling: bool | None = None


class LayerProgress:
    """Set by the model's layer hook; KV sender threads wait on it (layer-wise transfer)."""

    def __init__(self, first_layer: int, device: torch.device):
        self.first_layer, self.device = first_layer, device
        self.done = first_layer
        self.failed: str | None = None
        self._events: dict[int, object] = {}
        self._cv = threading.Condition()

    def mark(self, local_layer: int) -> None:
        ev = None
        if self.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
        with self._cv:
            self.done = self.first_layer + local_layer + 1
            self._events[self.done] = ev
            self._cv.notify_all()

    def fail(self, why: str) -> None:
        with self._cv:
            self.failed = why
            self._cv.notify_all()

    def wait(self, num_layers: int, timeout_s: float = 600.0) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: self.done >= num_layers or self.failed, timeout_s):
                raise TimeoutError(f"layer {num_layers} not computed within {timeout_s} s")
            if self.failed and self.done < num_layers:
                raise RuntimeError(f"prefill failed before layer {num_layers}: {self.failed}")
            ev = next((self._events[k] for k in sorted(self._events) if k >= num_layers), None)
        if ev is not None:
            ev.synchronize()


class RankRuntime:
    """One rank's model shard, KV cache, runner and sampler. A role change (cluster/actors.py
    `RankActor.change_role`) builds the new role's worker over the same RankRuntime."""

    num_built = 0       # runtimes built (weights loaded) in this process: a role change adds none

    def __init__(self, cfg: WorkerConfig, tp_group=None, ctrl_group=None):
        from model.embedded import resolve_model_source
        RankRuntime.num_built += 1
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        if cfg.pp != 1:
            from engine.errors import ConfigError
            raise ConfigError("pipeline parallelism (pp > 1) is planned and simulated but not run by "
                              "the runtime yet; use pp=1")
        self.cfg = cfg
        self.device = torch.device(cfg.device if cfg.device != "cuda" else "cuda:0")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        source = resolve_model_source(cfg.model)
        self.tp = TPContext(cfg.rank % cfg.tp, cfg.tp, tp_group)
        self.ctrl_group = ctrl_group
        self.model = build_model(source, device=str(self.device), dtype=cfg.dtype, tp=self.tp,
                                 dummy_seed=cfg.dummy_seed, max_positions=cfg.max_model_len)
        mc = self.model.cfg
        self.model_config = mc
        self.max_model_len = model_context_len(mc, cfg.max_model_len)
        self.layout = Layout(cfg.tp, cfg.pp, mc.num_layers, mc.num_kv_heads)
        dt = next(self.model.parameters()).dtype
        kv_heads = mc.num_kv_heads // cfg.tp
        nb = cfg.num_kv_blocks or num_blocks_for_memory(
            mc, cfg.block_size, mc.num_layers, kv_heads, dt, str(self.device), cfg.gpu_memory_utilization,
            cfg.gpu_share, cfg.max_batch_tokens, cfg.tp)
        if cfg.tp > 1 and not cfg.num_kv_blocks:
            # Every rank must agree on the block count (rank 0's block tables index all ranks).
            t = torch.tensor([nb], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.ctrl_group)
            nb = int(t.item())
        self.num_blocks = nb
        # A request can never hold more tokens than the cache: it ends with "length" there.
        self.max_model_len = min(self.max_model_len, nb * cfg.block_size)
        self.kv_cache = allocate_kv_cache(mc.num_layers, nb, cfg.block_size, kv_heads, mc.head_dim, dt, self.device)
        self.runner = ModelRunner(self.model, self.kv_cache, cfg.block_size)
        self.sampler = Sampler(str(self.device), cfg.seed)
        folder = Path(source) if Path(source).is_dir() else None
        self.tokenizer = load_tokenizer(folder, mc.bos_token_id, mc.eos_token_id)

    def sample(self, logits, requests) -> tuple[list[int], list]:
        """One token per request, in order, and its logprobs entry (None unless asked for)."""
        return self.sampler.sample_requests(logits, requests)

    @property
    def is_driver(self) -> bool:
        return self.cfg.rank == 0

    def broadcast(self, msg):
        """Rank 0 sends `msg` to its peers; peers pass None and get rank 0's message."""
        if self.cfg.tp * self.cfg.pp == 1:
            return msg
        box = [msg]
        dist.broadcast_object_list(box, src=0, group=self.ctrl_group)
        return box[0]

    def fingerprint(self) -> dict:
        """Where the weights and the KV cache live, and how many runtimes this process built:
        equal before and after a role change when nothing was reloaded or reallocated."""
        return {"num_built": RankRuntime.num_built, "runtime_id": id(self),
                "weight_ptrs": [p.data_ptr() for p in self.model.parameters()],
                "kv_cache_ptr": self.kv_cache.data_ptr(), "pid": os.getpid()}

    def stats(self) -> dict:
        out = {"rank": self.cfg.rank, "num_blocks": self.num_blocks, "device": str(self.device),
               "pid": os.getpid(), "rss_bytes": rss_bytes()}
        if self.device.type == "cuda":
            out["gpu_memory_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
        return out


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc), 0 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def init_tp_group(cfg: WorkerConfig, host: str, port: int, master_store=None):
    """The instance's world (one rank per process): gloo on CPU, NCCL on GPU, plus a gloo group
    for control messages. Returns (tp_group, ctrl_group); (None, None) when tp * pp == 1."""
    world = cfg.tp * cfg.pp
    if world == 1:
        return None, None
    store = master_store or dist.TCPStore(host, port, world, False, timeout=datetime.timedelta(seconds=120))
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    # Idle instances must not time out waiting for the next step broadcast.
    dist.init_process_group(backend, store=store, rank=cfg.rank, world_size=world,
                            timeout=datetime.timedelta(days=7))
    tp_group = dist.group.WORLD
    ctrl = tp_group if backend == "gloo" else dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    return tp_group, ctrl

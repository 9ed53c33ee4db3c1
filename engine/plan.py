"""The plan: what `disagg place` writes, `disagg simulate` replays and `disagg serve` deploys.

Flat dataclasses, one level of nesting, validated in __post_init__; read from JSON or YAML.
The plan that was simulated is the plan that runs.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ConfigError
from engine.routing import ROUTINGS

DEVICES = ("cpu", "cuda")
TRANSPORTS = ("auto", "gloo", "nccl", "cuda_ipc")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODES = ("disaggregated", "colocated", "mixed")
SCHEDULES = ("prefill_first", "chunked")


@dataclass
class PhaseConfig:
    """Instances of one phase (prefill, decode, or colocated). Each instance is tp x pp ranks,
    one Ray actor per rank."""

    num_instances: int = 1
    tp: int = 1
    pp: int = 1
    device: str = "cpu"
    gpu_type: str = ""             # for planning and reports, e.g. "H100"
    num_gpus_per_rank: float = 1.0  # < 1 lets several ranks share one GPU (CUDA IPC transport)
    num_cpus_per_rank: float = 0.0  # Ray CPU resource per rank; 0 packs any number on a laptop
    torch_threads: int = 0          # intra-op threads per rank on CPU; 0 = torch default
    max_batch_tokens: int = 4096    # prefill token budget per step
    max_batch_size: int = 64        # requests per step
    num_kv_blocks: int = 0          # 0 = size the cache from memory
    gpu_memory_utilization: float = 0.85
    max_queue: int = 1024           # requests waiting in this phase before new ones are refused
    schedule: str = "prefill_first"  # colocated instances: "prefill_first" or "chunked"
    chunk_tokens: int = 512         # chunked schedule: prompt tokens per step beside the decodes
    # Async scheduling of colocated and decode instances (model/async_step.py): true/false, or
    # null for the default (DISAGG_ASYNC_SCHEDULING in the workers' environment, else on for CUDA).
    async_scheduling: bool | None = None

    def __post_init__(self):
        _positive(self, "num_instances", "tp", "pp", "max_batch_tokens", "max_batch_size", "max_queue")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.num_kv_blocks < 0:
            raise ConfigError(f"num_kv_blocks must be >= 0, got {self.num_kv_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ConfigError(f"async_scheduling must be true, false or null, got {self.async_scheduling!r}")
        if self.chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")
        if self.num_gpus_per_rank < 0 or self.num_cpus_per_rank < 0 or self.torch_threads < 0:
            raise ConfigError("num_gpus_per_rank, num_cpus_per_rank and torch_threads must be >= 0")

    @property
    def ranks_per_instance(self) -> int:
        return self.tp * self.pp

    @property
    def gpu_fraction(self) -> float:
        """GPUs this phase takes (fractional when ranks share a GPU)."""
        if self.device != "cuda":
            return 0.0
        return self.num_instances * self.ranks_per_instance * self.num_gpus_per_rank


@dataclass
class Plan:
    """A whole deployment. mode="disaggregated" uses `prefill` and `decode`; mode="colocated"
    runs `colocated` instances that do both phases; mode="mixed" runs a colocated pool beside a
    prefill/decode pool, behind one controller. `verdict` is what `disagg place` decided and why
    (the best candidate of each kind, the margin, the runner-up)."""

    model: str = "embedded"
    mode: str = "disaggregated"
    dtype: str = "auto"
    block_size: int = 16
    max_model_len: int = 0          # 0 = the model's own limit
    prefill: PhaseConfig = field(default_factory=PhaseConfig)
    decode: PhaseConfig = field(default_factory=PhaseConfig)
    colocated: PhaseConfig = field(default_factory=PhaseConfig)
    kv_transport: str = "auto"
    kv_transfer_timeout_s: float = 30.0
    layerwise_transfer: bool = True
    enable_prefix_caching: bool = True
    # Prefill instance choice: "prefix" weighs the expected prefix-cache hit against queued
    # tokens (engine/routing.py); "load" looks at queued tokens only.
    routing: str = "prefix"
    # Restart budget of each instance: at most max_restarts restarts within any restart_window_s;
    # past it the instance is down until the window allows another. Restarts that fail and
    # repeated crashes wait restart_backoff_s, doubling each time (at most 60 s).
    max_restarts: int = 5
    restart_window_s: float = 600.0
    restart_backoff_s: float = 1.0
    slo_ttft_s: float = 0.0         # the SLO the plan was made for (0 = none)
    slo_tpot_s: float = 0.0
    slo_attainment: float = 0.9
    workload: str = ""
    # Online re-planning (`disagg serve --replan auto`) may change instances' roles; false opts
    # this plan out (placement/replan.py says which plans allow it).
    replan: bool = True
    predicted: dict = field(default_factory=dict)   # the optimizer's numbers, for the report
    verdict: dict = field(default_factory=dict)     # the planner's choice of kind, with runner-up

    def __post_init__(self):
        for name in ("prefill", "decode", "colocated"):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(PhaseConfig, value, f"plan.{name}"))
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.kv_transport not in TRANSPORTS:
            raise ConfigError(f"kv_transport must be one of {TRANSPORTS}, got {self.kv_transport!r}")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ConfigError(f"block_size must be 8, 16, 32, 64 or 128, got {self.block_size}")
        if self.max_model_len < 0:
            raise ConfigError(f"max_model_len must be >= 0, got {self.max_model_len}")
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ConfigError(f"max_restarts must be an integer >= 0, got {self.max_restarts!r}")
        if not self.restart_window_s > 0:
            raise ConfigError(f"restart_window_s must be > 0, got {self.restart_window_s}")
        if not self.restart_backoff_s >= 0:
            raise ConfigError(f"restart_backoff_s must be >= 0, got {self.restart_backoff_s}")
        if self.kv_transfer_timeout_s <= 0:
            raise ConfigError(f"kv_transfer_timeout_s must be > 0, got {self.kv_transfer_timeout_s}")
        if not isinstance(self.replan, bool):
            raise ConfigError(f"replan must be true or false, got {self.replan!r}")
        if not 0 < self.slo_attainment <= 1:
            raise ConfigError(f"slo_attainment must be in (0, 1], got {self.slo_attainment}")

    @property
    def phases(self) -> dict[str, PhaseConfig]:
        if self.mode == "colocated":
            return {"colocated": self.colocated}
        if self.mode == "mixed":
            return {"colocated": self.colocated, "prefill": self.prefill, "decode": self.decode}
        return {"prefill": self.prefill, "decode": self.decode}

    @property
    def num_gpus(self) -> int:
        """Whole GPUs the plan needs (phases sharing a GPU count it once)."""
        import math
        return math.ceil(sum(p.gpu_fraction for p in self.phases.values()) - 1e-9)

    # I/O -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        return _from_dict(cls, data, "plan")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"plan file {p} does not exist")
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml
                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parse error becomes one clear line
            raise ConfigError(f"plan file {p} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"plan file {p} must hold an object at the top level")
        return cls.from_dict(data)


def _positive(obj, *names):
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{n} must be an integer >= 1, got {v!r}")


def _from_dict(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be an object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None

"""Device specs the roofline latency model and the optimizer plan with.

Figures are datasheet peaks (dense bf16 FLOP/s, HBM bandwidth, memory) and per-GPU link
bandwidths. The efficiencies and overheads are fitted to measured latencies
(placement/calibration.json, written by `python -m placement.calibration --fit` from
placement/validation/points.csv; docs/latency-model.md): kernel efficiencies per GPU type,
engine overheads from our own engine's profiles. A GPU type without measurements takes the
constants of its closest measured relative (CALIBRATED_LIKE). `cost_per_hour` is a default
that `--gpu-cost` overrides.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from engine.errors import ConfigError


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or the CPU of one machine) and the links around it.

    Bandwidths are per device and per direction, in bytes/s. `intra_node_*` is NVLink (or
    PCIe where a card has no NVLink); `inter_node_*` is the device's share of the network.
    """

    name: str
    peak_flops: float                 # dense bf16 (fp32 on "cpu")
    memory_bandwidth: float           # bytes/s
    memory_bytes: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    devices_per_node: int = 8
    intra_node_latency_s: float = 10e-6     # per message (one all-reduce, one KV message)
    inter_node_latency_s: float = 25e-6
    compute_efficiency: float = 0.7         # large GEMMs' share of peak
    memory_efficiency: float = 0.85         # share of HBM bandwidth a decode step reaches
    step_overhead_s: float = 3e-4           # host time per forward pass (scheduling, sampling)
    gemm_half_tokens: float = 0.0           # GEMMs of M tokens run at M / (M + this) of large ones
    attention_efficiency: float = 0.5       # attention kernels' share of peak on long prompts
    attention_half_tokens: float = 1024.0   # ... a prompt of n tokens gets n / (n + this) of it
    allreduce_latency_s: float = 10e-6      # one small all-reduce inside a node (NCCL)
    layer_overhead_s: float = 0.0           # per layer per pass (kernel launches)
    request_overhead_s: float = 0.0         # per layer per decoding request (attention setup)
    cost_per_hour: float = 1.0
    device: str = "cuda"                    # the plan's device field for this kind

    def __post_init__(self):
        for name in ("peak_flops", "memory_bandwidth", "memory_bytes", "intra_node_bandwidth",
                     "inter_node_bandwidth"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"device {self.name}: {name} must be > 0")
        if self.devices_per_node < 1:
            raise ConfigError(f"device {self.name}: devices_per_node must be >= 1")
        if not all(0 < e <= 1 for e in (self.compute_efficiency, self.memory_efficiency,
                                         self.attention_efficiency)):
            raise ConfigError(f"device {self.name}: efficiencies must be in (0, 1]")
        if self.cost_per_hour < 0:
            raise ConfigError(f"device {self.name}: cost_per_hour must be >= 0")

    def link(self, same_node: bool) -> tuple[float, float]:
        """(bandwidth bytes/s, latency s) of one device's link to a peer."""
        if same_node:
            return self.intra_node_bandwidth, self.intra_node_latency_s
        return self.inter_node_bandwidth, self.inter_node_latency_s


GB = 1e9
DEVICES: dict[str, DeviceSpec] = {
    # SXM parts in 8-GPU nodes: NVLink 4 (450 GB/s each way), 400 Gb/s InfiniBand per GPU.
    "H100": DeviceSpec("H100", 989e12, 3.35e12, 80 * GB, 450 * GB, 50 * GB, cost_per_hour=3.0),
    "H200": DeviceSpec("H200", 989e12, 4.8e12, 141 * GB, 450 * GB, 50 * GB, cost_per_hour=3.8),
    # NVLink 3 (300 GB/s each way), 200 Gb/s HDR per GPU.
    "A100-80GB": DeviceSpec("A100-80GB", 312e12, 2.039e12, 80 * GB, 300 * GB, 25 * GB,
                            cost_per_hour=1.8),
    # PCIe cards without NVLink: peers talk over PCIe Gen4 x16; 100 Gb/s per node, shared by 8.
    "L40S": DeviceSpec("L40S", 362e12, 864e9, 48 * GB, 32 * GB, 12.5 * GB / 8,
                       intra_node_latency_s=20e-6, cost_per_hour=1.0),
    # The A10 datasheet figures (A10G is AWS's variant of the same GA102 part).
    "A10G": DeviceSpec("A10G", 125e12, 600e9, 24 * GB, 32 * GB, 12.5 * GB / 8,
                       intra_node_latency_s=20e-6, cost_per_hour=0.75),
    # Planning the embedded model on a CPU machine: fp32 peak of 2 AVX2 cores, DRAM bandwidth,
    # gloo between two local processes (~3.5 GB/s measured) and ~1 ms per Ray/gloo message.
    "cpu": DeviceSpec("cpu", 100e9, 20 * GB, 16 * GB, 3.5 * GB, 1.25 * GB, devices_per_node=2,
                      intra_node_latency_s=1e-3, inter_node_latency_s=2e-3,
                      compute_efficiency=0.5, memory_efficiency=0.7, step_overhead_s=2e-3,
                      attention_half_tokens=0.0,     # not measured on CPU: attention at one rate
                      cost_per_hour=0.05, device="cpu"),
}
# Measured data exists for these; the others borrow a relative's kernel efficiencies.
CALIBRATION_PATH = Path(__file__).resolve().parent / "calibration.json"
CALIBRATED_LIKE = {"H200": "H100", "L40S": "A100-80GB", "A10G": "A100-80GB"}
_DEVICE_FIELDS = ("compute_efficiency", "memory_efficiency", "gemm_half_tokens",
                  "attention_efficiency", "allreduce_latency_s")
_ENGINE_FIELDS = ("step_overhead_s", "layer_overhead_s", "request_overhead_s")


def calibrated(spec: DeviceSpec, calibration: dict, engine: str = "disagg") -> DeviceSpec:
    """`spec` with the fitted kernel constants of its GPU type (or its relative's) and the
    fitted overheads of `engine`."""
    devices, engines = calibration.get("devices", {}), calibration.get("engines", {})
    kernel = {**devices.get(CALIBRATED_LIKE.get(spec.name, ""), {}), **devices.get(spec.name, {})}
    known = {f.name for f in fields(DeviceSpec)}
    update = {k: v for k, v in kernel.items() if k in _DEVICE_FIELDS and k in known}
    update.update({k: v for k, v in engines.get(engine, {}).items() if k in _ENGINE_FIELDS})
    return replace(spec, **update)


def _load_calibration() -> dict:
    if not CALIBRATION_PATH.is_file():
        return {}
    return json.loads(CALIBRATION_PATH.read_text())


DATASHEET = dict(DEVICES)
_CALIBRATION = _load_calibration()
DEVICES.update({k: calibrated(v, _CALIBRATION) for k, v in DEVICES.items() if v.device == "cuda"})
ALIASES = {"A100": "A100-80GB", "A100-80G": "A100-80GB", "A10": "A10G", "CPU": "cpu"}


def get_device(name: str, cost_per_hour: float | None = None) -> DeviceSpec:
    """A device spec by name (case-insensitive, with aliases such as "A100"), optionally with
    its cost per hour replaced."""
    key = ALIASES.get(name, name)
    by_lower = {k.lower(): k for k in DEVICES}
    key = by_lower.get(key.lower(), key)
    if key not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; known: {', '.join(DEVICES)}")
    spec = DEVICES[key]
    return spec if cost_per_hour is None else replace(spec, cost_per_hour=cost_per_hour)

"""Device specs the roofline latency model and the optimizer plan with.

Figures are datasheet peaks (dense bf16 FLOP/s, HBM bandwidth, memory) and per-GPU link
bandwidths; `compute_efficiency` and `memory_efficiency` scale the peaks down to what kernels
reach in practice (our H100 measurements: an 8192^3 bf16 matmul at 800 of 989 TFLOP/s, a
device copy at 3.02 of 3.35 TB/s). `cost_per_hour` is a default that `--gpu-cost` overrides.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

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
    compute_efficiency: float = 0.7
    memory_efficiency: float = 0.85
    step_overhead_s: float = 3e-4           # launches and scheduling per forward pass
    cost_per_hour: float = 1.0
    device: str = "cuda"                    # the plan's device field for this kind

    def __post_init__(self):
        for name in ("peak_flops", "memory_bandwidth", "memory_bytes", "intra_node_bandwidth",
                     "inter_node_bandwidth"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"device {self.name}: {name} must be > 0")
        if self.devices_per_node < 1:
            raise ConfigError(f"device {self.name}: devices_per_node must be >= 1")
        if not (0 < self.compute_efficiency <= 1 and 0 < self.memory_efficiency <= 1):
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
                      cost_per_hour=0.05, device="cpu"),
}
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

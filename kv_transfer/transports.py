"""KV transports behind one description: what each can do (capability flags) and a registry.

Channels (channel.py) and agents (agent.py) ask a transport what it does, never its name; the
controller picks one for each prefill/decode pair with `choose` from the devices and GPUs the
ranks report.

  gloo      CPU tensors over TCP.
  nccl      GPU to GPU through NCCL, which refuses two ranks on one GPU.
  cuda_ipc  processes on one host (also sharing one GPU): the receiver maps the sender's whole
            KV cache once and copies each request's blocks from it; only block ids travel.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ConfigError


@dataclass(frozen=True)
class Transport:
    name: str
    device: str              # where the KV it moves lives: "cpu" or "cuda"
    backend: str             # the torch.distributed backend of a channel's two-rank group
    layerwise: bool          # sends a request's KV in layer groups while later layers compute
    moves_block_ids: bool    # only block ids travel; the receiver copies from the mapped sender cache
    shares_gpu: bool         # works when both ends use one GPU
    one_node: bool           # both ends must be on one node

    @property
    def polls_completion(self) -> bool:
        """NCCL works cannot wait with a timeout: their completion is polled."""
        return self.backend == "nccl"


_REGISTRY: dict[str, Transport] = {}


def register(t: Transport) -> Transport:
    """Add a transport; `choose(auto)` prefers those registered first."""
    _REGISTRY[t.name] = t
    return t


GLOO = register(Transport("gloo", "cpu", "gloo", layerwise=True, moves_block_ids=False, shares_gpu=True,
                          one_node=False))
NCCL = register(Transport("nccl", "cuda", "nccl", layerwise=True, moves_block_ids=False, shares_gpu=False,
                          one_node=False))
# One copy per request over CUDA IPC: the receiver copies ~1 ms per GiB, while packing layer
# groups during the prefill waited on the GIL behind the model's kernel launches (measured on
# the H100, docs/benchmarks.md).
CUDA_IPC = register(Transport("cuda_ipc", "cuda", "gloo", layerwise=False, moves_block_ids=True, shares_gpu=True,
                              one_node=True))


def get(name: str) -> Transport:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown KV transport {name!r}; known: {', '.join(_REGISTRY)}") from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def choose(requested: str, device: str, shared_gpu: bool, same_node: bool) -> Transport:
    """The transport for one prefill/decode pair on `device`: `requested`, checked against what
    it can do, or with "auto" the first registered one that can."""
    def problem(t: Transport) -> str | None:
        if t.device != device:
            return f"moves {t.device.upper()} tensors; these instances run on {device.upper()}"
        if shared_gpu and not t.shares_gpu:
            return "cannot connect two ranks on one GPU (prefill and decode share one here)"
        if t.one_node and not same_node:
            return "needs prefill and decode on one node"
        return None
    if requested == "auto":
        for t in _REGISTRY.values():
            if problem(t) is None:
                return t
        raise ConfigError(f"no KV transport can connect these instances ({device}, shared GPU: {shared_gpu}, "
                          f"one node: {same_node})")
    t = get(requested)
    why = problem(t)
    if why:
        fits = [o.name for o in _REGISTRY.values() if problem(o) is None]
        raise ConfigError(f"kv_transport {requested}: it {why}; use {' or '.join(fits) or 'other devices'}")
    return t

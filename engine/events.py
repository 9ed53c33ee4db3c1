"""What instances tell the controller: typed events, sent in batches (never one Ray message per
token per request). Every event may carry the instance's `Load`, so the router's view of an
instance is refreshed by the events themselves, never by polling.

Worker-side ids are `request_id#attempt` (see cluster/controller.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Load:
    """An instance's load at the time of the event."""
    free_blocks: int = 0             # KV blocks neither used nor reserved
    num_running: int = 0             # requests decoding
    num_waiting: int = 0             # requests waiting for a prefill (or a recompute)
    queued_tokens: int = 0           # prompt tokens still to prefill


@dataclass(kw_only=True)
class WorkerEvent:
    time: float = 0.0                # the worker's clock (monotonic)
    load: Load | None = None


@dataclass(kw_only=True)
class KVScheduled(WorkerEvent):
    """Prefill role: a request's prefill is about to run; its KV leaves as message `seq` of the
    channel (peer, epoch), layer by layer, so the decode ranks must receive now."""
    request_id: str
    peer: str
    epoch: int
    seq: int
    num_blocks: int
    num_tokens: int
    num_cached_tokens: int = 0
    attempt: int = 0


@dataclass(kw_only=True)
class FirstToken(WorkerEvent):
    """Prefill role: a prefill ended with its first sampled token; the KV is held until the
    controller releases it."""
    request_id: str
    token_id: int
    attempt: int = 0
    finish_reason: str | None = None
    prefill_queue_s: float = 0.0
    prefill_compute_s: float = 0.0
    logprobs: dict | None = None


@dataclass(kw_only=True)
class StepTokens(WorkerEvent):
    """Colocated and decode roles: one step's new tokens for every request in the batch."""
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finished: dict[str, str] = field(default_factory=dict)     # request id -> finish reason
    batch_size: int = 0
    logprobs: dict[str, list] = field(default_factory=dict)
    # Requests whose prefill ended in this step -> prompt tokens its prefix cache served (the
    # router's hit rate and queue charge for colocated instances).
    num_cached_tokens: dict[str, int] = field(default_factory=dict)


@dataclass(kw_only=True)
class LoadChanged(WorkerEvent):
    """Blocks were freed outside a step (a released reservation, a cancel)."""


@dataclass(kw_only=True)
class RequestFailed(WorkerEvent):
    """A step failed because of this request alone (model/step_isolation.py): the instance
    dropped it and goes on; the client gets INTERNAL with `message` (one line)."""
    request_id: str
    message: str
    attempt: int = 0


@dataclass(kw_only=True)
class StepFailed(WorkerEvent):
    """A step raised: the instance is treated as failed."""
    message: str

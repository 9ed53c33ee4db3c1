"""Routing rules shared by the controller (cluster/) and the simulator (placement/)."""
from __future__ import annotations

from collections.abc import Sequence


def pick_prefill(queued_tokens: Sequence[int], num_assigned: Sequence[int] | None = None) -> int:
    """Index of the prefill instance with the fewest queued prompt tokens. Ties go to the one
    that was given the fewest requests so far (`num_assigned`), then to the lowest index, so
    idle instances share the load instead of the first one taking everything."""
    if not queued_tokens:
        raise ValueError("no prefill instances")
    assigned = num_assigned or [0] * len(queued_tokens)
    return min(range(len(queued_tokens)), key=lambda i: (queued_tokens[i], assigned[i], i))


def pick_decode(free_blocks: Sequence[int], blocks_needed: int) -> int | None:
    """Index of the decode instance with the most free blocks after its reservations, among those
    that can take `blocks_needed`; None when none can."""
    best = max(range(len(free_blocks)), key=lambda i: (free_blocks[i], -i), default=None)
    if best is None or free_blocks[best] < blocks_needed:
        return None
    return best


PD_ROUTE = "pd"


def pick_route(colocated_loads: Sequence[float], pd_load: float | None) -> int | str:
    """Where a request goes in a plan with colocated instances and/or a prefill/decode pool:
    the index of the least loaded colocated instance, or PD_ROUTE when the pool is less loaded
    (load: requests in flight per rank). Ties go to colocated (no KV hand-over). `pd_load` is
    None when the plan has no live pool."""
    if not colocated_loads:
        if pd_load is None:
            raise ValueError("no colocated instance and no prefill/decode pool")
        return PD_ROUTE
    best = min(range(len(colocated_loads)), key=lambda i: (colocated_loads[i], i))
    if pd_load is not None and pd_load < colocated_loads[best]:
        return PD_ROUTE
    return best

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

"""Routing rules shared by the controller (cluster/) and the simulator (placement/).

Prefill instances are chosen by one cost, in prompt tokens: the tokens queued there plus the
tokens of this prompt that instance would have to compute, i.e. `queued - expected hit`. With no
prefix index (routing "load") every hit is 0 and the rule is "fewest queued tokens". A cached
prefix thus wins while it saves more tokens than the extra queue it sits behind, and load wins
once the queue gap exceeds the saving (SGLang's cache-aware balancer switches between the two
with a threshold; Dynamo's KV router adds weighted overlap blocks to load blocks; ours is
Dynamo's with weight 1, because both terms are tokens the instance must prefill before this
request's first token).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

from engine.block_manager import chain_hash

ROUTINGS = ("prefix", "load")


def pick_prefill(queued_tokens: Sequence[int], num_assigned: Sequence[int] | None = None,
                 hit_tokens: Sequence[int] | None = None) -> int:
    """Index of the prefill instance with the lowest `queued_tokens[i] - hit_tokens[i]` (queued
    tokens to compute, less the prompt tokens its prefix cache is expected to serve). Ties go to
    the one given the fewest requests so far (`num_assigned`), then to the lowest index, so idle
    instances share the load instead of the first one taking everything."""
    if not queued_tokens:
        raise ValueError("no prefill instances")
    n = len(queued_tokens)
    assigned = num_assigned or [0] * n
    hits = hit_tokens or [0] * n
    return min(range(n), key=lambda i: (queued_tokens[i] - hits[i], assigned[i], i))


def block_keys(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The chained hashes of a prompt's full blocks that a prefix cache can serve: the block
    manager's own hashes (`chain_hash`), and like its matcher, never the block holding the last
    token (that token is always computed, to produce logits)."""
    keys, h = [], 0
    for i in range((len(token_ids) - 1) // block_size):
        h = chain_hash(h, token_ids[i * block_size:(i + 1) * block_size])
        keys.append(h)
    return keys


class PrefixIndex:
    """The router's view of one instance's prefix cache: the block keys of the prompts it routed
    there, least recently used first, at most `capacity_blocks` (the instance's KV blocks; the
    cache evicts least recently freed blocks first, so the oldest keys are the likeliest gone).
    It is an estimate: the instance may have evicted sooner (blocks held by running requests
    leave less room), which only makes a hit smaller than expected; `discard` takes keys out
    when the instance says so, `clear` forgets all (a restart, a role change)."""

    def __init__(self, capacity_blocks: int):
        if capacity_blocks < 0:
            raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._lru: OrderedDict[Hashable, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, keys: Sequence[Hashable]) -> int:
        """How many leading keys are cached (a chain breaks at its first miss)."""
        n = 0
        for k in keys:
            if k not in self._lru:
                break
            n += 1
        return n

    def insert(self, keys: Sequence[Hashable]) -> None:
        """The instance now holds these blocks: most recently used, oldest keys evicted."""
        lru = self._lru
        for k in keys:
            lru[k] = None
            lru.move_to_end(k)
        while len(lru) > self.capacity_blocks:
            lru.popitem(last=False)

    def discard(self, keys: Sequence[Hashable]) -> None:
        for k in keys:
            self._lru.pop(k, None)

    def clear(self) -> None:
        self._lru.clear()


class PrefixRouter:
    """Prefix indexes of a pool of instances, keyed by instance id, and the choice among them.
    `routing="load"` keeps no index (every hit is 0). The controller and the simulator both
    route through `pick`, so the simulated rule is the rule that runs."""

    def __init__(self, routing: str, block_size: int):
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        self.routing, self.block_size = routing, block_size
        self.indexes: dict[Hashable, PrefixIndex] = {}

    def adopt(self, instance_id: Hashable, capacity_blocks: int) -> None:
        """A new, restarted or re-roled instance: its cache starts empty."""
        self.indexes[instance_id] = PrefixIndex(capacity_blocks)

    def forget(self, instance_id: Hashable) -> None:
        self.indexes.pop(instance_id, None)

    def keys(self, token_ids: Sequence[int]) -> list[int]:
        return block_keys(token_ids, self.block_size) if self.routing == "prefix" else []

    def hit_tokens(self, instance_ids: Sequence[Hashable], keys: Sequence[Hashable]) -> list[int]:
        """Expected cached prompt tokens on each instance."""
        if not keys:
            return [0] * len(instance_ids)
        return [self.indexes[i].match(keys) * self.block_size if i in self.indexes else 0
                for i in instance_ids]

    def pick(self, instance_ids: Sequence[Hashable], queued_tokens: Sequence[int], keys: Sequence[Hashable],
             num_assigned: Sequence[int] | None = None) -> tuple[int, int]:
        """(index into instance_ids, expected hit tokens there); records the prompt's blocks
        as cached on the chosen instance."""
        hits = self.hit_tokens(instance_ids, keys)
        k = pick_prefill(queued_tokens, num_assigned, hits)
        if keys and instance_ids[k] in self.indexes:
            self.indexes[instance_ids[k]].insert(keys)
        return k, hits[k]


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

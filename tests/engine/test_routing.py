"""The routing rule shared by the controller and the simulator: one cost in tokens (queued less
the expected prefix hit), the router's LRU prefix index, and its agreement with the block
manager's own hashes."""
import random

import pytest

from engine.block_manager import BlockManager
from engine.routing import PrefixIndex, PrefixRouter, block_keys, pick_prefill

BS = 16


def test_load_only_picks_the_shortest_queue_then_the_least_assigned():
    assert pick_prefill([300, 100, 200]) == 1
    assert pick_prefill([0, 0, 0], [2, 1, 1]) == 1


def test_a_hit_wins_when_queues_are_equal():
    assert pick_prefill([500, 500], hit_tokens=[0, 64]) == 1


def test_load_wins_once_the_queue_gap_exceeds_the_saving():
    # Instance 1 saves 256 tokens; behind 200 more queued tokens it still wins, behind 300 not.
    assert pick_prefill([0, 200], hit_tokens=[0, 256]) == 1
    assert pick_prefill([0, 300], hit_tokens=[0, 256]) == 0


def test_index_matches_leading_keys_and_evicts_least_recently_used():
    idx = PrefixIndex(4)
    idx.insert([1, 2, 3])
    assert idx.match([1, 2, 3, 4]) == 3
    assert idx.match([2, 3]) == 2 and idx.match([9, 1]) == 0      # a chain breaks at its first miss
    idx.insert([1, 5])           # 1 is used again; 5 takes the 4th slot
    idx.insert([6])              # over capacity: the least recently used (2) goes
    assert len(idx) == 4
    assert idx.match([1]) == 1 and idx.match([2]) == 0 and idx.match([3]) == 1
    idx.discard([3])
    assert idx.match([3]) == 0
    idx.clear()
    assert idx.match([1]) == 0


def test_router_keys_are_the_block_managers_hashes():
    """A prompt whose blocks the router recorded on an instance is a real hit there, block for
    block: the router's expected hit equals what the block manager serves."""
    rng = random.Random(0)
    shared = [rng.randrange(256) for _ in range(5 * BS)]
    first, second = shared + [1, 2, 3], shared + [rng.randrange(256) for _ in range(20)]
    bm = BlockManager(64, BS)
    table, _ = bm.allocate(first)
    bm.commit(table, first, len(first))
    bm.free(table)
    router = PrefixRouter("prefix", BS)
    router.adopt("p0", 64)
    router.adopt("p1", 64)
    k, hit = router.pick(["p0", "p1"], [0, 0], router.keys(first))
    assert (k, hit) == (0, 0)
    k, hit = router.pick(["p0", "p1"], [0, 0], router.keys(second), num_assigned=[1, 0])
    _, cached = bm.allocate(second)
    assert k == 0 and hit == cached == 5 * BS
    assert len(block_keys(second, BS)) == (len(second) - 1) // BS


def test_load_routing_keeps_no_index():
    router = PrefixRouter("load", BS)
    router.adopt("p0", 64)
    assert router.keys(list(range(100))) == []
    assert router.pick(["p0", "p1"], [10, 0], []) == (1, 0)
    with pytest.raises(ValueError, match="routing must be one of"):
        PrefixRouter("random", BS)


def test_plan_routing_is_validated_and_serve_overrides_it():
    from types import SimpleNamespace

    from cluster.serve import plan_from_args
    from engine.errors import ConfigError
    from engine.plan import Plan
    assert Plan().routing == "prefix"
    with pytest.raises(ConfigError, match="routing must be one of"):
        Plan.from_dict({"routing": "random"})
    args = SimpleNamespace(plan=None, model=None, device=None, kv_transfer_timeout=None, routing="load")
    assert plan_from_args(args).routing == "load"


def test_colocated_instances_route_by_the_same_cost_and_load_routing_is_unchanged():
    from engine.routing import PD_ROUTE, pick_route
    prompt = [random.Random(3).randrange(3, 200) for _ in range(10 * BS)]
    keys = block_keys(prompt, BS)
    router = PrefixRouter("prefix", BS)
    for i in ("colocated-0", "colocated-1"):
        router.adopt(i, 64)
    ids = ["colocated-0", "colocated-1"]
    # Idle and cold: the one given fewer requests so far (the tie-break) takes the prompt...
    assert router.pick(ids, [0, 0], keys, [1, 0]) == (1, 0)
    # ...and its follow-up goes back there while the saving (144 tokens) outweighs the queue gap.
    assert router.pick(ids, [0, 100], keys, [0, 5]) == (1, 9 * BS)
    assert router.pick(ids, [0, 200], keys, [0, 5])[0] == 0
    # Routing "load" keeps no index: colocated instances are chosen by requests in flight per
    # rank as before, and the pool choice is the same function either way.
    load = PrefixRouter("load", BS)
    assert load.keys(prompt) == [] and load.hit_tokens(ids, load.keys(prompt)) == [0, 0]
    assert pick_route([2.0, 1.0], 1.5) == 1 and pick_route([2.0, 2.0], 1.0) == PD_ROUTE

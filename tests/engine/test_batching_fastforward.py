"""DecodePolicy.fast_forward and max_steps_without_preemption: k steps at once must leave the
same state as k calls of schedule() with a token appended after each."""
import random

import pytest

from engine.batching import DecodePolicy
from engine.block_manager import BlockManager
from engine.request import Request, RequestState
from engine.sampling_params import SamplingParams


def _running(bm, policy, lens, max_tokens=1000):
    reqs = []
    for i, n in enumerate(lens):
        r = Request(f"r{i}", list(range(i * 10_000, i * 10_000 + n)), SamplingParams(max_tokens=max_tokens))
        r.transition(RequestState.PREFILLING)
        r.block_ids, _ = bm.allocate(r.all_token_ids)
        r.append_token(7)
        policy.add(r, 0.0)
        reqs.append(r)
    return reqs


def _state(bm, reqs):
    return bm.num_free_blocks, [(len(r.block_ids), r.num_tokens, r.state) for r in reqs]


@pytest.mark.parametrize("seed", range(5))
def test_fast_forward_equals_single_steps(seed):
    rnd = random.Random(seed)
    lens = [rnd.randint(1, 70) for _ in range(rnd.randint(1, 9))]
    steps = rnd.randint(1, 40)
    states = []
    for bulk in (False, True):
        bm = BlockManager(400, 16)
        policy = DecodePolicy(bm, max_batch_size=6)      # some requests wait outside the batch
        reqs = _running(bm, policy, lens)
        assert policy.max_steps_without_preemption(steps) == steps
        if bulk:
            for r in policy.fast_forward(steps):
                r.output_token_ids.extend([7] * steps)
        else:
            for _ in range(steps):
                batch, preempted = policy.schedule(0.0)
                assert not preempted
                for r in batch:
                    r.append_token(7)
        states.append(_state(bm, reqs))
    assert states[0] == states[1]


def test_max_steps_stops_where_a_step_would_preempt():
    bm = BlockManager(7, 4)
    policy = DecodePolicy(bm)
    reqs = _running(bm, policy, [4, 6])          # tables 1 and 2 blocks, 4 blocks free
    # r0 holds 5 + k tokens at step k -> new blocks at steps 0, 4, 8; r1 holds 7 + k -> 2, 6, 10.
    k = policy.max_steps_without_preemption(100)
    assert k == 8                                 # steps 0..7 take 4 blocks; step 8 needs a 5th
    for r in policy.fast_forward(k):
        r.output_token_ids.extend([7] * k)
    assert bm.num_free_blocks == 0
    batch, preempted = policy.schedule(0.0)      # the next real step must preempt
    assert preempted == [reqs[1]] and batch == [reqs[0]]


def test_max_steps_with_no_batch_or_no_steps():
    policy = DecodePolicy(BlockManager(4, 4))
    assert policy.max_steps_without_preemption(5) == 5
    assert policy.max_steps_without_preemption(0) == 0


def test_blocks_needed_is_what_fast_forward_takes():
    bm = BlockManager(400, 16)
    policy = DecodePolicy(bm)
    _running(bm, policy, [5, 16, 17, 40])
    for steps in (1, 12, 30):
        free = bm.num_free_blocks
        need = policy.blocks_needed(steps)
        for r in policy.fast_forward(steps):
            r.output_token_ids.extend([7] * steps)
        assert free - bm.num_free_blocks == need


def test_prefill_remove_of_absent_request_is_cheap_and_false():
    import time
    from engine.batching import PrefillPolicy
    p = PrefillPolicy(BlockManager(10, 16))
    absent = Request("x", list(range(100_000)))
    t = time.perf_counter()
    for _ in range(200):
        assert p.remove(absent) is False
    assert time.perf_counter() - t < 0.5      # no repr of a 100k-token prompt per miss

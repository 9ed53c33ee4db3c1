"""Chunked mixed steps taken with the decode batch lazy (placement/lazy_mixed.py) must give
exactly what the same steps through ColocatedPolicy.schedule give, request for request."""
import numpy as np
import pytest

from placement.deployment import Deployment
from placement.simulator import simulate
from placement.workload import Workload
from tests.placement.helpers import KV_BYTES, group, profile

PROF = profile(prefill=(0.02, 1e-4, 1e-8), decode=(0.01, 1e-6, 1e-4))
FIELDS = ("ttft_s", "tpot_s", "prefill_start_s", "first_token_s", "decode_step_s", "finish_s", "num_preemptions")


def _workload(n, seed, gap):
    rng = np.random.default_rng(seed)
    return Workload("rand", np.cumsum(rng.exponential(gap, n)), rng.integers(1, 400, n), rng.integers(1, 150, n))


@pytest.mark.parametrize("blocks,batch,lazy_min_batch", [(80, 512, 0), (400, 64, 8), (3000, 512, 4)])
def test_lazy_mixed_steps_give_the_same_times(blocks, batch, lazy_min_batch):
    # Few blocks: steps preempt (the lazy step hands those to schedule); a small batch cap:
    # requests wait outside the batch and move up; plenty: long lazy stretches.
    dep = Deployment(16, KV_BYTES, colocated=group(2, blocks, 512, "chunked", PROF, chunk_tokens=64,
                                                   max_batch_size=batch))
    wl = _workload(600, blocks, 0.01)
    fast = simulate(dep, wl, lazy_min_batch=lazy_min_batch)
    ref = simulate(dep, wl, lazy_min_batch=lazy_min_batch, lazy_mixed=False)
    assert np.isfinite(fast.finish_s).all()
    for f in FIELDS:
        assert np.array_equal(getattr(fast, f), getattr(ref, f), equal_nan=True), f
    if blocks == 80:
        assert (fast.num_preemptions > 0).any(), "the case should exercise preemption"

"""Shortcuts the simulator takes must not change its answers: fast-forward runs against plain
engine steps, the counting block manager against the engine's BlockManager."""
import numpy as np
import pytest

from placement.blocks import CountingBlockManager
from placement.deployment import Deployment
from placement.simulator import Simulator, simulate
from placement.workload import Workload
from engine.block_manager import BlockManager
from tests.placement.helpers import KV_BYTES, disagg, group, profile

FIELDS = ("prefill_start_s", "first_token_s", "transfer_end_s", "decode_step_s", "finish_s", "num_preemptions")
PROF = profile(prefill=(0.02, 1e-4, 1e-8), decode=(0.01, 1e-6, 1e-4))


def _workload(n=120, seed=0):
    rng = np.random.default_rng(seed)
    return Workload("rand", np.cumsum(rng.exponential(0.05, n)), rng.integers(1, 300, n),
                    rng.integers(1, 120, n))


def _deployments():
    # Tight decode memory (and few colocated blocks) so that steps preempt and recompute.
    yield "disagg", disagg(prefill=group(2, 200, 512, prof=PROF), decode=group(2, 60, 512, prof=PROF, max_batch_size=8))
    # Plenty of memory but a small batch: requests wait outside the batch and move up into it.
    yield "disagg-small-batch", disagg(prefill=group(1, 400, 512, prof=PROF), decode=group(1, 2000, 512, prof=PROF, max_batch_size=4))
    # Prefill and decode time-slicing shared GPUs: speed changes cut runs at step boundaries.
    yield "disagg-shared", Deployment(16, KV_BYTES, prefill=group(2, 200, 512, prof=PROF),
                                      decode=group(2, 60, 512, prof=PROF, max_batch_size=8),
                                      shared=[(0, 0), (1, 1)], shared_speeds=(0.4, 0.7))
    for mode in ("prefill_first", "chunked"):
        yield mode, Deployment(16, KV_BYTES, colocated=group(2, 80, 512, mode, PROF, chunk_tokens=64))


def _assert_same(a, b):
    for f in FIELDS:
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-9, atol=1e-12, err_msg=f)


@pytest.mark.parametrize("lazy_min_batch", [0, 1 << 30])
@pytest.mark.parametrize("name,dep", list(_deployments()))
def test_fast_forward_matches_plain_engine_steps(name, dep, lazy_min_batch):
    wl = _workload()
    fast = simulate(dep, wl, lazy_min_batch=lazy_min_batch)
    plain = simulate(dep, wl, max_run_steps=0)
    assert fast.num_events < plain.num_events
    assert np.isfinite(fast.finish_s).all()
    if name != "disagg-small-batch":
        assert (fast.num_preemptions > 0).any(), "the case should exercise preemption"
    _assert_same(fast, plain)


@pytest.mark.parametrize("name,dep", list(_deployments()))
def test_counting_blocks_match_engine_block_manager(name, dep):
    wl = _workload(seed=1)
    _assert_same(simulate(dep, wl), simulate(dep, wl, exact_blocks=True))


def test_counting_block_manager_answers_like_block_manager():
    rng = np.random.default_rng(3)
    real, twin = BlockManager(50, 8, enable_prefix_caching=False), CountingBlockManager(50, 8)
    tables = []
    for _ in range(400):
        op = rng.integers(0, 3)
        if op == 0:
            ids = [0] * int(rng.integers(1, 60))
            assert real.can_allocate(ids) == twin.can_allocate(ids)
            if real.can_allocate(ids):
                tables.append((real.allocate(ids)[0], twin.allocate(ids)[0], len(ids)))
        elif op == 1 and tables:
            t_real, t_twin, n = tables[int(rng.integers(len(tables)))]
            grow = n + int(rng.integers(0, 20))
            assert real.can_append(t_real, grow) == twin.can_append(t_twin, grow)
            if real.blocks_for(grow) - len(t_real) <= real.num_free_blocks:
                real.append(t_real, grow)
                twin.append(t_twin, grow)
        elif tables:
            t_real, t_twin, _ = tables.pop(int(rng.integers(len(tables))))
            real.free(t_real)
            twin.free(t_twin)
        assert real.num_free_blocks == twin.num_free_blocks
        assert [len(a) for a, _, _ in tables] == [len(b) for _, b, _ in tables]


@pytest.mark.parametrize("name,dep", list(_deployments()))
def test_every_block_comes_back(name, dep):
    sim = Simulator(dep, _workload(seed=2))
    sim.run()
    for inst in sim.prefills + sim.decodes + sim.colocated:
        assert inst.bm.num_free_blocks == inst.bm.num_blocks
        assert not getattr(inst, "inbox", []) and not getattr(getattr(inst, "decode", None), "running", [])

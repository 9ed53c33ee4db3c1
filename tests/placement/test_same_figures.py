"""The simulator's speedups of the simspeed3 branch must not move a single figure: the lazy
decode batch from 8 running requests (it was 32, and a lazy batch that misses requests of
the batch is still dropped where it was), identity-compared requests without a token list
under the counting block manager, and the inlined routing and step tests give exactly the
times the previous defaults (`lazy_min_batch=32`) give, request for request."""
import numpy as np
import pytest

from engine.model_config import load_model_config
from placement.deployment import Deployment
from placement.gpus import get_device
from placement.search import enumerate_candidates
from placement.simulator import simulate
from placement.workload import Workload, make_workload
from tests.placement.helpers import KV_BYTES, disagg, group, profile

FIELDS = ("prefill_start_s", "first_token_s", "transfer_end_s", "decode_step_s", "finish_s", "num_preemptions")
PROF = profile(prefill=(0.02, 1e-4, 1e-8), decode=(0.01, 1e-6, 1e-4))
BEFORE = dict(lazy_min_batch=32)        # the defaults before the branch


def _assert_identical(a, b):
    assert a.num_events == b.num_events
    for f in FIELDS:
        assert np.array_equal(getattr(a, f), getattr(b, f), equal_nan=True), f


def _workload(n, seed, gap):
    rng = np.random.default_rng(seed)
    return Workload("rand", np.cumsum(rng.exponential(gap, n)), rng.integers(1, 300, n), rng.integers(1, 200, n))


def _small_deployments():
    yield "disagg-tight", disagg(prefill=group(2, 200, 512, prof=PROF), decode=group(2, 60, 512, prof=PROF, max_batch_size=8))
    yield "disagg-small-batch", disagg(prefill=group(1, 400, 512, prof=PROF), decode=group(1, 2000, 512, prof=PROF, max_batch_size=4))
    yield "disagg-shared", Deployment(16, KV_BYTES, prefill=group(2, 200, 512, prof=PROF),
                                      decode=group(2, 60, 512, prof=PROF, max_batch_size=8),
                                      shared=[(0, 0), (1, 1)], shared_speeds=(0.4, 0.7))
    for mode in ("prefill_first", "chunked"):
        yield f"{mode}-tight", Deployment(16, KV_BYTES, colocated=group(2, 80, 512, mode, PROF, chunk_tokens=64))
        yield f"{mode}-roomy", Deployment(16, KV_BYTES, colocated=group(2, 4000, 2048, mode, PROF, chunk_tokens=256))
    # Prefill steps of several prompts move requests into decode past the batch cap: the case
    # where a lazy batch misses requests of the batch (below).
    yield "prefill_first-past-the-cap", Deployment(16, KV_BYTES, colocated=group(1, 20000, 4096, "prefill_first", PROF,
                                                                                 max_batch_size=40))


@pytest.mark.parametrize("gap", [0.002, 0.02, 0.1])
@pytest.mark.parametrize("name,dep", list(_small_deployments()))
def test_default_simulation_equals_the_previous_defaults(name, dep, gap):
    wl = _workload(400, 7, gap)
    _assert_identical(simulate(dep, wl), simulate(dep, wl, **BEFORE))


def _bursts(n=300, burst=6, gap=0.25):
    """Bursts of `burst` prompts: prefill_first steps of several prompts each, while the
    running list grows past the batch cap (long outputs)."""
    rng = np.random.default_rng(7)
    arrivals = np.repeat(np.arange(n // burst + 1) * gap, burst)[:n]
    return Workload("bursts", arrivals, rng.integers(1, 300, n), rng.integers(50, 400, n))


@pytest.mark.parametrize("burst,gap", [(6, 0.25), (12, 0.3), (25, 0.8)])
def test_bursts_past_the_cap_give_the_same_figures_at_either_threshold(burst, gap):
    # Prefill steps of several prompts move the running list past the batch cap (25, 0.8: from
    # below 32), where a lazy batch that missed requests of the batch would differ: the one of
    # either threshold is dropped instead (EngineInstance._track).
    _, dep = list(_small_deployments())[-1]
    wl = _bursts(300, burst, gap)
    _assert_identical(simulate(dep, wl), simulate(dep, wl, **BEFORE))


def test_a_lazy_batch_tracks_every_request_of_the_batch():
    # A prefill_first step that moves several requests into decode past max_batch_size: those
    # still within the batch are stepped (the lazy batch, which would miss them, is dropped).
    _, dep = list(_small_deployments())[-1]
    plain = simulate(dep, _bursts(), lazy_min_batch=1 << 30)
    _assert_identical(simulate(dep, _bursts()), plain)


@pytest.fixture(scope="module")
def readme_systems():
    """The README's three systems (llama-3-8b on 8 H100, roofline) and a 3,000-request sample
    of the Azure conversation trace spread over it."""
    model = load_model_config("llama-3-8b")
    c = next(c for c in enumerate_candidates(model, get_device("H100"), 8, "roofline", 16, 8192) if c.ranks == 1)
    kv = model.kv_bytes_per_token()
    deps = {"disaggregated": Deployment(16, kv, prefill=c.group(5), decode=c.group(3)),
            "colocated-prefill-first": Deployment(16, kv, colocated=c.group(8, "prefill_first")),
            "colocated-chunked": Deployment(16, kv, colocated=c.group(8, "chunked"))}
    return deps, make_workload("azure-conv", num_requests=3000, sample="spread")


@pytest.mark.parametrize("rate", [20.0, 110.0, 150.0])
@pytest.mark.parametrize("name", ["disaggregated", "colocated-prefill-first", "colocated-chunked"])
def test_readme_systems_give_the_previous_figures(readme_systems, name, rate):
    deps, wl = readme_systems
    w = wl.at_rate(rate)
    _assert_identical(simulate(deps[name], w), simulate(deps[name], w, **BEFORE))


@pytest.mark.parametrize("name,dep", list(_small_deployments()))
def test_counting_shortcuts_answer_as_the_engine_block_manager(name, dep):
    # exact_blocks: plain Request token lists, BlockManager.can_allocate, no lazy batch.
    wl = _workload(400, 7, 0.02)
    _assert_identical(simulate(dep, wl), simulate(dep, wl, exact_blocks=True))

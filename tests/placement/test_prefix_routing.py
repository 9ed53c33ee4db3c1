"""The simulator's prefix cache and prefix-aware routing: a request whose leading hash ids an
instance cached prefills only its uncached tokens there, and routing="prefix" sends follow-up
turns to the instance holding their history (the controller's rule, engine/routing.py)."""
from dataclasses import replace

import numpy as np
import pytest

from placement.simulator import Simulator
from placement.deployment import Deployment
from tests.placement.helpers import KV_BYTES, disagg, group, workload

# Three conversations of three turns, 20 s apart (every instance idle at each arrival): turn t
# of conversation c repeats the t + 1 blocks of 512 tokens of the turns before and adds one.
CONVS, TURNS, GAP_S = 3, 3, 20.0


def _conversations():
    arrivals, prompts, hashes = [], [], []
    for t in range(TURNS):
        for c in range(CONVS):
            arrivals.append(GAP_S * len(arrivals))
            prompts.append((t + 2) * 512 - 10)
            hashes.append(tuple(100 * c + b for b in range(t + 2)))
    return replace(workload(arrivals, prompts, [2] * len(prompts)), hash_ids=tuple(hashes))


def _run(routing):
    sim = Simulator(disagg(prefill=group(2), decode=group(1, num_blocks=2000)), _conversations(),
                    prefix_caching=True, routing=routing)
    return sim, sim.run()


def test_a_cached_prefix_shortens_the_prefill_to_its_uncached_tokens():
    sim, res = _run("prefix")
    prefill_s = res.first_token_s - res.prefill_start_s
    wl = _conversations()
    # Profile: 0.5 s + 0.005 s per computed token. First turns compute everything; later turns
    # find the previous turn's full 16-token blocks cached ((t + 1) * 512 - 10 tokens, its last
    # block partly filled).
    for i, n in enumerate(wl.prompt_lens.tolist()):
        t = i // CONVS
        cached = 0 if t == 0 else (t + 1) * 512 - 16
        assert prefill_s[i] == pytest.approx(0.5 + 0.005 * (n - cached)), (i, t)
    hit = sum(p.bm.num_prefix_hit_tokens for p in sim.prefills)
    assert hit == sum((t + 1) * 512 - 16 for t in range(1, TURNS)) * CONVS
    assert all(p.queued_tokens == 0 for p in sim.prefills)     # charges come off as they were put on


def test_prefix_routing_beats_load_routing_on_hit_rate_and_ttft():
    (sim_p, res_p), (sim_l, res_l) = _run("prefix"), _run("load")

    def hit_rate(sim):
        return sum(p.bm.num_prefix_hit_tokens for p in sim.prefills) / sum(p.bm.num_prefix_query_tokens
                                                                           for p in sim.prefills)
    # Load routing alternates the idle instances, so with three conversations on two instances
    # a follow-up turn mostly lands where its history is not.
    assert hit_rate(sim_p) > hit_rate(sim_l) + 0.2
    ttft_p, ttft_l = np.mean(res_p.first_token_s - res_p.arrival_s), np.mean(res_l.first_token_s - res_l.arrival_s)
    assert ttft_p < ttft_l
    assert np.isfinite(res_p.finish_s).all() and np.isfinite(res_l.finish_s).all()
    assert all(p.queued_tokens == 0 for p in sim_l.prefills)


def test_without_prefix_caching_routing_prefix_is_load_routing():
    a = Simulator(disagg(prefill=group(2)), _conversations(), routing="prefix").run()
    b = Simulator(disagg(prefill=group(2)), _conversations(), routing="load").run()
    assert np.array_equal(a.first_token_s, b.first_token_s)


def _run_colocated(routing):
    dep = Deployment(16, KV_BYTES, colocated=group(2, num_blocks=2000))
    sim = Simulator(dep, _conversations(), prefix_caching=True, routing=routing)
    return sim, sim.run()


def test_colocated_instances_hold_a_prefix_cache_and_route_by_the_same_rule():
    (sim_p, res_p), (sim_l, res_l) = _run_colocated("prefix"), _run_colocated("load")
    # Prefix routing spreads the cold first turns (ties: fewest given) and sends every follow-up
    # turn to its history, where it finds the previous turn's full blocks cached.
    assert sum(c.bm.num_prefix_hit_tokens for c in sim_p.colocated) == \
        sum((t + 1) * 512 - 16 for t in range(1, TURNS)) * CONVS
    assert all(c.bm.num_prefix_query_tokens > 0 for c in sim_p.colocated)
    # Load routing (most free blocks, ties to the first) puts every idle arrival on instance 0.
    assert sim_l.colocated[1].bm.num_prefix_query_tokens == 0
    wl = _conversations()
    prefill_s = res_p.first_token_s - res_p.prefill_start_s
    for i, n in enumerate(wl.prompt_lens.tolist()):
        cached = 0 if i < CONVS else (i // CONVS + 1) * 512 - 16
        assert prefill_s[i] == pytest.approx(0.5 + 0.005 * (n - cached), rel=1e-6), i
    assert np.isfinite(res_p.finish_s).all() and np.isfinite(res_l.finish_s).all()
    # Queue charges come off as they were put on, hits included.
    assert all(c.queued_tokens == 0 for c in sim_p.colocated + sim_l.colocated)

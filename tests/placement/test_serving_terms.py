"""The simulator's serving terms (placement/serving.py), by hand: a profile's "serving" section
reaches the simulator through its latency model, as `disagg simulate --latency-model` would.

Helpers' times: prefill 0.5 + 0.005 s/token (100 tokens: 1.0 s), decode steps 0.1 s, KV of 100
tokens 0.01 + 0.1 s over the link."""
import numpy as np
import pytest

from engine.errors import ConfigError
from placement.deployment import Deployment
from placement.latency_profile import ProfiledModel
from placement.serving import ServingTerms, _water_fill, speeds_at
from placement.simulator import simulate
from tests.placement.helpers import KV_BYTES, group, profile, workload


def dep_with(serving: dict | None, link_bw: float | None = None, **kw) -> Deployment:
    prof = dict(profile(), serving=serving) if serving is not None else profile()
    if link_bw:
        prof["kv_transfer"] = {"intra_node": {"bandwidth": link_bw, "latency_s": 0.01}}
    return Deployment(16, KV_BYTES, prefill=group(prof=prof), decode=group(prof=prof), **kw)


def test_handover_is_a_queue_per_link_and_its_hops_slow_with_requests_in_flight():
    # Two prompts of 100 arrive together and prefill one after the other (0-1.0, 1.0-2.0); on a
    # slow link (100 tokens: 0.01 + 2.0 s) r1's bytes wait for r0's: 1.0-3.0 (lands 3.01),
    # then 3.0-5.0 (lands 5.01): the link's latency does not hold it.
    wl = workload([0.0, 0.0], [100, 100], [3, 3])
    r = simulate(dep_with(None, link_bw=5e4), wl)
    np.testing.assert_allclose(r.first_token_s, [1.0, 2.0])
    np.testing.assert_allclose(r.transfer_end_s, [3.01, 5.01])
    # The controller's hops after each copy (0.05 s) hold the link (the channel's order): r0
    # lands at 3.06, r1's copy waits for that: 3.06-5.07, then its hops: 5.12.
    r = simulate(dep_with({"handover_s": 0.05}, link_bw=5e4), wl)
    np.testing.assert_allclose(r.transfer_end_s, [3.06, 5.12])
    # Hops as a pure delay (not the runtime's structure): the link is free after each copy.
    r = simulate(dep_with({"handover_s": 0.05, "handover_serial": False}, link_bw=5e4), wl)
    np.testing.assert_allclose(r.transfer_end_s, [3.06, 5.06])
    # 0.01 s more per request in flight (both are, until they finish): 0.07 of hops each.
    r = simulate(dep_with({"handover_s": 0.05, "handover_s_per_stream": 0.01}, link_bw=5e4), wl)
    np.testing.assert_allclose(r.transfer_end_s, [3.08, 5.16])


def test_link_latency_overlaps_the_next_copy():
    # A link of 2.5 s latency and 1e9 B/s (the bytes take ~nothing): r0's prefill ends at 1.0,
    # r1's at 2.0; each lands 2.5 s (+ bytes) later. Held for its latency, the link would make
    # r1 wait until 3.5 and land at 6.0 (the bug that queued same-GPU hand-overs).
    prof = dict(profile(), kv_transfer={"intra_node": {"bandwidth": 1e9, "latency_s": 2.5}})
    dep = Deployment(16, KV_BYTES, prefill=group(prof=prof), decode=group(prof=prof))
    r = simulate(dep, workload([0.0, 0.0], [100, 100], [3, 3]))
    copy = 100 * KV_BYTES / 1e9
    np.testing.assert_allclose(r.transfer_end_s, [3.5 + copy, 4.5 + copy])


def test_decode_host_time_grows_with_requests_in_flight():
    # Decode alone, 11 tokens each (10 steps): 0.1 s steps plus 0.01 s per request in flight.
    terms = {"step_host_s_per_stream": 0.01}
    alone = simulate(dep_with(terms), workload([0.0], [100], [11]), phase="decode")
    np.testing.assert_allclose(alone.tpot_s, [0.11])
    # Four at once: r0's first step starts alone (0.11; the others join at its end), then steps
    # of four in flight take 0.14 until r0 finishes (1.37), the last step of three 0.13 (1.50).
    four = simulate(dep_with(terms), workload([0.0] * 4, [100] * 4, [11] * 4), phase="decode")
    np.testing.assert_allclose(four.finish_s, [0.11 + 9 * 0.14] + [0.11 + 9 * 0.14 + 0.13] * 3)
    plain = simulate(dep_with(None), workload([0.0] * 4, [100] * 4, [11] * 4), phase="decode")
    np.testing.assert_allclose(plain.finish_s, [1.0, 1.1, 1.1, 1.1])     # without the term


def test_dispatch_and_return_add_to_ttft_only():
    wl = workload([0.0], [100], [2])
    base = simulate(dep_with(None), wl)
    r = simulate(dep_with({"dispatch_s": 0.05, "return_s": 0.02}), wl)
    np.testing.assert_allclose(r.ttft_s, base.ttft_s + 0.07)
    np.testing.assert_allclose(r.tpot_s, base.tpot_s)
    assert r.arrival_s[0] == 0.0


def test_cpu_workers_share_the_cores():
    # One core for both workers: while both are busy each runs at half speed, as a GPU shared
    # 0.5/0.5 (test_simulator_by_hand's shared case, the same times).
    wl = workload([0.0, 1.66], [100, 100], [11, 2])
    r = simulate(dep_with({"host_cores": 1}), wl)
    np.testing.assert_allclose(r.first_token_s, [1.0, 3.085])
    np.testing.assert_allclose(r.finish_s, [2.51, 3.295])
    # Two cores, nobody else: nothing slows down.
    r = simulate(dep_with({"host_cores": 2}), wl)
    np.testing.assert_allclose(r.first_token_s, [1.0, 2.66])
    # Two cores and the others wanting 1: each busy worker gets 2/3 of a core while both work;
    # the others wanting 3 compete as 3 threads: 2/5 each.
    r = simulate(dep_with({"host_cores": 2, "other_cores": 1.0}), wl)
    assert r.first_token_s[1] > 2.66 and r.finish_s[0] > 2.11
    crowded = simulate(dep_with({"host_cores": 2, "other_cores": 3.0}), wl)
    np.testing.assert_allclose(crowded.first_token_s[0], 2.0)     # r0 alone: 4 tasks on 2 cores, half speed
    # Streaming tokens costs the frontend CPU, which the workers then lack.
    busy = simulate(dep_with({"host_cores": 1.2, "frontend_cpu_s_per_token": 0.05}), wl)
    idle = simulate(dep_with({"host_cores": 1.2}), wl)
    assert busy.finish_s[0] > idle.finish_s[0]


def test_water_fill_is_max_min_fair():
    assert _water_fill([1, 1, 0, 1], 2) == pytest.approx([2 / 3, 2 / 3, 0, 2 / 3])
    assert _water_fill([1, 1, 0.2, 0.3], 2) == pytest.approx([0.75, 0.75, 0.2, 0.3])
    assert _water_fill([1, 0, 0, 0.5], 2) == pytest.approx([1, 0, 0, 0.5])


def test_serving_section_is_validated_and_round_trips():
    terms = {"dispatch_s": 0.004, "handover_s_per_stream": 2e-4, "shared_speeds": [0.54, 0.53]}
    model = ProfiledModel(dict(profile(), serving=terms))
    assert model.serving == ServingTerms(dispatch_s=0.004, handover_s_per_stream=2e-4, shared_speeds=(0.54, 0.53))
    assert ServingTerms.from_dict(model.serving.to_dict()) == model.serving
    with pytest.raises(ConfigError, match="handover_ms"):
        ProfiledModel(dict(profile(), serving={"handover_ms": 1}))
    with pytest.raises(ConfigError, match="dispatch_s"):
        ServingTerms(dispatch_s=-1)
    with pytest.raises(ConfigError, match="handover_serial"):
        ServingTerms.from_dict({"handover_serial": 1})


def test_a_plan_sharing_a_gpu_takes_the_measured_split_from_a_serving_profile():
    # What `disagg simulate --plan ... --latency-model PROFILE` builds.
    from pathlib import Path

    from engine.plan import Plan
    from placement.deployment import deployment_from_plan
    repo = Path(__file__).resolve().parents[2]
    plan = Plan.load(repo / "benchmarks" / "plans" / "h200_1p1d_llama3_8b.json")
    served = deployment_from_plan(plan, latency=str(repo / "placement" / "profiles" / "H200_llama-3-8b-serving-1p1d.json"))
    assert served.shared == [(0, 0)]
    assert served.shared_speeds == served.decode.latency.serving.shared_speeds != (0.5, 0.5)
    assert served.decode.latency.serving.step_host_s_per_stream > 0
    plain = deployment_from_plan(plan, latency=str(repo / "placement" / "profiles" / "H200_llama-3-8b.json"))
    assert plain.shared_speeds == (0.5, 0.5) and plain.decode.latency.serving is None


def test_shared_speeds_follow_the_decode_batch_by_interpolation():
    table = ((1, 0.8, 0.7), (32, 0.4, 0.6))
    assert speeds_at(table, 0) == speeds_at(table, 1) == (0.8, 0.7)         # below: the first row
    assert speeds_at(table, 500) == (0.4, 0.6)                              # above: the last row
    p, d = speeds_at(table, 16.5, step=0)                                    # half way: linear
    assert p == pytest.approx(0.6) and d == pytest.approx(0.65)
    assert speeds_at(table, 16) == (0.605, 0.65)      # 0.6065, 0.6516 on the simulator's 0.005 grid
    terms = ServingTerms.from_dict({"shared_speeds": [0.6, 0.5], "shared_speeds_by_batch": [[32, 0.4, 0.6], [1, 0.8, 0.7]]})
    assert terms.shared_speeds_by_batch == ((1.0, 0.8, 0.7), (32.0, 0.4, 0.6))     # sorted by batch
    assert ServingTerms.from_dict(terms.to_dict()) == terms
    # A profile without the table keeps its serving section as it was (no new key written).
    assert "shared_speeds_by_batch" not in ServingTerms(shared_speeds=(0.6, 0.5)).to_dict()
    for bad in ([[1, 0.8]], [[1, 0.8, 0]], [[4, 0.8, 0.7], [4, 0.5, 0.5]], []):
        with pytest.raises(ConfigError, match="shared_speeds_by_batch"):
            ServingTerms.from_dict({"shared_speeds_by_batch": bad})
    with pytest.raises(ConfigError, match="shared_speed_table"):
        Deployment(16, KV_BYTES, prefill=group(), decode=group(), shared=[(0, 0)], shared_speed_table=[[1, 2, 0.5]])


def _probe_prefill_s(decode_batch: int, table=None, speeds=(0.5, 0.5)) -> float:
    # `decode_batch` requests (10-token prompts, 400 tokens each: decode steps of 0.1 s at full
    # speed) are decoding when a 100-token probe arrives at t=20 (its prefill: 1.0 s alone).
    n = decode_batch
    wl = workload([0.0] * n + [20.0], [10] * n + [100], [400] * n + [1])
    dep = Deployment(16, KV_BYTES, prefill=group(), decode=group(), shared=[(0, 0)], shared_speeds=speeds,
                     shared_speed_table=table)
    r = simulate(dep, wl)
    assert r.finish_s[:n].min() > r.first_token_s[n] > 20.0     # the decode ran throughout
    return float(r.first_token_s[n] - r.prefill_start_s[n])


def test_a_bigger_decode_batch_slows_the_simulated_prefill():
    # Measured on the H200 (2026-12-02 05:22) beside a decode batch of 16 only: one scalar split.
    # With a table the prefill's speed follows the decode's batch: 0.8 beside 1, 0.4 beside 32.
    table = ((1, 0.8, 0.7), (32, 0.4, 0.6))
    assert _probe_prefill_s(1, table) == pytest.approx(1.0 / 0.8)
    assert _probe_prefill_s(32, table) == pytest.approx(1.0 / 0.4)
    assert _probe_prefill_s(16, table) == pytest.approx(1.0 / 0.605)       # interpolated
    assert _probe_prefill_s(1, table) < _probe_prefill_s(8, table) < _probe_prefill_s(16, table) \
        < _probe_prefill_s(32, table)
    # Without the table the scalar split holds at every batch (profiles and recordings before it).
    assert _probe_prefill_s(1) == pytest.approx(_probe_prefill_s(32)) == pytest.approx(2.0)


def test_a_serving_profile_with_the_table_reaches_the_deployment(tmp_path):
    import json
    from pathlib import Path

    from engine.plan import Plan
    from placement.deployment import deployment_from_plan
    repo = Path(__file__).resolve().parents[2]
    plan = Plan.load(repo / "benchmarks" / "plans" / "h200_1p1d_llama3_8b.json")
    prof = json.loads((repo / "placement" / "profiles" / "H200_llama-3-8b-serving-1p1d.json").read_text())
    committed = repo / "placement" / "profiles" / "H200_llama-3-8b-serving-1p1d.json"
    assert deployment_from_plan(plan, latency=str(committed)).shared_speed_table[0][0] == 1    # measured 14:45
    before = repo / "benchmarks" / "recorded" / "fidelity-h200-2026-12-02b" / "profile-serving-allrates.json"
    assert deployment_from_plan(plan, latency=str(before)).shared_speed_table is None       # no table: scalar
    prof["serving"]["shared_speeds_by_batch"] = [[1, 0.9, 0.6], [128, 0.5, 0.5]]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(prof))
    dep = deployment_from_plan(plan, latency=str(path))
    assert dep.shared_speed_table == ((1, 0.9, 0.6), (128, 0.5, 0.5))


def test_cpu_workers_beside_each_other_run_no_faster_than_the_corun_table():
    # Two cores, nobody else, but the CPU cluster measured each worker at half speed while the
    # other phase's worker is busy (`shared_speeds_by_batch` on CPU): the same times as one
    # core shared (test_cpu_workers_share_the_cores), though each worker has a core.
    wl = workload([0.0, 1.66], [100, 100], [11, 2])
    table = [[1, 0.5, 0.5], [16, 0.5, 0.5]]
    r = simulate(dep_with({"host_cores": 2, "shared_speeds_by_batch": table}), wl)
    np.testing.assert_allclose(r.first_token_s, [1.0, 3.085])
    np.testing.assert_allclose(r.finish_s, [2.51, 3.295])
    # The scalar speeds do the same at every batch; speeds of 1 change nothing.
    r = simulate(dep_with({"host_cores": 2, "shared_speeds": [0.5, 0.5]}), wl)
    np.testing.assert_allclose(r.first_token_s, [1.0, 3.085])
    r = simulate(dep_with({"host_cores": 2, "shared_speeds": [1.0, 1.0]}), wl)
    np.testing.assert_allclose(r.first_token_s, [1.0, 2.66])
    # The lower of the share and the table holds: one core shared is half speed already.
    r = simulate(dep_with({"host_cores": 1, "shared_speeds": [0.8, 0.8]}), wl)
    np.testing.assert_allclose(r.first_token_s, [1.0, 3.085])


def test_the_frontend_takes_the_cores_its_table_says():
    wl = workload([0.0, 1.66], [100, 100], [11, 2])
    idle = simulate(dep_with({"host_cores": 1.2}), wl)
    # 0.2 cores with nothing streaming leaves the lone prefill its core; while tokens stream
    # (from 5 tokens/s on) the frontend wants 0.6 and the three share the 1.2 cores, 0.4 each.
    busy = simulate(dep_with({"host_cores": 1.2, "frontend_cores_by_rate": [[0, 0.2], [5, 0.6]]}), wl)
    assert busy.first_token_s[0] == pytest.approx(idle.first_token_s[0])
    assert busy.finish_s[0] > idle.finish_s[0] and busy.first_token_s[1] > idle.first_token_s[1]
    terms = ServingTerms.from_dict({"host_cores": 2, "frontend_cores_by_rate": [[0, 0.1], [300, 0.3]]})
    assert terms.frontend_cores_by_rate == ((0.0, 0.1), (300.0, 0.3))
    assert ServingTerms.from_dict(terms.to_dict()) == terms
    assert "frontend_cores_by_rate" not in ServingTerms(host_cores=2).to_dict()
    for bad in ([[300, 0.3], [0, 0.1]], [[0, -1]], [[0]], []):
        with pytest.raises(ConfigError, match="frontend_cores_by_rate"):
            ServingTerms.from_dict({"frontend_cores_by_rate": bad})

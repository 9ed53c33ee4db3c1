"""The placement search's shortcuts give the answers of the full searches: a goodput search cut
short once a configuration cannot win, a passing probe reused as the replay at its rate, and a
report that runs each of its replays once."""
import numpy as np

from engine.model_config import PRESETS
from placement.deployment import Deployment
from placement.gpus import get_device
from placement.optimizer import DevicePool, Optimizer, PlaceSpec, place
from placement.report import build_report
from placement.search import deployment_goodput
from placement.simulator import simulate
from placement.slo_metrics import search_goodput
from placement.workload import make_workload



def _step(goodput):
    return lambda rate: 1.0 if rate <= goodput else 0.5


def test_stop_below_changes_nothing_for_a_winner_and_bounds_a_loser():
    full = search_goodput(_step(7.3), 0.9, start_rate=5.0, step=1.25)
    assert 7.3 * 0.96 <= full.rate <= 7.3 and full.below is None
    same = search_goodput(_step(7.3), 0.9, start_rate=5.0, step=1.25, stop_below=6.0)
    assert (same.rate, same.probes, same.below) == (full.rate, full.probes, None)
    cut = search_goodput(_step(7.3), 0.9, start_rate=5.0, step=1.25, stop_below=12.0)
    assert cut.below is not None and 7.3 < cut.below <= 12.0
    assert cut.probes == full.probes[:len(cut.probes)] and len(cut.probes) < len(full.probes)
    # A start that fails under the bar stops at once.
    assert len(search_goodput(_step(7.3), 0.9, start_rate=10.0, step=1.25, stop_below=12.0).probes) == 1


def test_the_passing_probe_is_the_plain_replay_at_the_goodput():
    spec = _spec()
    c = Optimizer(spec).candidates(0)[0]
    dep = Deployment(16, spec.model.kv_bytes_per_token(), colocated=c.group(2, "chunked", 4096, 64))
    g = deployment_goodput(dep, spec.workload, spec.ttft_s, spec.tpot_s, 0.9, start_rate=1.0)
    assert g.rate > 0 and g.result is not None
    fresh = simulate(dep, spec.workload.at_rate(g.rate))
    for name in ("first_token_s", "finish_s", "decode_step_s", "num_preemptions"):
        np.testing.assert_array_equal(getattr(g.result, name), getattr(fresh, name))


def _spec(**kw):
    model = PRESETS["embedded"]
    wl = make_workload("sharegpt", num_requests=200, max_model_len=model.max_position_embeddings)
    args = dict(model=model, model_name="embedded", pools=[DevicePool(get_device("cpu"), 4, 1)], ttft_s=3.0,
                tpot_s=0.3, attainment=0.9, workload=wl, workload_name="sharegpt", max_batch_tokens=4096,
                max_batch_size=64)
    args.update(kw)
    return PlaceSpec(**args)


def test_cut_colocated_searches_pick_what_the_full_ones_pick():
    spec = _spec()
    for phase in ("colocated", "colocated-chunked"):
        full = Optimizer(spec).score_phase(phase, exhaustive=True)
        fast = Optimizer(spec).score_phase(phase)
        best = max((r for r in full if r.goodput), key=lambda r: r.per_unit(False))
        won = max((r for r in fast if r.goodput), key=lambda r: r.per_unit(False))
        assert (won.candidate.tp, won.candidate.pp, won.goodput) == (best.candidate.tp, best.candidate.pp, best.goodput)
        for f, c in zip(full, fast):
            assert f.candidate.label == c.candidate.label
            if c.goodput_below is not None:     # cut short: really below the winner per device
                assert f.goodput < c.goodput_below <= won.per_unit(False) * c.candidate.ranks
            else:
                assert c.goodput == f.goodput
        assert any(r.goodput_below is not None for r in fast), "the case no longer exercises a cut"


def test_report_numbers_are_those_of_fresh_replays():
    spec = _spec(pools=[DevicePool(get_device("cpu"), 2, 1)])
    plan = place(spec)
    wl = spec.workload
    report = build_report(plan, wl)
    ttft, tpot = plan.slo_ttft_s, plan.slo_tpot_s
    from placement.report import systems_of
    for s in systems_of(plan, "roofline"):
        numbers = report["systems"][s.name]
        for point in numbers["attainment_vs_rate"]:
            assert point["attainment"] == simulate(s.deployment, wl.at_rate(point["rate"])).attainment(ttft, tpot)
        fresh = simulate(s.deployment, wl.at_rate(report["reference_rate"])).summary(ttft, tpot)
        assert numbers["at_reference_rate"]["summary"] == fresh

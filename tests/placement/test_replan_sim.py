"""Traces back to back (placement/trace_mix.py) and re-planning simulated over time
(placement/replan_sim.py): on Azure code then conversation, compressed so 8 H100 are loaded,
the split tuned for the code part collapses on the conversation part and the re-planner moves
away from it."""
import numpy as np
import pytest

from engine.errors import ConfigError
from engine.plan import PhaseConfig, Plan
from placement.latency_profile import PROFILES_DIR
from placement.replan import ReplanConfig, Split
from placement.replan_sim import all_splits, met_fixed, simulate_replanning
from placement.trace_mix import back_to_back, compress, parse_items

H100 = str(PROFILES_DIR / "H100_llama-3-8b.json")
PH = dict(device="cuda", gpu_type="H100", max_batch_tokens=8192, max_batch_size=256)


def test_back_to_back_segments():
    wl, segs = back_to_back("azure-code:120,azure-conv:120", max_model_len=8192)
    assert [s.name for s in segs] == ["azure-code:120", "azure-conv:120"]
    assert sum(s.num_requests for s in segs) == wl.num_requests
    assert np.all(np.diff(wl.arrival_s) >= 0) and segs[1].start_s > segs[0].end_s
    code, conv = wl.prompt_lens[:segs[0].num_requests], wl.prompt_lens[segs[0].num_requests:]
    assert code.mean() > 1.3 * conv.mean()              # the mix really shifts
    fast, fsegs = compress(wl, segs, 10)
    assert fast.arrival_s[-1] == pytest.approx(wl.arrival_s[-1] / 10) and fsegs[1].start_s == pytest.approx(segs[1].start_s / 10)
    assert parse_items("a, b:30") == [("a", None), ("b", 30.0)]
    for bad in ("", "azure-code:x", "azure-code:-1"):
        with pytest.raises(ConfigError):
            parse_items(bad)


def test_replanning_leaves_a_split_that_stops_fitting():
    plan = Plan(model="llama-3-8b", dtype="bfloat16", prefill=PhaseConfig(num_instances=6, **PH),
                decode=PhaseConfig(num_instances=2, **PH), slo_ttft_s=0.4, slo_tpot_s=0.04)
    wl, segs = compress(*back_to_back("azure-code:900,azure-conv:600", max_model_len=8192), 10)
    start = Split(7, 1)                                  # what the code part alone asks for
    fixed = met_fixed(plan, start, wl, H100)
    n_code = segs[0].num_requests
    cfg = ReplanConfig(interval_s=5, window_s=30, max_window_requests=384, repeat=3, min_dwell_s=20)
    run = simulate_replanning(plan, wl, H100, cfg, start, flip_cost_s=5, max_model_len=8192)
    assert fixed[n_code:].mean() < 0.6                   # 1 decode instance cannot hold the conversations
    assert any(f["from"] == "prefill" and f["to"] == "decode" for f in run.flips), run.flips
    assert all(Split(*(int(x[:-1]) for x in s.split("+"))).servable for _, s in run.splits)
    assert run.met[n_code:].mean() > fixed[n_code:].mean() + 0.2
    assert run.attainment > fixed.mean()
    assert Split(7, 1) in all_splits(8, ("prefill", "decode")) and len(all_splits(8, ("prefill", "decode"))) == 7

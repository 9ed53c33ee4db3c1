"""`python -m benchmarks.fidelity --from-dir`: recorded GPU runs (one H200, 2026-12-02: the old
runtime at 03:58 and the async-scheduling one at 05:22, committed under benchmarks/recorded/)
re-predicted with the current simulator on this machine."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECORDED = REPO / "benchmarks" / "recorded" / "fidelity-h200-2026-12-02"
ASYNC = REPO / "benchmarks" / "recorded" / "fidelity-h200-2026-12-02b"     # after async scheduling


def test_offline_repredicts_a_recorded_run(tmp_path):
    out = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fidelity", "--from-dir", str(RECORDED), "--out", str(out),
                           "--fit-rates", "64"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "fidelity.json").read_text())
    assert [r["rate"] for r in res["runs"]] == [8, 16, 24, 32, 48, 64, 80, 96]
    assert res["summary"]["fit_rates"] == [64]
    assert [r["role"] for r in res["runs"]] == ["check"] * 5 + ["fit", "check", "check"]
    # Measured attainment falls under 50% after 64 req/s (0.592, then 0.421).
    assert res["summary"]["range_rates"] == [8, 16, 24, 32, 48, 64]
    for r in res["runs"]:
        assert set(r["predicted"]) == {"engine", "zero-load calibration", "calibrated"}
        assert r["measured"]["attainment"] == json.loads((RECORDED / f"bench-rate{r['rate']:g}.json").read_text())["attainment"]
    # The calibrated profile carries the fitted terms, and placement reads it back.
    from placement.latency_profile import ProfiledModel, load_profile
    terms = ProfiledModel(load_profile(out / "profile-serving.json")).serving
    assert terms.dispatch_s > 0 and terms.shared_speeds is not None
    assert res["summary"]["load_terms"]["step_host_s_per_stream"] == terms.step_host_s_per_stream
    assert "load terms" in proc.stdout and "rate 64 req/s [fit, in range]" in proc.stdout
    # The old runtime queued its hand-overs: its controller hops hold the link.
    assert res["summary"]["load_terms"]["handover_s"] > 0
    r64 = next(r for r in res["runs"] if r["rate"] == 64)
    assert r64["verdict"]["calibrated"]["ok"], r64


def test_offline_names_what_is_missing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fidelity", "--from-dir", str(tmp_path), "--out",
                           str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no fidelity.json" in proc.stderr


@pytest.mark.parametrize("bad", ["16,x"])
def test_bad_fit_rates_are_refused(tmp_path, bad):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fidelity", "--from-dir", str(RECORDED), "--out",
                           str(tmp_path), "--fit-rates", bad], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--fit-rates" in proc.stderr


def test_load_terms_from_another_fit_are_checked_on_every_rate(tmp_path):
    # The committed serving profile's load terms (fitted on every rate of the 05:22 recording),
    # checked on each rate of it without refitting.
    prof = REPO / "placement" / "profiles" / "H200_llama-3-8b-serving-1p1d.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fidelity", "--from-dir", str(ASYNC), "--out", str(tmp_path),
                           "--load-terms-from", str(prof)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "fidelity.json").read_text())
    assert {r["role"] for r in res["runs"]} == {"check"} and res["summary"]["fit_rates"] == []
    from benchmarks.fidelity_predict import LOAD_GRID
    serving = json.loads(prof.read_text())["serving"]
    terms = res["summary"]["load_terms"]
    assert {k: terms[k] for k in LOAD_GRID} == {k: serving[k] for k in LOAD_GRID}
    assert 0.85 <= terms["prefill_share_scale"] < 1
    assert res["summary"]["range_rates"] == [8, 16, 32, 48, 64, 80]   # 80 req/s: 0.504 measured
    for r in res["runs"]:
        meas, pred = r["measured"], r["predicted"]["calibrated"]
        # The runtime barely queues hand-overs any more (0.8-23 ms mean); neither does the model
        # (it predicted 22-600 ms when the link was held for its latency, 1-2 s with the old
        # runtime's hops), and p90 TPOT holds at every rate.
        assert meas["kv_transfer_mean_s"] < 0.025 and pred["kv_transfer_mean_s"] < 0.05, r["rate"]
        assert abs(r["verdict"]["calibrated"]["tpot_p90_rel"]) <= 0.15, r["rate"]
        # Attainment and p90 TTFT: within target at every rate but 64 req/s (+5.4 points there,
        # on the knee: docs/benchmarks.md, "Fidelity on the H200 after async scheduling").
        v = r["verdict"]["calibrated"]
        assert abs(v["ttft_p90_rel"]) <= 0.15 and abs(v["attainment_pp"]) <= (6 if r["rate"] == 64 else 3), r["rate"]


def test_a_split_of_the_async_recording_holds_on_its_checked_rates(tmp_path):
    # Fitted on 8/32/64 req/s, checked on 16/48/80 (the reverse split misses: docs/benchmarks.md).
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fidelity", "--from-dir", str(ASYNC), "--out", str(tmp_path),
                           "--fit-rates", "8,32,64"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((tmp_path / "fidelity.json").read_text())["summary"]
    assert s["fit_rates"] == [8, 32, 64] and s["load_terms"]["handover_s"] == 0
    assert s["checked_in_range_ok"] and s["all_in_range_ok"]

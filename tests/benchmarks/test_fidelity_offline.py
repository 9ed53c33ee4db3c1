"""`python -m benchmarks.fidelity --from-dir`: a recorded GPU run (one H200, 2026-12-02, committed
under benchmarks/recorded/) re-predicted with the current simulator on this machine."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECORDED = REPO / "benchmarks" / "recorded" / "fidelity-h200-2026-12-02"


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
    # The committed serving profile's load terms (fitted on this recording's 16/32/64 req/s runs).
    prof = REPO / "placement" / "profiles" / "H200_llama-3-8b-serving-1p1d.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fidelity", "--from-dir", str(RECORDED), "--out", str(tmp_path),
                           "--load-terms-from", str(prof)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "fidelity.json").read_text())
    assert {r["role"] for r in res["runs"]} == {"check"} and res["summary"]["fit_rates"] == []
    from benchmarks.fidelity_predict import LOAD_GRID
    assert res["summary"]["load_terms"] == {k: json.loads(prof.read_text())["serving"][k] for k in LOAD_GRID}
    # The hand-over it predicts at 64 req/s follows the measured one (the server's breakdown).
    r64 = next(r for r in res["runs"] if r["rate"] == 64)
    meas, pred = r64["measured"]["kv_transfer_mean_s"], r64["predicted"]["calibrated"]["kv_transfer_mean_s"]
    assert abs(pred - meas) / meas < 0.15

"""`python -m benchmarks.fidelity --from-dir`: recorded GPU runs (one H200, 2026-12-02: the old
runtime at 03:58 and the async-scheduling one at 05:22, committed under benchmarks/recorded/)
re-predicted with the current simulator on this machine."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.fidelity import read_bench

REPO = Path(__file__).resolve().parents[2]
RECORDED = REPO / "benchmarks" / "recorded" / "fidelity-h200-2026-12-02"
ASYNC = REPO / "benchmarks" / "recorded" / "fidelity-h200-2026-12-02b"     # after async scheduling
# The 05:22 recording's all-rates fit (the committed serving profile until the 14:45 run).
ASYNC_PROFILE = ASYNC / "profile-serving-allrates.json"
TABLE = REPO / "benchmarks" / "recorded" / "fidelity-h200-2026-12-02d"     # with the table over decode batches


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
        assert r["measured"]["attainment"] == read_bench(RECORDED, r["rate"])["attainment"]
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
    # The 05:22 recording's all-rates fit (its load terms),
    # checked on each rate of it without refitting.
    prof = ASYNC_PROFILE
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


def _records(start_gaps, window, slow, n_tokens=200, batch=4):
    """Decode records of a batch as the client sees them: gaps growing with the step's index
    (0.010 s + 20 us per step), `slow` times longer while they start inside `window`."""
    from cluster.bench import Record
    recs = []
    for k in range(batch):
        r = Record(index=k, prompt_len=64, output_len=n_tokens, arrival_s=0.0, sent_s=0.0,
                   first_token_s=start_gaps, status="OK", num_tokens=n_tokens)
        t = 1000.0 + start_gaps
        for i in range(n_tokens - 1):
            g = (0.010 + 2e-5 * i) * (slow if window[0] <= t < window[1] else 1.0)
            r.itl_s.append(g)
            t += g
        r.last_token_s = t - 1000.0
        recs.append(r)
    return recs


def test_interference_row_reads_each_speed_from_one_run():
    # Ten prefills (0.03 s each beside the decode, 0.02 s alone) one after another, 0.05 s apart:
    # the window is 1001.0-1001.5 s and the prefill computes 60% of it. The decode's steps take
    # 1.6 times as long meanwhile: its speed = 0.6 / (1.6 - 1 + 0.6) = 0.5; the prefill's 2/3.
    from cluster.bench import Record
    from benchmarks.fidelity_calibration import interference_row
    pre = [Record(index=k, prompt_len=256, output_len=1, arrival_s=0.0, sent_s=0.1 + 0.05 * k,
                  done_s=0.15 + 0.05 * k, status="OK", num_tokens=1, timings={"prefill_compute_s": 0.03})
           for k in range(10)]
    row = interference_row(4, 0.02, pre, 1000.9, _records(0.1, (1001.0, 1001.5), 1.6), 1000.0)
    assert row["decode_batch"] == 4 and row["window_s"] == pytest.approx(0.5)
    assert row["prefill_busy_share"] == pytest.approx(0.6)
    # The decode's gaps alone grow with its context: read at the window's steps, not averaged.
    assert row["decode_itl_ratio"] == pytest.approx(1.6, rel=0.01)
    assert row["shared_speeds"] == pytest.approx([2 / 3, 0.5], rel=0.02)
    # Prefills that ran after the decode had finished do not count: here none ran beside it.
    assert interference_row(4, 0.02, pre, 1000.9, _records(0.1, (0, 0), 1.0, n_tokens=20), 1000.0) is None
    # Nor those before the whole batch decodes: from 1001.22 on only the last five count.
    late = interference_row(4, 0.02, pre, 1000.9, _records(1.22, (1001.25, 1001.5), 1.6), 1000.0)
    assert late["window_s"] == pytest.approx(0.25) and late["decode_itl_ratio"] == pytest.approx(1.6, rel=0.02)


def test_the_interference_table_reaches_the_calibrated_profile():
    from benchmarks.fidelity_calibration import calibrated_profile, fit_calibration
    from placement.latency_profile import ProfiledModel, load_profile
    rec = json.loads((ASYNC / "fidelity.json").read_text())
    raw = rec["calibration"]["raw"]
    engine = load_profile(REPO / "placement" / "profiles" / "H200_llama-3-8b.json")
    old = calibrated_profile(engine, fit_calibration(raw, 131072, gpu=True))
    assert "shared_speeds_by_batch" not in old["serving"]          # recorded before the table: the scalar
    assert ProfiledModel(old).serving.shared_speeds == tuple(raw["interference"]["shared_speeds"])
    rows = [{"decode_batch": b, "shared_speeds": [p, d]} for b, p, d in ((128, 0.45, 0.5), (1, 0.8, 0.5), (16, 0.6, 0.48))]
    raw = dict(raw, interference=dict(raw["interference"], by_batch=rows))
    new = ProfiledModel(calibrated_profile(engine, fit_calibration(raw, 131072, gpu=True))).serving
    assert new.shared_speeds_by_batch == ((1, 0.8, 0.5), (16, 0.6, 0.48), (128, 0.45, 0.5))


def test_a_recording_with_the_table_is_repredicted_with_it(tmp_path):
    # The 05:22 recording with an interference table added (made-up speeds: the prefill slower
    # beside bigger decode batches than the recorded 0.60 beside 16), re-predicted with the
    # committed load terms (no fit): the table reaches the profile and slows the loaded rates.
    import shutil
    src = tmp_path / "rec"
    shutil.copytree(ASYNC, src)
    rec = json.loads((src / "fidelity.json").read_text())
    rows = [{"decode_batch": b, "shared_speeds": [p, d]} for b, p, d in ((1, 0.8, 0.5), (16, 0.6, 0.477), (128, 0.4, 0.5))]
    rec["calibration"]["raw"]["interference"]["by_batch"] = rows
    (src / "fidelity.json").write_text(json.dumps(rec))
    prof = ASYNC_PROFILE
    res = {}
    for name, d in (("with", src), ("without", ASYNC)):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.fidelity", "--from-dir", str(d), "--out",
                               str(tmp_path / name), "--load-terms-from", str(prof)], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        res[name] = {r["rate"]: r["predicted"]["zero-load calibration"]
                     for r in json.loads((tmp_path / name / "fidelity.json").read_text())["runs"]}
    serving = json.loads((tmp_path / "with" / "profile-serving.json").read_text())["serving"]
    table = serving["shared_speeds_by_batch"]       # its prefill speeds times the loaded prefill_share_scale
    assert [r[0] for r in table] == [1, 16, 128] and table[0][1] > table[1][1] > table[2][1]
    assert "shared_speeds_by_batch" not in json.loads((tmp_path / "without" / "profile-serving.json").read_text())["serving"]
    # Under load (decode batches of ~100) the prefill runs at ~0.45 instead of 0.60: TTFT grows.
    assert res["with"][64]["ttft_p90_s"] > 1.1 * res["without"][64]["ttft_p90_s"]


def test_the_run_with_the_table_holds_at_every_rate_from_half_of_them(tmp_path):
    # The 15:34 H200 run (main of then; shared-GPU speeds measured beside decode batches of
    # 1-128): load terms fitted on every second covered rate (16, 32, 56, 72 req/s), checked on 8,
    # 24, 48, 64 (and 80, past the 50% point): every one within 3 points and 15%. The 14:44 run
    # (recording c) passes the same way (docs/benchmarks.md, "Fidelity on the H200 with the
    # shared-GPU table").
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fidelity", "--from-dir", str(TABLE), "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "fidelity.json").read_text())
    s = res["summary"]
    assert s["range_rates"] == [8, 16, 24, 32, 48, 56, 64, 72] and s["fit_rates"] == [16, 32, 56, 72]
    assert s["checked_in_range_ok"] and s["all_in_range_ok"], proc.stdout[-3000:]
    assert all(r["verdict"]["calibrated"]["ok"] for r in res["runs"]), proc.stdout[-3000:]
    serving = json.loads((tmp_path / "profile-serving.json").read_text())["serving"]
    assert [row[0] for row in serving["shared_speeds_by_batch"]] == [1, 4, 16, 64, 128]
    # The committed serving profile is this fit.
    committed = json.loads((REPO / "placement" / "profiles" / "H200_llama-3-8b-serving-1p1d.json").read_text())
    assert committed["serving"] == serving


def test_cpu_calibration_fits_each_phase_its_own_speed():
    # The prefills measured 2x the profile, the decode steps half of it: the decode's scale
    # comes from its own steps (tying it to the prefill's made every decode step as slow as
    # the calibration's prefills happened to run).
    from benchmarks.fidelity_calibration import fit_calibration
    pre = [(n, 2 * e, e) for n, e in ((16, 0.01), (128, 0.03), (512, 0.13))]
    dec = [(b, c, 0.5 * e, e) for b, c, e in ((1, 100, 0.006), (4, 400, 0.009), (16, 1600, 0.02), (16, 7744, 0.038))]
    cal = {"prefill": pre, "decode": dec, "handover": [(16, 0.01), (512, 0.012)], "ttft_offset": [0.005],
           "frontend_cpu_s_per_token": 4e-4, "other_cores": 0.0}
    fit = fit_calibration(cal, 1024, gpu=False)
    assert fit["prefill_scale"] == pytest.approx(2.0, rel=1e-3) and fit["prefill_overhead_s"] == pytest.approx(0, abs=1e-6)
    assert fit["decode_scale"] == pytest.approx(0.5, rel=1e-3)
    assert fit["decode_overhead_s"] == pytest.approx(0, abs=1e-6)


def test_the_frontend_table_is_idle_then_the_median_while_streaming():
    from benchmarks.fidelity_calibration import calibrated_profile, fit_calibration, frontend_table
    from placement.latency_profile import ProfiledModel, load_profile
    pts = [(0.0, 0.03), (304, 0.24), (367, 0.39), (471, 0.28), (905, 0.37), (1455, 0.36)]
    assert frontend_table(pts) == [[0.0, 0.03], [304.0, 0.36], [1455.0, 0.36]]
    assert frontend_table([(0.0, 0.05)]) == [[0.0, 0.05]]
    assert frontend_table([]) == [[0.0, 0.0]]
    # Through the fit into a CPU profile's serving section, which the simulator reads.
    pre = [(n, e, e) for n, e in ((16, 0.01), (128, 0.03), (512, 0.13))]
    dec = [(b, c, e, e) for b, c, e in ((1, 100, 0.006), (4, 400, 0.009), (16, 1600, 0.02))]
    cal = {"prefill": pre, "decode": dec, "handover": [(16, 0.01), (512, 0.012)], "ttft_offset": [0.005],
           "frontend_cpu_s_per_token": 4e-4, "other_cores": 0.0, "frontend_cores_by_rate": pts}
    engine = load_profile(REPO / "placement" / "profiles" / "cpu_embedded.json")
    serving = ProfiledModel(calibrated_profile(engine, fit_calibration(cal, 1024), cpu_cores=2.0)).serving
    assert serving.frontend_cores_by_rate == ((0.0, 0.03), (304.0, 0.36), (1455.0, 0.36))


def test_the_cpu_recording_is_repredicted_as_recorded_and_misses_where_it_did(tmp_path):
    # The 19:11 CPU run (2-core machine, 240 requests per rate, the co-run table and the
    # frontend's table measured at zero load), re-predicted with its own fitted terms. What it
    # shows (docs/benchmarks.md, "Fidelity under load on the 2-core CPU machine", run 8):
    # attainment within 3 points at every rate up to the 50% point, p90 TPOT within 16%, p90
    # TTFT within 15% at 2, 4, 8, 12 req/s but off by up to 33% at 6, 10, 14, 16: issue 15's CPU
    # target is not met. The test pins that state (a change to the simulator that moves it
    # shows here) and that the recording's table reaches the prediction.
    rec = REPO / "benchmarks" / "recorded" / "fidelity-cpu-2026-12-02"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fidelity", "--from-dir", str(rec), "--load-terms-from",
                           str(rec / "profile-serving.json"), "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "fidelity.json").read_text())
    covered = [r for r in res["runs"] if r["in_range"]]
    assert [r["rate"] for r in covered] == [2, 4, 6, 8, 10, 12, 14, 16]
    v = {r["rate"]: r["verdict"]["calibrated"] for r in covered}
    assert all(abs(x["attainment_pp"]) <= 3 and abs(x["tpot_p90_rel"]) <= 0.17 for x in v.values()), v
    assert all(abs(v[r]["ttft_p90_rel"]) <= 0.15 for r in (2, 4, 8, 12)), v
    assert max(abs(x["ttft_p90_rel"]) for x in v.values()) == pytest.approx(0.33, abs=0.02), v
    serving = json.loads((tmp_path / "profile-serving.json").read_text())["serving"]
    assert [row[0] for row in serving["shared_speeds_by_batch"]] == [1, 4, 16, 32]     # 64 gave no row there
    assert serving["frontend_cores_by_rate"][0][0] == 0 and serving["host_cores"] == 2


def test_the_speed_probes_scale_each_run_against_the_calibration():
    # The 2-vCPU VM's speed drifts over minutes: each run is predicted at the speed the
    # zero-load probes before and after it measured, over the calibration's same shapes.
    from benchmarks.fidelity_calibration import at_speed, probe_ratios
    from placement.latency_profile import load_profile
    cal = {"prefill": [(16, 0.01, 0.01), (512, 0.08, 0.1)],
           "decode": [(1, 100, 0.003, 0.004), (4, 400, 0.005, 0.006), (16, 1600, 0.01, 0.01)]}
    before, after = {"prefill_s": 0.1, "decode_itl_s": 0.006}, {"prefill_s": 0.1 * 1.44, "decode_itl_s": 0.005}
    p, d = probe_ratios(cal, before, after)
    assert p == pytest.approx(0.12 / 0.08) and d == pytest.approx((0.006 * 0.005) ** 0.5 / 0.005)
    assert probe_ratios(cal, before, None) == (pytest.approx(1.25), pytest.approx(1.2))
    assert probe_ratios(cal, None, None) == (1.0, 1.0)
    assert probe_ratios({"prefill": [], "decode": []}, before, after) == (1.0, 1.0)    # no shape to divide by
    engine = load_profile(REPO / "placement" / "profiles" / "cpu_embedded.json")
    assert at_speed(engine, 1.0, 1.0) is engine
    slow = at_speed(engine, 1.5, 0.5)
    for tp, e in engine["tp"].items():
        for k in "abc":
            assert slow["tp"][tp]["prefill"][k] == pytest.approx(1.5 * e["prefill"][k])
            assert slow["tp"][tp]["decode"][k] == pytest.approx(0.5 * e["decode"][k])
    assert engine["tp"]["1"]["prefill"]["a"] != slow["tp"]["1"]["prefill"]["a"]     # a copy, not changed in place


def test_a_probed_run_is_predicted_at_its_speed(tmp_path):
    # The same recorded run with probes saying the machine ran 1.3x slower than at the
    # calibration: every queue grows, so TTFT and TPOT come out longer than without.
    from benchmarks import fidelity_predict as fp
    from engine.plan import Plan
    rec = REPO / "benchmarks" / "recorded" / "fidelity-cpu-2026-12-02"
    res = json.loads((rec / "fidelity.json").read_text())
    cal = res["calibration"]["raw"]
    plan = Plan.load(rec / "plan.json")
    run = {"rate": 10.0, "run": read_bench(rec, 10.0)}
    p512 = next(m for n, m, _ in cal["prefill"] if n == 512)
    d4 = next(m for b, c, m, _ in cal["decode"] if b == 4 and c == 400)
    probed = dict(run, probe_before={"prefill_s": 1.3 * p512, "decode_itl_s": 1.3 * d4})
    from placement.latency_profile import load_profile
    engine = load_profile(REPO / "placement" / "profiles" / "cpu_embedded.json")
    out = fp.predict_runs(plan, engine, cal, 4096, False, [run, probed], (1.0, 0.05), cpu_cores=2.0,
                          load_terms={})
    plain, slow = (r["predicted"]["calibrated"] for r in out["runs"])
    assert out["runs"][1]["speed"] == (pytest.approx(1.3), pytest.approx(1.3))
    assert slow["ttft_p90_s"] > 1.1 * plain["ttft_p90_s"] and slow["tpot_p90_s"] > 1.1 * plain["tpot_p90_s"]

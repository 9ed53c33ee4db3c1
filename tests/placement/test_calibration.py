"""The latency model against published measurements (placement/validation/points.csv)."""
import json

import numpy as np
import pytest

from engine.model_config import PRESETS
from placement.calibration import LIMIT, evaluate, load_calibration, load_points, predict, summary
from placement.gpus import DATASHEET, get_device
from placement.latency import RooflineModel
from placement.latency_profile import PROFILES_DIR

ROWS = evaluate(load_points(), load_calibration())


def test_held_out_error_per_phase_and_gpu_within_limit():
    # Pins docs/latency-model.md's table: a change to the model or its constants that makes
    # any phase on any GPU type worse than 15% median on points not used to fit fails here.
    table = summary(ROWS, "test")
    assert {gpu for _, gpu in table} >= {"A100-80GB", "H100"}
    assert {phase for phase, _ in table} >= {"prefill", "decode", "e2e"}
    for (phase, gpu), (err, n) in table.items():
        assert n >= 4 and err <= LIMIT, (phase, gpu, err)


def test_validation_covers_tp_1_to_8_on_both_gpu_types():
    for gpu in ("A100-80GB", "H100"):
        tps = {r["tp"] for r in ROWS if r["gpu"] == gpu and r["split"] == "test"}
        assert {1, 2, 4, 8} <= tps, (gpu, tps)


def test_datasheet_roofline_is_what_the_fit_fixes():
    # Without the fitted constants the model is optimistic almost everywhere (issue 15).
    raw = evaluate(load_points(), {})
    assert sum(r["error"] < 0 for r in raw) > 0.9 * len(raw)
    assert np.median([abs(r["error"]) for r in raw]) > 2 * np.median([abs(r["error"]) for r in ROWS])


def test_points_csv_predictions_match_the_committed_constants():
    # points.csv's predicted column is what `--fit` wrote; the constants must still give it.
    for r in load_points()[::7]:
        assert predict(r, load_calibration()) == pytest.approx(float(r["predicted_s"]), rel=1e-4)


@pytest.mark.parametrize("gpu", ["H100", "H200"])
def test_tp1_matches_our_measured_engine(gpu):
    path = PROFILES_DIR / f"{gpu}_llama-3-8b.json"
    assert path.is_file(), f"{path.name} is committed and must stay (issue 15's TP1 check)"
    samples = json.loads(path.read_text())["tp"]["1"]["samples"]
    lat = RooflineModel(PRESETS["llama-3-8b"], get_device(gpu), 1)
    for phase in ("prefill", "decode"):
        errs = []
        for s in (x for x in samples if x["phase"] == phase):
            t = (lat.prefill_time(s["prompt_lens"]) if phase == "prefill"
                 else lat.decode_time(s["batch_size"], s["sum_context"]))
            errs.append(abs(t / s["time_s"] - 1))
        assert np.median(errs) <= 0.10, (gpu, phase, np.median(errs))


def test_planner_devices_carry_the_fitted_constants():
    cal = load_calibration()
    assert get_device("A100").memory_efficiency == cal["devices"]["A100-80GB"]["memory_efficiency"]
    assert get_device("H200").compute_efficiency == cal["devices"]["H200"]["compute_efficiency"]
    # measured at TP1 only: its all-reduces are H100's (same NVLink 4 fabric)
    assert get_device("H200").allreduce_latency_s == cal["devices"]["H100"]["allreduce_latency_s"]
    assert get_device("L40S").memory_efficiency == cal["devices"]["A100-80GB"]["memory_efficiency"]
    assert get_device("H100").step_overhead_s == cal["engines"]["disagg"]["step_overhead_s"]
    assert DATASHEET["H100"].step_overhead_s != get_device("H100").step_overhead_s

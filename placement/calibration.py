"""Fit the latency model's constants to measured latencies and report its error.

    python -m placement.calibration --fit     # fit on the "fit" points, write calibration.json
    python -m placement.calibration           # evaluate the committed constants

Points come from placement/validation/points.csv (sources in its make_points.py and in
docs/latency-model.md). Kernel constants (efficiencies, all-reduce latency) are fitted per GPU
type; overheads (per step, per layer, per decoding request) per engine, since they are host
costs of the engine that measured them. The planner plans with our engine's ("disagg")
overheads. The fit minimises squared log error on the "fit" points only; the "test" points
are held out and their median absolute error is what docs/latency-model.md reports.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from placement.gpus import CALIBRATION_PATH, DATASHEET, calibrated
from placement.latency import RooflineModel
from placement.validation.models import validation_model

POINTS_PATH = Path(__file__).resolve().parent / "validation" / "points.csv"
# (field, lower, upper, scale) of each fitted constant.
KERNEL_PARAMS = (("compute_efficiency", 0.2, 0.95, 0.5), ("memory_efficiency", 0.3, 0.95, 0.7),
                 ("gemm_half_tokens", 0.0, 2048.0, 100.0), ("attention_efficiency", 0.1, 0.9, 0.4),
                 ("allreduce_latency_s", 1e-6, 5e-4, 3e-5))
ENGINE_PARAMS = (("step_overhead_s", 0.0, 0.05, 3e-3), ("layer_overhead_s", 0.0, 1e-3, 3e-5),
                 ("request_overhead_s", 0.0, 1e-4, 1e-6))
LIMIT = 0.15          # held-out median absolute error per phase and GPU type


def load_points(path: Path = POINTS_PATH) -> list[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("tp", "batch", "prompt_len", "context_len", "output_len"):
            r[k] = int(r[k])
        r["measured_s"] = float(r["measured_s"])
    return rows


def predict(row: dict, calibration: dict) -> float:
    """The model's time for one point, with the point's GPU type and engine constants."""
    device = calibrated(DATASHEET[row["gpu"]], calibration, row["engine"])
    lat = RooflineModel(validation_model(row["model"]), device, row["tp"])
    b, p = row["batch"], row["prompt_len"]
    if row["phase"] == "prefill":
        return lat.prefill_time([p] * b)
    if row["phase"] == "decode":
        return lat.decode_time(b, b * row["context_len"])
    # e2e: one prefill, then a step per further output token (the context grows by one each)
    steps = sum(lat.decode_time(b, b * (p + k)) for k in range(1, row["output_len"]))
    return lat.prefill_time([p] * b) + steps


def _layout(rows: list[dict]) -> list[tuple[str, str, str, float, float, float]]:
    gpus = sorted({r["gpu"] for r in rows})
    engines = sorted({r["engine"] for r in rows})
    multi = {r["gpu"] for r in rows if r["tp"] > 1}
    # A GPU type measured at TP1 only says nothing of its all-reduces: it borrows its
    # relative's (placement.gpus.CALIBRATED_LIKE).
    return ([("devices", g, *p) for g in gpus for p in KERNEL_PARAMS
             if g in multi or p[0] != "allreduce_latency_s"]
            + [("engines", e, *p) for e in engines for p in ENGINE_PARAMS])


def _calibration_from(x: np.ndarray, layout) -> dict:
    out: dict = {"devices": {}, "engines": {}}
    for v, (kind, key, name, *_rest) in zip(x, layout):
        out[kind].setdefault(key, {})[name] = float(v)
    return out


def fit(rows: list[dict]) -> dict:
    """Least squares on log(predicted / measured) over the "fit" rows."""
    try:
        from scipy.optimize import least_squares
    except ImportError:
        raise SystemExit("fitting needs scipy: pip install 'disagg-serve[test]' (or scipy)") from None

    train = [r for r in rows if r["split"] == "fit"]
    layout = _layout(rows)
    start = np.array([min(max(s, lo), hi) for *_k, lo, hi, s in layout])
    lo = np.array([p[3] for p in layout])
    hi = np.array([p[4] for p in layout])
    scale = np.array([p[5] for p in layout])
    measured = np.array([r["measured_s"] for r in train])

    def residuals(x):
        cal = _calibration_from(x, layout)
        return np.log(np.array([predict(r, cal) for r in train]) / measured)

    res = least_squares(residuals, start, bounds=(lo, hi), x_scale=scale, method="trf")
    return _calibration_from(res.x, layout)


def evaluate(rows: list[dict], calibration: dict) -> list[dict]:
    """Rows with predicted_s and error (predicted / measured - 1) filled in."""
    for r in rows:
        r["predicted_s"] = round(predict(r, calibration), 7)
        r["error"] = round(r["predicted_s"] / r["measured_s"] - 1, 4)
    return rows


def summary(rows: list[dict], split: str = "test") -> dict[tuple[str, str], tuple[float, int]]:
    """(phase, gpu) -> (median absolute error, number of points) over `split` rows."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["split"] == split:
            groups.setdefault((r["phase"], r["gpu"]), []).append(abs(r["error"]))
    return {k: (float(np.median(v)), len(v)) for k, v in sorted(groups.items())}


def summary_table(rows: list[dict]) -> str:
    """A markdown table of median absolute error per phase and GPU, held out and fitted."""
    test, train = summary(rows, "test"), summary(rows, "fit")
    lines = ["| phase | GPU | held-out points | held-out median abs error | fit points | fit median abs error |",
             "|---|---|---|---|---|---|"]
    for key, (err, n) in test.items():
        ferr, fn = train.get(key, (float("nan"), 0))
        lines.append(f"| {key[0]} | {key[1]} | {n} | {err:.1%} | {fn} | {ferr:.1%} |")
    return "\n".join(lines)


def write_points(rows: list[dict], path: Path = POINTS_PATH) -> None:
    fields = list(rows[0].keys())
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)


def load_calibration(path: Path = CALIBRATION_PATH) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m placement.calibration", description=__doc__.split("\n")[0])
    ap.add_argument("--fit", action="store_true", help="refit and write placement/calibration.json")
    args = ap.parse_args(argv)
    rows = load_points()
    if args.fit:
        cal = fit(rows)
        cal["fitted_on"] = f"{POINTS_PATH.name}: {sum(r['split'] == 'fit' for r in rows)} fit points"
        CALIBRATION_PATH.write_text(json.dumps(cal, indent=1, sort_keys=True) + "\n")
        print(f"wrote {CALIBRATION_PATH}")
    else:
        cal = load_calibration()
    evaluate(rows, cal)
    if args.fit:
        write_points(rows)
    print(summary_table(rows))
    worst = max(err for err, _ in summary(rows).values())
    return 0 if worst <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())

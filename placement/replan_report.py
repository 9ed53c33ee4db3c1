"""`disagg replan-report`: re-planning over time vs the best fixed split (in hindsight) vs the
split tuned for the start of the trace, simulated on traces back to back (placement/replan_sim.py).

For each load (the traces' arrival times compressed by a factor), it simulates every servable
split of the plan's instances over the whole run (fixed plans), picks the best one in hindsight
and the one that is best on the first `tune_s` seconds (before compression), and runs the
re-planner from the latter. Goodput per GPU: the highest load at which attainment reaches the
plan's target, interpolated between the loads simulated (req/s over the whole run / GPUs).
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path

import numpy as np

from engine.errors import ConfigError
from engine.plan import Plan
from placement.replan import ReplanConfig, Split, replan_roles
from placement.replan_sim import all_splits, met_fixed, met_pieces, simulate_replanning
from placement.trace_mix import back_to_back, compress


def _per_segment(met: np.ndarray, segments) -> dict:
    out, lo = {}, 0
    for s in segments:
        out[s.name] = round(float(met[lo:lo + s.num_requests].mean()), 4)
        lo += s.num_requests
    return out


def first_window_score(plan: Plan, split: Split, wl, latency: str) -> tuple[float, float]:
    """(attainment, minus p90 TTFT and TPOT relative to the SLO) of `split` on `wl`."""
    from placement.replan import _deployment
    from placement.simulator import simulate
    res = simulate(_deployment(plan.to_dict(), split, latency), wl)
    slo = (plan.slo_ttft_s, plan.slo_tpot_s)
    lat = float(np.percentile(res.ttft_s, 90)) / slo[0] + float(np.percentile(res.tpot_s, 90)) / slo[1]
    return round(res.attainment(*slo), 4), -lat


def run_load(plan: Plan, traces: str, factor: float, latency: str, config: ReplanConfig, tune_s: float,
             flip_cost_s: float, warmup_s: float, max_model_len: int, say=print) -> dict:
    """Every figure at one load (compression factor)."""
    t0 = time.perf_counter()
    wl, segs = compress(*back_to_back(traces, max_model_len=max_model_len), factor)
    roles, _ = replan_roles(plan)
    n = sum(p.num_instances for p in plan.phases.values())
    fixed, first = {}, {}
    tune_n = int(np.searchsorted(wl.arrival_s, tune_s / factor))
    for s in all_splits(n, roles):
        met = met_fixed(plan, s, wl, latency)
        fixed[s] = met
        first[s] = first_window_score(plan, s, wl.head(max(tune_n, 1)), latency)
        say(f"  x{factor:g} fixed {s}: {met.mean():.3f} (first {tune_s:g} s: {first[s][0]:.3f})")
    best = max(fixed, key=lambda s: fixed[s].mean())
    # Tuned on the first window alone (no hindsight): attainment, then the policy's tie-break
    # (lower p90 TTFT and TPOT relative to the SLO).
    tuned = max(first, key=lambda s: first[s])
    first = {s: v[0] for s, v in first.items()}
    run = simulate_replanning(plan, wl, latency, config, tuned, flip_cost_s, warmup_s, max_model_len)
    say(f"  x{factor:g} replan from {tuned}: {run.attainment:.3f}, {len(run.flips)} flips")
    cut = [t for t, _ in run.splits]
    best_cut = met_pieces(plan, wl, [(t, best) for t in cut], latency, warmup_s)
    rate = wl.rate
    return {
        "compression": factor, "num_requests": wl.num_requests, "duration_s": round(float(wl.arrival_s[-1]), 1),
        "rate_rps": round(rate, 3),
        "segments": [{"name": s.name, "start_s": round(s.start_s, 1), "end_s": round(s.end_s, 1),
                      "num_requests": s.num_requests} for s in segs],
        "fixed": {str(s): {"attainment": round(float(m.mean()), 4), "first_window_attainment": round(first[s], 4),
                           "per_segment": _per_segment(m, segs)} for s, m in fixed.items()},
        "best_fixed": {"split": str(best), "attainment": round(float(fixed[best].mean()), 4),
                       "per_segment": _per_segment(fixed[best], segs),
                       "attainment_cut_like_replan": round(float(best_cut.mean()), 4)},
        "first_window_plan": {"split": str(tuned), "attainment": round(float(fixed[tuned].mean()), 4),
                              "per_segment": _per_segment(fixed[tuned], segs)},
        "replan": {"start": str(tuned), "attainment": round(run.attainment, 4),
                   "per_segment": _per_segment(run.met, segs), "num_flips": len(run.flips), "flips": run.flips,
                   "decisions": run.decisions, "splits_over_time": run.splits,
                   "decide_wall_s": round(run.decide_wall_s, 1), "outcome_wall_s": round(run.outcome_wall_s, 1)},
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def goodput(loads: list[dict], key: str, target: float, num_gpus: float) -> dict:
    """Highest rate with attainment >= target, linearly interpolated between simulated loads
    (None when even the lightest load misses; the heaviest load when every load passes)."""
    pts = sorted((r["rate_rps"], r[key]["attainment"]) for r in loads)
    best = None
    for (r0, a0), (r1, a1) in zip(pts, pts[1:]):
        if a0 >= target > a1:
            best = r0 + (r1 - r0) * (a0 - target) / (a0 - a1)
            break
    else:
        if pts and pts[-1][1] >= target:
            best = pts[-1][0]
        elif pts and pts[0][1] >= target:
            best = pts[0][0]
    return {"goodput_rps": None if best is None else round(best, 3),
            "per_gpu": None if best is None or not num_gpus else round(best / num_gpus, 3),
            "capped": bool(pts and pts[-1][1] >= target)}


def build(plan: Plan, traces: str, factors: list[float], latency: str, config: ReplanConfig, tune_s: float,
          flip_cost_s: float, warmup_s: float, max_model_len: int, say=print) -> dict:
    roles, why = replan_roles(plan)
    if not roles:
        raise ConfigError(f"the plan does not allow re-planning: {why}")
    t0 = time.perf_counter()
    loads = []
    for f in factors:
        say(f"traces {traces} compressed x{f:g}")
        loads.append(run_load(plan, traces, f, latency, config, tune_s, flip_cost_s, warmup_s, max_model_len, say))
    gpus = plan.num_gpus or sum(p.num_instances * p.ranks_per_instance for p in plan.phases.values())
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "traces": traces, "model": plan.model, "latency_model": latency, "num_gpus": gpus,
        "slo": {"ttft_s": plan.slo_ttft_s, "tpot_s": plan.slo_tpot_s, "attainment": plan.slo_attainment},
        "roles": list(roles), "tune_s": tune_s, "flip_cost_s": flip_cost_s, "warmup_s": warmup_s,
        "policy": vars(config),
        "loads": loads,
        "goodput": {k: goodput(loads, k, plan.slo_attainment, gpus)
                    for k in ("replan", "best_fixed", "first_window_plan")},
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def markdown(rep: dict, title: str, command: str) -> str:
    lines = [f"# {title}", "",
             f"Generated {rep['date']} by `{command}` in {rep['wall_s']:.0f} s wall.", "",
             f"{rep['model']} on {rep['num_gpus']} GPUs, latency model `{rep['latency_model']}`, roles "
             f"{'/'.join(rep['roles'])}; SLO TTFT <= {rep['slo']['ttft_s']} s and TPOT <= {rep['slo']['tpot_s']} s. "
             f"Traces back to back: `{rep['traces']}`, arrival times compressed by the factor below so the "
             f"cluster is loaded near capacity. Re-planner: every {rep['policy']['interval_s']:g} s on the last "
             f"{rep['policy']['window_s']:g} s (at most {rep['policy']['max_window_requests']} requests, forecast "
             f"x{rep['policy']['repeat']}), margin {rep['policy']['margin']:.0%}, {rep['policy']['confirmations']} "
             f"confirmations, dwell {rep['policy']['min_dwell_s']:g} s; a flip costs {rep['flip_cost_s']:g} s "
             f"during which the instance serves nothing. It starts from the plan tuned for the first "
             f"{rep['tune_s']:g} s of the traces.", "",
             "| compression | req/s | re-planning | best fixed (hindsight) | tuned for the start | flips |",
             "|---:|---:|---|---|---|---:|"]
    for r in rep["loads"]:
        lines.append(f"| x{r['compression']:g} | {r['rate_rps']:.1f} | **{r['replan']['attainment']:.1%}** | "
                     f"{r['best_fixed']['split']} {r['best_fixed']['attainment']:.1%} | "
                     f"{r['first_window_plan']['split']} {r['first_window_plan']['attainment']:.1%} | "
                     f"{r['replan']['num_flips']} |")
    g = rep["goodput"]
    lines += ["", f"Goodput at {rep['slo']['attainment']:.0%} attainment (interpolated between the loads above; "
              "'>=' when every load passed):", "",
              "| | goodput req/s | per GPU |", "|---|---:|---:|"]
    for k, name in (("replan", "re-planning"), ("best_fixed", "best fixed split at each load"),
                    ("first_window_plan", "split tuned for the start")):
        v = g[k]
        pre = ">= " if v["capped"] else ""
        lines.append(f"| {name} | {pre}{v['goodput_rps']} | {pre}{v['per_gpu']} |" if v["goodput_rps"] is not None
                     else f"| {name} | below the lightest load | - |")
    for r in rep["loads"]:
        lines += ["", f"## x{r['compression']:g} ({r['num_requests']} requests over {r['duration_s']:.0f} s)", "",
                  "Attainment per trace segment:", "",
                  "| | " + " | ".join(s["name"] for s in r["segments"]) + " | all |",
                  "|---|" + "---:|" * (len(r["segments"]) + 1)]
        rows = [("re-planning", r["replan"])] + [(f"fixed {k}", v) for k, v in r["fixed"].items()]
        for name, v in rows:
            lines.append(f"| {name} | " + " | ".join(f"{v['per_segment'][s['name']]:.1%}" for s in r["segments"])
                         + f" | {v['attainment']:.1%} |")
        lines += ["", f"Best fixed split cut where re-planning changed split (the cutting's own effect): "
                  f"{r['best_fixed']['attainment_cut_like_replan']:.1%} vs {r['best_fixed']['attainment']:.1%} uncut.",
                  f"Decisions: {r['replan']['decisions']}; decide {r['replan']['decide_wall_s']} s, outcome "
                  f"{r['replan']['outcome_wall_s']} s, load total {r['wall_s']} s wall.", "", "Flips:", ""]
        lines += [f"- {f['time_s']:.0f} s: {f['instance']} {f['from']} -> {f['to']} ({f['split']}): {f['reason']}"
                  for f in r["replan"]["flips"]] or ["- none"]
    return "\n".join(lines) + "\n"


def write(rep: dict, out: str, title: str, command: str) -> Path:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "report.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    (d / "README.md").write_text(markdown(rep, title, command))
    return d / "README.md"

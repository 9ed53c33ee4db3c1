"""`disagg simulate`: a plan, both colocated baselines and a workload -> an HTML report with
PNG plots and a JSON of every number plotted.

The disaggregated plan is compared with two colocated deployments on the same number of
devices: ColocatedPolicy "prefill_first" (vLLM-style) and "chunked" (Sarathi-style). Each
gets its goodput by search on rate, attainment over a grid of rates, and, at one reference
rate (the plan's goodput), attainment against SLOs scaled by a factor, TTFT and TPOT CDFs and
the TTFT breakdown.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.plan import PhaseConfig, Plan
from placement.deployment import Deployment, deployment_from_plan
from placement.slo_metrics import BREAKDOWN, SimResult
from placement.report_html import write_html
from placement.parallel import run_all
from placement.search import deployment_goodput, plan_goodput
from placement.simulator import simulate
from placement.workload import Workload

SLO_SCALES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
CDF_POINTS = 101
SYSTEMS = ("disaggregated", "colocated-prefill-first", "colocated-chunked", "mixed")


@dataclass
class System:
    name: str
    deployment: Deployment
    config: str                      # "3 x prefill tp1 pp1 + 5 x decode tp1 pp1"
    hint: float | None = None        # goodput `place` found for it (the search starts there)


def baseline_phase(plan: Plan, mode: str) -> PhaseConfig:
    """The colocated baseline of a plan without a verdict (hand-written, or from an older
    `place`): the optimizer's choice (predicted["baselines"]) or, without one, the decode
    configuration on the same number of devices."""
    b = (plan.predicted or {}).get("baselines", {}).get(mode)
    ref = plan.decode
    if b:
        return PhaseConfig(num_instances=b["num_instances"], tp=b["tp"], pp=b["pp"], device=ref.device,
                           gpu_type=b["gpu_type"], max_batch_tokens=ref.max_batch_tokens,
                           max_batch_size=ref.max_batch_size, schedule=mode)
    devices = plan.prefill.num_instances * plan.prefill.ranks_per_instance + \
        plan.decode.num_instances * ref.ranks_per_instance
    return PhaseConfig(num_instances=max(1, devices // ref.ranks_per_instance), tp=ref.tp, pp=ref.pp,
                       device=ref.device, gpu_type=ref.gpu_type, max_batch_tokens=ref.max_batch_tokens,
                       max_batch_size=ref.max_batch_size, schedule=mode)


def plan_system(plan: Plan) -> str:
    """Which of the report's systems the plan itself is."""
    if plan.verdict.get("kind"):
        return plan.verdict["kind"]
    if plan.mode == "colocated":
        return "colocated-chunked" if plan.colocated.schedule == "chunked" else "colocated-prefill-first"
    return plan.mode


def _describe(plan: Plan) -> str:
    if plan.mode == "colocated":
        c = plan.colocated
        return f"{c.num_instances} x colocated tp{c.tp} pp{c.pp} ({c.schedule}, {c.gpu_type or c.device})"
    p, d = plan.prefill, plan.decode
    text = (f"{p.num_instances} x prefill tp{p.tp} pp{p.pp} + {d.num_instances} x decode tp{d.tp} pp{d.pp} "
            f"({p.gpu_type or p.device})")
    if plan.mode == "mixed":
        c = plan.colocated
        text = f"{c.num_instances} x colocated tp{c.tp} pp{c.pp} ({c.schedule}) beside " + text
    return text


def systems_of(plan: Plan, latency: str) -> list[System]:
    """The plan and the best candidate of each other kind (from the planner's verdict), or,
    for a plan without a verdict, the plan and colocated baselines on its devices."""
    from engine.model_config import load_model_config
    model = load_model_config(plan.model)
    out = []
    candidates = plan.verdict.get("candidates") or {}
    if candidates:
        for name in SYSTEMS:
            c = candidates.get(name)
            if c is None:
                continue
            ph = c["phases"]
            variant = dataclasses.replace(plan, mode=ph["mode"], predicted={"layout": ph["layout"]},
                                          **{k: PhaseConfig(**v) for k, v in ph.items()
                                             if k in ("prefill", "decode", "colocated")})
            out.append(System(name, deployment_from_plan(variant, latency, model=model), c["config"],
                              c["goodput_rps"]))
        return out
    own = plan_system(plan)
    out.append(System(own, deployment_from_plan(plan, latency, model=model), _describe(plan),
                      (plan.predicted or {}).get("goodput_rps")))
    for name, mode in (("colocated-prefill-first", "prefill_first"), ("colocated-chunked", "chunked")):
        if name == own:
            continue
        ph = baseline_phase(plan, mode)
        variant = dataclasses.replace(plan, mode="colocated", colocated=ph, predicted={})
        out.append(System(name, deployment_from_plan(variant, latency, model=model), _describe(variant)))
    return out


def _cdf(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    qs = np.linspace(0, 100, CDF_POINTS)
    pts = np.percentile(finite, qs).tolist() if len(finite) else [None] * CDF_POINTS
    return {"fraction": (qs / 100 * len(finite) / max(len(values), 1)).tolist(), "value_s": pts}


def _at_reference(r: SimResult, ttft_s: float, tpot_s: float) -> dict:
    parts = r.breakdown()
    return {
        "summary": r.summary(ttft_s, tpot_s),
        "attainment_vs_slo_scale": [{"scale": k, "attainment": r.attainment(ttft_s * k, tpot_s * k)}
                                    for k in SLO_SCALES],
        "ttft_cdf": _cdf(r.ttft_s), "tpot_cdf": _cdf(r.tpot_s),
        "breakdown_mean_s": {k: float(np.nanmean(parts[k])) for k in BREAKDOWN},
    }


def _curve_rates(goodputs: dict[str, float], plan_system: str, rates: list[float] | None, fallback: float):
    """The attainment curve's rates (around the best goodput; its own point is the goodput
    itself, so that replay is shared with the search) and the reference rate (the plan's
    goodput)."""
    best = max(goodputs.values()) or fallback
    grid = rates or [best if f == 1.0 else round(best * f, 3) for f in (0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.15, 1.3)]
    return grid, goodputs[plan_system] or best


def _curve_keys(goodputs, plan_system, rates, fallback) -> list[tuple[str, float]]:
    """(system, rate) of every replay the curves and the reference need, each once."""
    grid, reference = _curve_rates(goodputs, plan_system, rates, fallback)
    return list(dict.fromkeys((name, rate) for name in goodputs for rate in [*grid, reference]))


def build_report(plan: Plan, wl: Workload, latency: str = "roofline", rates: list[float] | None = None,
                 progress=None) -> dict:
    """Every number of the report (see the module docstring)."""
    progress = progress or (lambda done, total, message: None)
    ttft, tpot, target = plan.slo_ttft_s, plan.slo_tpot_s, plan.slo_attainment
    systems = systems_of(plan, latency)
    hint = (plan.predicted or {}).get("goodput_rps") or 1.0
    steps = len(systems) * (8 + (len(rates) if rates else 8) + 1)
    done = 0
    out = {"plan": plan.to_dict(), "workload": {"name": wl.name, "num_requests": wl.num_requests,
                                                "native_rate": wl.rate},
           "slo": {"ttft_s": ttft, "tpot_s": tpot, "attainment": target}, "latency_model": latency,
           "plan_system": plan_system(plan), "verdict": plan.verdict, "systems": {}}
    # Every simulation below is independent of the others: they run on every core
    # (placement/parallel.py). The curves' rates follow from the goodputs; when `place`
    # left a goodput for every system (the confirmation usually returns it unchanged), the
    # curves start at once beside the searches, on the rates those goodputs give.
    def search(s):
        if s.hint:      # the search `place` ran: the two agree
            return lambda: plan_goodput(s.deployment, wl, ttft, tpot, target, s.hint)
        return lambda: deployment_goodput(s.deployment, wl, ttft, tpot, target, start_rate=hint * 0.5,
                                          step=1.5, rel_tol=0.03)

    by_name = {s.name: s for s in systems}
    guess = {s.name: s.hint for s in systems} if all(s.hint for s in systems) else None
    # A search's passing probe at a system's goodput is the replay at that rate: not run twice.
    ahead = [k for k in _curve_keys(guess, out["plan_system"], rates, hint) if k[1] != guess[k[0]]] if guess else []
    # Longest first, so that no core is left with one long replay at the end: chunked
    # replays take about three times as long, and busier ones longer.
    ahead.sort(key=lambda k: (k[0] == "colocated-chunked", k[1]), reverse=True)
    progress(done, steps, "goodput searches: " + ", ".join(s.name for s in systems))
    results = run_all([search(s) for s in systems] +
                      [lambda k=k: simulate(by_name[k[0]].deployment, wl.at_rate(k[1])) for k in ahead])
    known: dict[tuple[str, float], SimResult] = {}
    goodputs = {}
    for s in systems:
        g = next(results)
        done += 8
        progress(done, steps, f"{s.name}: goodput {g.rate:.4g} req/s")
        goodputs[s.name] = g.rate
        if g.result is not None:
            known[(s.name, g.rate)] = g.result
        out["systems"][s.name] = {"config": s.config, "num_devices": s.deployment.num_devices,
                                  "goodput_rps": g.rate, "goodput_per_device": g.rate / s.deployment.num_devices,
                                  "probes": g.probes}
    grid, reference = _curve_rates(goodputs, out["plan_system"], rates, hint)
    out["reference_rate"] = reference
    needed = _curve_keys(goodputs, out["plan_system"], rates, hint)
    if all(k in known or k in ahead for k in needed):
        for k in ahead:
            known[k] = next(results)
            done += 1
            progress(done, steps, f"{k[0]}: {k[1]:g} req/s")
    results.close()         # a wrong guess: what runs ahead is dropped (the pool is ended)
    missing = [k for k in needed if k not in known]
    for k, r in zip(missing, run_all([lambda k=k: simulate(by_name[k[0]].deployment, wl.at_rate(k[1]))
                                      for k in missing])):
        known[k] = r
        done += 1
        progress(done, steps, f"{k[0]}: {k[1]:g} req/s")
    for s in systems:
        curve = []
        for rate in grid:
            r = known[(s.name, rate)]
            curve.append({"rate": rate, "attainment": r.attainment(ttft, tpot),
                          "ttft_attainment": float((r.ttft_s <= ttft).mean()),
                          "tpot_attainment": float((r.tpot_s <= tpot).mean())})
        out["systems"][s.name].update({"attainment_vs_rate": curve,
                                       "at_reference_rate": _at_reference(known[(s.name, reference)], ttft, tpot)})
    progress(steps, steps, "done")
    return out


def write_report(report: dict, out_dir: str | Path) -> Path:
    """report.json, the PNGs and index.html under `out_dir`; returns the HTML path."""
    from placement.report_plots import plot_all
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    images = plot_all(report, out)
    return write_html(report, images, out)

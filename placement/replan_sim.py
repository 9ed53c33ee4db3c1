"""Re-planning over time, simulated: the controller's policy (placement/replan.py) run every
`interval_s` on the last `window_s` of a long workload, beside fixed splits.

    run = simulate_replanning(plan, wl, latency, ReplanConfig(...), flip_cost_s=5)

Two passes. Decisions: at each tick the policy sees the arrivals of the last window (as the
controller would) and may flip one instance; a flip takes effect `flip_cost_s` later (drain and
switch), and meanwhile the instance serves nothing. Outcome: the run is cut where the split
changes (a flip's start and its end); each piece is simulated with its split on the requests
arriving in it, preceded by the requests of the `warmup_s` before it (so a piece starts with a
queue, as a live cluster does), and each request is judged in the piece it arrived in. The same
cut applied to a fixed split (`segmented_fixed`) shows what the cutting itself costs or gains.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from engine.plan import Plan
from placement.replan import ROLES, ReplanConfig, ReplanPolicy, Split, Window, _deployment
from placement.workload import Workload


@dataclass
class ReplanRun:
    """Per-request SLO verdicts of a re-planning run and its decisions."""

    met: np.ndarray
    flips: list[dict] = field(default_factory=list)
    splits: list[tuple[float, str]] = field(default_factory=list)   # (from time s, split)
    decisions: dict = field(default_factory=dict)                   # outcome -> count
    decide_wall_s: float = 0.0
    outcome_wall_s: float = 0.0

    @property
    def attainment(self) -> float:
        return float(self.met.mean()) if len(self.met) else 1.0


def _slice(wl: Workload, lo: int, hi: int) -> Workload:
    return Workload(wl.name, wl.arrival_s[lo:hi] - (wl.arrival_s[lo] if hi > lo else 0.0),
                    wl.prompt_lens[lo:hi], wl.output_lens[lo:hi])


def met_fixed(plan: Plan, split: Split, wl: Workload, latency: str) -> np.ndarray:
    """SLO verdict per request of one simulation of the whole workload on `split`."""
    from placement.simulator import simulate
    res = simulate(_deployment(plan.to_dict(), split, latency), wl)
    return res.slo_met(plan.slo_ttft_s, plan.slo_tpot_s)


def met_pieces(plan: Plan, wl: Workload, pieces: list[tuple[float, Split]], latency: str,
               warmup_s: float) -> np.ndarray:
    """Verdicts when the split changes at the pieces' start times (see the module docstring)."""
    from placement.simulator import simulate
    met = np.zeros(wl.num_requests, dtype=bool)
    starts = [t for t, _ in pieces] + [np.inf]
    for k, (t0, split) in enumerate(pieces):
        lo = int(np.searchsorted(wl.arrival_s, t0, "left")) if k else 0
        hi = int(np.searchsorted(wl.arrival_s, starts[k + 1], "left"))
        if hi <= lo:
            continue
        w0 = int(np.searchsorted(wl.arrival_s, t0 - warmup_s, "left")) if k else 0
        res = simulate(_deployment(plan.to_dict(), split, latency), _slice(wl, w0, hi))
        met[lo:hi] = res.slo_met(plan.slo_ttft_s, plan.slo_tpot_s)[lo - w0:]
    return met


def decide_over_time(plan: Plan, wl: Workload, latency: str, config: ReplanConfig, start: Split,
                     flip_cost_s: float, max_model_len: int = 0) -> tuple[list[tuple[float, Split]], list[dict], dict]:
    """The policy at every tick: (pieces [(start time, split)], flips, outcome counts)."""
    roles = {f"i{k}": r for k, r in enumerate(r for r in ROLES for _ in range(start.count(r)))}
    policy = ReplanPolicy(plan, config, latency, max_model_len=max_model_len)
    pieces: list[tuple[float, Split]] = [(0.0, start)]
    flips, counts = [], {}
    busy_until = -1.0
    arr = wl.arrival_s
    t = config.interval_s
    while t <= arr[-1]:
        if t >= busy_until:            # one change at a time, as the controller
            lo, hi = np.searchsorted(arr, t - config.window_s), np.searchsorted(arr, t)
            window = Window(arr[lo:hi], wl.prompt_lens[lo:hi], wl.output_lens[lo:hi])
            d = policy.decide(roles, window, t)
            counts[d.outcome] = counts.get(d.outcome, 0) + 1
            if d.outcome == "flip":
                current = Split.of(roles.values())
                gone = current.moved(d.from_role, d.to_role)
                outage = Split(**{r: current.count(r) - (r == d.from_role) for r in ROLES})
                pieces.append((t, outage))
                pieces.append((t + flip_cost_s, gone))
                roles[d.instance_id] = d.to_role
                policy.flipped(t + flip_cost_s)
                busy_until = t + flip_cost_s
                flips.append({"time_s": round(t, 2), "instance": d.instance_id, "from": d.from_role,
                              "to": d.to_role, "split": str(gone), "reason": d.reason})
        t += config.interval_s
    return pieces, flips, counts


def simulate_replanning(plan: Plan, wl: Workload, latency: str, config: ReplanConfig, start: Split,
                        flip_cost_s: float = 5.0, warmup_s: float = 30.0, max_model_len: int = 0) -> ReplanRun:
    t0 = time.perf_counter()
    pieces, flips, counts = decide_over_time(plan, wl, latency, config, start, flip_cost_s, max_model_len)
    t1 = time.perf_counter()
    met = met_pieces(plan, wl, pieces, latency, warmup_s)
    return ReplanRun(met, flips, [(round(t, 2), str(s)) for t, s in pieces], counts, t1 - t0,
                     time.perf_counter() - t1)


def all_splits(num_instances: int, roles: tuple[str, ...]) -> list[Split]:
    """Every servable split of `num_instances` over `roles`."""
    out = []
    for p in range(num_instances + 1):
        for d in range(num_instances + 1 - p):
            c = num_instances - p - d
            s = Split(p, d, c)
            if s.servable and all(s.count(r) == 0 or r in roles for r in ROLES):
                out.append(s)
    return out

"""The planner's verdict: the best candidate of each kind (disaggregated, colocated
prefill-first, colocated chunked) scored on the same requests `disagg simulate` replays, the
winner by goodput per GPU (or per dollar), its margin over the runner-up, and the plan file.

Scoring uses `search.plan_goodput`, the very search `disagg simulate` runs for a plan, on the
same workload: the goodput `place` prints is the one `simulate` reports. With a target rate,
a candidate whose whole-trace goodput falls short gets more instances (its per-instance
goodputs scaled by what the whole trace showed) while the devices allow.
"""
from __future__ import annotations

import math

from engine.errors import DisaggError
from engine.plan import PhaseConfig, Plan
from placement.choices import Choice, ColocatedChoice, PlaceSpec, colocated_count
from placement.search import plan_goodput
from placement.simulator import simulate

MAX_REGROWS = 3


class RateNotMet(DisaggError):
    """No plan carries the target rate within the SLO; `plan` is the closest one."""

    def __init__(self, message: str, plan: Plan):
        super().__init__(message)
        self.plan = plan


def score(spec: PlaceSpec, choice) -> dict:
    """Whole-plan numbers on the scoring workload: goodput, per GPU and per dollar, and the
    attainment at the target rate (or at the goodput)."""
    wl = spec.scoring_workload
    dep = choice.deployment(spec)
    g = plan_goodput(dep, wl, spec.ttft_s, spec.tpot_s, spec.attainment, hint=choice.estimate)
    out = {"kind": choice.kind, "config": choice.config, "goodput_rps": g.rate,
           "goodput_per_device": g.rate / choice.num_devices,
           "goodput_per_dollar_hour": g.rate / choice.cost_per_hour if choice.cost_per_hour else None,
           "num_devices": choice.num_devices, "cost_per_hour": choice.cost_per_hour,
           "idle_devices": sum(p.num_devices for p in spec.pools) - choice.num_devices,
           "estimated_rps": choice.estimate, "scored_on_requests": wl.num_requests, "probes": len(g.probes)}
    rate = spec.rate or g.rate
    if rate > 0:
        # At the goodput itself the search's passing probe is that very replay.
        r = g.result if rate == g.rate and g.result is not None else simulate(dep, wl.at_rate(rate))
        out["attainment_at_rate"] = {"rate": rate, "attainment": r.attainment(spec.ttft_s, spec.tpot_s)}
    return out


def regrow(spec: PlaceSpec, choice, numbers: dict):
    """A bigger version of `choice` for the target rate, its per-instance goodputs scaled by
    what the whole trace gave against the estimate; None when the devices cannot hold it."""
    scale = numbers["goodput_rps"] / max(choice.estimate, 1e-9)
    if scale <= 0:
        return None
    pools = spec.pools
    if isinstance(choice, ColocatedChoice):
        pool = pools[choice.scored.pool]
        n = colocated_count(choice.scored.goodput * scale, choice.scored.candidate.ranks, pool.num_devices, spec.rate)
        n = max(n or 0, choice.num_instances + 1)
        if n * choice.scored.candidate.ranks > pool.num_devices:
            return None
        return ColocatedChoice(choice.scored, n, choice.schedule)
    p, d = choice.prefill, choice.decode
    n_p = max(choice.num_prefill, math.ceil(spec.rate / (p.goodput * scale) - 1e-9))
    n_d = max(choice.num_decode, math.ceil(spec.rate / (d.goodput * scale) - 1e-9))
    if (n_p, n_d) == (choice.num_prefill, choice.num_decode):
        # The phases' goodputs promise enough; the shortfall is elsewhere: grow the scarcer side.
        if n_p * p.goodput <= n_d * d.goodput:
            n_p += 1
        else:
            n_d += 1
    same = p.pool == d.pool
    if same and n_p * p.candidate.ranks + n_d * d.candidate.ranks > pools[p.pool].num_devices:
        return None
    if not same and (n_p * p.candidate.ranks > pools[p.pool].num_devices
                     or n_d * d.candidate.ranks > pools[d.pool].num_devices):
        return None
    return choice.with_counts(pools, n_p, n_d)


def score_for_rate(spec: PlaceSpec, choice, progress) -> tuple[object, dict]:
    """Score `choice`; with a target rate, grow it until it carries the rate (or cannot)."""
    progress(f"scoring {choice.kind}: {choice.config} on {spec.scoring_workload.num_requests} requests")
    numbers = score(spec, choice)
    for _ in range(MAX_REGROWS if spec.rate else 0):
        if numbers["goodput_rps"] >= spec.rate:
            break
        bigger = regrow(spec, choice, numbers)
        if bigger is None:
            break
        progress(f"scoring {bigger.kind}: {bigger.config} (grown for {spec.rate:g} req/s)")
        choice, numbers = bigger, score(spec, bigger)
    return choice, numbers


def decide(spec: PlaceSpec, scored: dict[str, tuple[object, dict]]) -> dict:
    """The verdict over the best candidate of each kind: `kind` wins by `key`; with a target
    rate, only candidates that carry it can win (`meets_rate`)."""
    key = "goodput_per_dollar_hour" if spec.by_cost else "goodput_per_device"

    def value(kind):
        v = scored[kind][1]
        ok = spec.rate is None or v["goodput_rps"] >= spec.rate * (1 - 1e-9)
        return (ok, v[key] or 0.0)

    ranked = sorted(scored, key=value, reverse=True)
    best = ranked[0]
    runner = ranked[1] if len(ranked) > 1 else None
    b, r = value(best)[1], value(runner)[1] if runner else 0.0
    return {
        "kind": best, "objective": key, "target_rate": spec.rate,
        "meets_rate": spec.rate is None or value(best)[0],
        "runner_up": runner, "margin": (b - r) / r if runner and r > 0 else None,
        "scored_on": {"workload": spec.workload_name, "num_requests": spec.scoring_workload.num_requests},
        "candidates": {kind: {**nums, "phases": phases_of(spec, choice)} for kind, (choice, nums) in scored.items()},
    }


def _phase(spec: PlaceSpec, scored, count: int, **kw) -> PhaseConfig:
    c = scored.candidate
    cpu = c.device.device == "cpu"
    return PhaseConfig(num_instances=count, tp=c.tp, pp=c.pp, device=c.device.device, gpu_type=c.device.name,
                       num_gpus_per_rank=0.0 if cpu else 1.0, max_batch_tokens=spec.max_batch_tokens,
                       max_batch_size=spec.max_batch_size, **kw)


def phases_of(spec: PlaceSpec, choice) -> dict:
    """The plan fields (mode, phases as dicts, layout) that deploy `choice`."""
    if isinstance(choice, ColocatedChoice):
        ph = _phase(spec, choice.scored, choice.num_instances, schedule=choice.schedule,
                    chunk_tokens=spec.chunk_tokens)
        return {"mode": "colocated", "colocated": ph.__dict__.copy(), "layout": {"colocated": choice.nodes}}
    return {"mode": "disaggregated",
            "prefill": _phase(spec, choice.prefill, choice.num_prefill).__dict__.copy(),
            "decode": _phase(spec, choice.decode, choice.num_decode).__dict__.copy(),
            "layout": {"prefill": choice.prefill_nodes, "decode": choice.decode_nodes}}


def to_plan(spec: PlaceSpec, verdict: dict, predicted: dict) -> Plan:
    """The plan file of the verdict's winner; the other kinds' phases stay in the verdict."""
    win = verdict["candidates"][verdict["kind"]]
    phases = win["phases"]
    fields = {k: PhaseConfig(**v) for k, v in phases.items() if k in ("prefill", "decode", "colocated")}
    if phases["mode"] == "colocated":
        dis = verdict["candidates"].get("disaggregated")    # informative only: serve ignores them
        if dis:
            fields.update(prefill=PhaseConfig(**dis["phases"]["prefill"]), decode=PhaseConfig(**dis["phases"]["decode"]))
    else:
        fields["colocated"] = PhaseConfig(**{**phases["decode"], "num_instances": phases["prefill"]["num_instances"]
                                             + phases["decode"]["num_instances"]})
    predicted = {**predicted, **{k: v for k, v in win.items() if k != "phases"}, "layout": phases["layout"]}
    return Plan(model=spec.model_name, mode=phases["mode"], block_size=spec.block_size, slo_ttft_s=spec.ttft_s,
                slo_tpot_s=spec.tpot_s, slo_attainment=spec.attainment, workload=spec.workload_name,
                predicted=predicted, verdict=verdict, **fields)


def best_colocated(opt, schedule: str) -> ColocatedChoice | None:
    """The colocated candidate of one schedule with the most goodput per GPU (or dollar)."""
    spec = opt.spec
    phase = "colocated" if schedule == "prefill_first" else "colocated-chunked"
    rows = opt.score_phase(phase)
    best, best_key = None, -1.0
    for r in rows:
        if not r.goodput:
            continue
        pool = spec.pools[r.pool]
        n = colocated_count(r.goodput, r.candidate.ranks, pool.num_devices, spec.rate)
        if n is None:
            continue
        c = ColocatedChoice(r, n, schedule)
        rate = min(n * r.goodput, spec.rate or float("inf"))
        key = rate / (c.cost_per_hour if spec.by_cost else c.num_devices)
        if key > best_key:
            best, best_key = c, key
    if best is not None:
        pool = spec.pools[best.scored.pool]
        ranks = best.scored.candidate.ranks
        best.nodes = [f"{pool.device.name}:{(i * ranks) // pool.devices_per_node}" for i in range(best.num_instances)]
    return best


def table(verdict: dict) -> str:
    """The short table `disagg place` prints: the best candidate of each kind and the margin."""
    key = verdict["objective"]
    lines = [f"{'kind':<24} {'configuration':<46} {'GPUs':>4} {'req/s':>8} {key.replace('_', ' '):>22}"]
    for kind, c in sorted(verdict["candidates"].items(), key=lambda kv: -(kv[1][key] or 0.0)):
        mark = "*" if kind == verdict["kind"] else " "
        lines.append(f"{mark}{kind:<23} {c['config']:<46} {c['num_devices']:>4} {c['goodput_rps']:>8.4g} "
                     f"{c[key] or 0.0:>22.4g}")
    if verdict.get("margin") is not None:
        lines.append(f"{verdict['kind']} wins by {100 * verdict['margin']:.1f}% over {verdict['runner_up']}")
    return "\n".join(lines)

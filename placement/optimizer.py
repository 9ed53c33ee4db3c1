"""The placement optimizer: which TP x PP and how many instances per phase, on which devices.

DistServe's Algorithm 1: every configuration of each phase that fits in memory gets its goodput
from a simulation of one instance alone (prefill under the TTFT target, decode under the TPOT
target) and a search on rate; the best goodput per device (per dollar when device types differ
in price) wins in each phase, and replica counts follow from the target rate (or fill the
devices). Algorithm 2 ("pairing"): a unit of `pp` nodes holds stage k of every prefill and
decode instance of the unit on node k, so KV moves over NVLink only; the best unit is found
from the phase goodputs and checked by simulating the unit whole, then replicated over nodes.
Configurations whose capacity bound cannot beat the best goodput found so far are not
simulated, and a colocated search without a target rate stops as soon as a probe shows the
configuration below the best per device (it cannot win; the plan records `goodput_below_rps`).

The planner also decides the kind: the best colocated candidate of each schedule
(prefill-first, chunked; one instance shape replicated) is found the same way, and the best
candidate of each kind is scored whole on the requests `disagg simulate` replays
(verdict.py); the most goodput per GPU (or per dollar) wins. The kinds' searches are
independent, so each runs whole on a core of its own (placement/parallel.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

from engine.errors import ConfigError
from engine.plan import Plan
from placement.choices import KINDS, SCHEDULE_OF, Choice, DevicePool, PlaceSpec, Scored, lay_out
from placement.pairing import best_paired
from placement.parallel import run_all
from placement.search import BOUND_SLACK, Candidate, candidate_goodput, capacity_bound, enumerate_candidates
from placement.verdict import RateNotMet, best_colocated, decide, score_for_rate, table, to_plan

# Kinds in the order their searches start (longest first); the configurations' rows in the
# plan keep the phases' order.
ORDER = ("colocated-chunked", "disaggregated", "colocated-prefill-first")
PHASE_ORDER = ("prefill", "decode", "colocated", "colocated-chunked")

__all__ = ["DevicePool", "PlaceSpec", "place", "replica_counts", "RateNotMet", "table"]


class Optimizer:
    """One placement search (see the module docstring). `progress(message)` hears of each step."""

    def __init__(self, spec: PlaceSpec, progress=None):
        self.spec = spec
        self.progress = progress or (lambda message: None)
        self.by_cost = spec.by_cost
        self.kv_bytes = spec.model.kv_bytes_per_token()
        self.scored: dict[str, list[Scored]] = {}

    # Step 1: goodput of every configuration of one phase ------------------------------------
    def candidates(self, pool_index: int) -> list[Candidate]:
        s, pool = self.spec, self.spec.pools[pool_index]
        device = replace(pool.device, devices_per_node=pool.devices_per_node)
        longest = int((s.workload.prompt_lens + s.workload.output_lens).max())
        return enumerate_candidates(s.model, device, pool.num_devices, s.latency, s.block_size,
                                    max(longest, s.max_batch_tokens), max_batch_tokens=s.max_batch_tokens)

    def score_phase(self, phase: str, only=None, exhaustive: bool = False) -> list[Scored]:
        """Goodput of the configurations of `phase`, best bound first; a configuration whose
        bound (with slack) is below the best goodput found is pruned. `exhaustive` runs every
        colocated search to the end (tests compare the two)."""
        s = self.spec
        rows = []
        for i in range(len(s.pools)):
            for c in self.candidates(i):
                if only is None or only(c):
                    bound = capacity_bound(c, phase.split("-")[0], s.workload, s.block_size,
                                           s.max_batch_tokens, s.max_batch_size, s.tpot_s)
                    rows.append(Scored(c, phase, i, bound))
        unit = lambda r: r.candidate.ranks * (r.candidate.device.cost_per_hour if self.by_cost else 1.0)
        rows.sort(key=lambda r: -r.bound / unit(r))
        best, fraction = 0.0, 0.7
        # A colocated plan without a target rate is one shape replicated over the devices, so
        # the best goodput per unit wins outright: a configuration shown to fall short of it
        # needs no exact figure. (Prefill and decode goodputs combine in pairs, and a target
        # rate rounds instance counts, so those searches always run to the end.)
        cut_losers = phase.startswith("colocated") and s.rate is None and not exhaustive
        for r in rows:
            if r.bound * BOUND_SLACK[phase.split("-")[0]] / unit(r) < best:
                continue
            self.progress(f"{phase}: simulating {r.candidate.label}")
            g = candidate_goodput(r.candidate, "colocated" if phase.startswith("colocated") else phase,
                                  s.workload, s.block_size, self.kv_bytes, s.ttft_s, s.tpot_s, s.attainment,
                                  s.max_batch_tokens, s.max_batch_size, chunked=phase == "colocated-chunked",
                                  start_fraction=fraction, stop_below=best * unit(r) if cut_losers else 0.0)
            if g.below is not None:
                r.goodput_below = g.below
                continue
            r.goodput = g.rate
            if g.rate > 0:      # configurations of a phase reach similar fractions of their bound
                fraction = min(1.0, g.rate / r.bound)
            best = max(best, r.per_unit(self.by_cost))
        self.scored[phase] = rows
        return rows

    def best(self, phase: str) -> Scored:
        rows = [r for r in self.scored[phase] if r.goodput]
        if not rows:
            raise ConfigError(f"no {phase} configuration meets the SLO at any rate; relax --ttft/--tpot "
                              "or use larger devices")
        return max(rows, key=lambda r: r.per_unit(self.by_cost))


def replica_counts(goodput_p: float, ranks_p: int, goodput_d: float, ranks_d: int,
                   rate: float | None, devices: int, devices_d: int | None = None) -> tuple[int, int] | None:
    """Prefill and decode instance counts (DistServe Alg. 1): with a target `rate`, enough of
    each to carry it; without, the split of the devices that maximises min(n_p g_p, n_d g_d).
    `devices_d` set means decode has a pool of its own. None when the devices cannot hold it."""
    if rate is not None:
        n_p, n_d = max(1, math.ceil(rate / goodput_p - 1e-9)), max(1, math.ceil(rate / goodput_d - 1e-9))
        if devices_d is None:
            return (n_p, n_d) if n_p * ranks_p + n_d * ranks_d <= devices else None
        return (n_p, n_d) if n_p * ranks_p <= devices and n_d * ranks_d <= devices_d else None
    if devices_d is not None:
        n_p, n_d = devices // ranks_p, devices_d // ranks_d
        return (n_p, n_d) if n_p and n_d else None
    best, best_rate = None, -1.0
    for n_p in range(1, devices // ranks_p + 1):
        n_d = (devices - n_p * ranks_p) // ranks_d
        if n_d >= 1 and min(n_p * goodput_p, n_d * goodput_d) > best_rate:
            best, best_rate = (n_p, n_d), min(n_p * goodput_p, n_d * goodput_d)
    return best


def best_split(opt: "Optimizer") -> "Choice | None":
    """Alg. 1 over every pair of simulated prefill and decode configurations: the most goodput
    per device (or per dollar) for the target rate, or from all the devices."""
    s = opt.spec
    best, best_key = None, -1.0
    for p in (r for r in opt.scored["prefill"] if r.goodput):
        for d in (r for r in opt.scored["decode"] if r.goodput):
            same = p.pool == d.pool
            counts = replica_counts(p.goodput, p.candidate.ranks, d.goodput, d.candidate.ranks, s.rate,
                                    s.pools[p.pool].num_devices, None if same else s.pools[d.pool].num_devices)
            if counts is None:
                continue
            c = Choice(p, d, *counts)
            rate = min(c.num_prefill * p.goodput, c.num_decode * d.goodput)
            key = rate / (c.cost_per_hour if opt.by_cost else c.num_devices)
            if key > best_key:
                best, best_key = c, key
    if best is not None:
        lay_out(best, s.pools)
    return best


def disaggregated_choices(opt: Optimizer, progress) -> list[tuple[str, Choice]]:
    """Alg. 1's best split, and Alg. 2's best paired units where pairing applies."""
    spec = opt.spec
    opt.score_phase("prefill")
    opt.score_phase("decode")
    opt.best("prefill"), opt.best("decode")          # a clear error when a phase cannot meet its SLO
    out = []
    choice = best_split(opt)
    if choice is not None:
        out.append(("alg1", choice))
    multi_node = any(pool.num_nodes > 1 for pool in spec.pools)
    if spec.pairing == "on" or (spec.pairing == "auto" and (multi_node or choice is None)):
        paired = best_paired(opt, spec)
        if paired is not None:
            out.append(("alg2", paired))
    return out


def _kind_search(spec: PlaceSpec, kind: str, say) -> tuple[dict, list, str | None]:
    """One kind's search: its phases' configurations and its best candidate(s). Returns (rows
    per phase, [(algorithm, choice)], why the kind is unavailable or None)."""
    opt = Optimizer(spec, say)
    try:
        if kind == "disaggregated":
            options = disaggregated_choices(opt, say)
            if not options:
                return opt.scored, [], f"the devices cannot carry {spec.rate} req/s disaggregated"
        else:
            choice = best_colocated(opt, SCHEDULE_OF[kind])
            if choice is None:
                return opt.scored, [], f"the devices cannot carry {spec.rate} req/s {kind}"
            options = [(None, choice)]
    except ConfigError as e:
        return opt.scored, [], str(e)
    return opt.scored, options, None


def place(spec: PlaceSpec, progress=None) -> Plan:
    """Search every kind of plan and return the best (see the module docstring). Raises
    RateNotMet (carrying the closest plan) when a target rate is given and no plan carries it."""
    t0 = time.perf_counter()
    say = progress or (lambda message: None)
    finalists: dict[str, tuple[object, dict]] = {}
    unavailable: dict[str, str] = {}
    alternatives: dict[str, dict] = {}
    # The kinds' searches are independent of each other, and so are the finalists' scores on
    # the scoring workload: each runs on a core of its own, the longest (chunked: its replays
    # take the most time) first.
    kinds = [k for k in ORDER if k in spec.kinds]
    results = dict(zip(kinds, run_all([lambda kind=kind: _kind_search(spec, kind, say) for kind in kinds])))
    scored_rows: dict[str, list[Scored]] = {}
    jobs = []
    for kind in kinds:
        jobs += [(kind, name, choice) for name, choice in results[kind][1]]
    scores = dict(zip([id(j) for j in jobs],
                      run_all([lambda c=c: score_for_rate(spec, c, say) for _, _, c in jobs])))
    for kind in (k for k in KINDS if k in results):
        scored_rows.update(results[kind][0])
        if results[kind][2] is not None:
            unavailable[kind] = results[kind][2]
        for job in (j for j in jobs if j[0] == kind):
            name, (c, numbers) = job[1], scores[id(job)]
            if name is None:
                finalists[kind] = (c, numbers)
                continue
            alternatives[name] = numbers
            key = "goodput_per_dollar_hour" if spec.by_cost else "goodput_per_device"
            if kind not in finalists or (numbers[key] or 0) > (finalists[kind][1][key] or 0):
                finalists[kind] = (c, {**numbers, "algorithm": name})
    if not finalists:
        reasons = "; ".join(f"{k}: {v}" for k, v in unavailable.items())
        raise ConfigError(f"no plan of any kind: {reasons}")
    verdict = decide(spec, finalists)
    verdict["unavailable"] = unavailable
    predicted = {
        "latency_model": spec.latency, "workload": spec.workload_name,
        "search_requests": spec.workload.num_requests, "target_rate": spec.rate,
        "configs": [r.row() for ph in PHASE_ORDER if ph in scored_rows for r in scored_rows[ph]],
        "alternatives": alternatives,
    }
    if "disaggregated" in finalists:
        choice = finalists["disaggregated"][0]
        predicted["prefill"] = {**choice.prefill.row(), "num_instances": choice.num_prefill}
        predicted["decode"] = {**choice.decode.row(), "num_instances": choice.num_decode}
    predicted["search_time_s"] = time.perf_counter() - t0
    plan = to_plan(spec, verdict, predicted)
    if not verdict["meets_rate"]:
        best = verdict["candidates"][verdict["kind"]]
        raise RateNotMet(f"no plan carries {spec.rate:g} req/s within the SLO on these devices: the closest is "
                         f"{verdict['kind']} ({best['config']}) at {best['goodput_rps']:.3g} req/s; "
                         "add devices (--gpu, --nodes), relax the SLO or lower --rate", plan)
    return plan

"""DistServe's Algorithm 2: placement when KV must stay on NVLink.

A unit spans `u` nodes and holds `n_p` prefill and `n_d` decode instances that all have
pp = u stages; stage k of every instance sits on node k of the unit, so the KV of a layer range
moves between matching stages over NVLink. On each node the stages take
n_p * tp_p + n_d * tp_d <= devices per node. The unit's goodput is estimated from the phase
goodputs (min(n_p g_p, n_d g_d)), the best few estimates are simulated whole, and the best unit
is replicated over the nodes.
"""
from __future__ import annotations

import math

from placement.choices import Choice, Scored
from placement.search import candidate_goodput, capacity_bound, deployment_goodput

TOP_UNITS = 2       # units simulated whole, best estimates first


def _phase_goodput(opt, phase, c, cache):
    key = (phase, c.device.name, c.tp, c.pp)
    if key not in cache:
        for r in opt.scored.get(phase, []):
            if (r.candidate.device.name, r.candidate.tp, r.candidate.pp) == key[1:] and r.goodput is not None:
                cache[key] = r.goodput
                break
        else:
            s = opt.spec
            opt.progress(f"{phase}: simulating {c.label} (pairing)")
            cache[key] = candidate_goodput(c, phase, s.workload, s.block_size, opt.kv_bytes, s.ttft_s,
                                           s.tpot_s, s.attainment, s.max_batch_tokens, s.max_batch_size).rate
    return cache[key]


def _units(opt, pool_index, cache):
    """(estimated rate per device, unit nodes, prefill, n_p, decode, n_d) for every unit shape."""

    s, pool = opt.spec, opt.spec.pools[pool_index]
    per_node = pool.devices_per_node
    cands = opt.candidates(pool_index)
    out = []
    for u in range(1, pool.num_nodes + 1):
        stage = [c for c in cands if c.pp == u and c.tp <= per_node]
        for cp in stage:
            for cd in stage:
                for n_p in range(1, per_node // cp.tp + 1):
                    n_d = (per_node - n_p * cp.tp) // cd.tp
                    if n_d < 1:
                        continue
                    bp, bd = (capacity_bound(c, ph, s.workload, s.block_size, s.max_batch_tokens,
                                             s.max_batch_size, s.tpot_s) for c, ph in ((cp, "prefill"), (cd, "decode")))
                    out.append((min(n_p * bp, n_d * bd) / (u * (n_p * cp.tp + n_d * cd.tp)), u,
                                Scored(cp, "prefill", pool_index, bp), n_p,
                                Scored(cd, "decode", pool_index, bd), n_d))
    out.sort(key=lambda t: -t[0])
    return out


def best_paired(opt, spec):
    """The best replicated unit as a Choice, or None when no unit fits a node."""

    cache: dict = {}
    best, best_per_device = None, -1.0
    for pool_index, pool in enumerate(spec.pools):
        shapes = _units(opt, pool_index, cache)
        # Estimate with simulated phase goodputs for the shapes whose bounds lead.
        estimates = []
        for _, u, sp, n_p, sd, n_d in shapes[:4 * TOP_UNITS]:
            sp.goodput = _phase_goodput(opt, "prefill", sp.candidate, cache)
            sd.goodput = _phase_goodput(opt, "decode", sd.candidate, cache)
            est = min(n_p * sp.goodput, n_d * sd.goodput)
            estimates.append((est / (u * (n_p * sp.candidate.tp + n_d * sd.candidate.tp)), u, sp, n_p, sd, n_d, est))
        estimates.sort(key=lambda t: -t[0])
        for _, u, sp, n_p, sd, n_d, est in estimates[:TOP_UNITS]:
            unit = Choice(sp, sd, n_p, n_d, [f"{pool.device.name}:0"] * n_p, [f"{pool.device.name}:0"] * n_d, True)
            opt.progress(f"pairing: simulating a unit of {n_p} x {sp.candidate.label} + {n_d} x {sd.candidate.label}")
            g = deployment_goodput(unit.deployment(spec), spec.workload, spec.ttft_s, spec.tpot_s,
                                   spec.attainment, start_rate=max(est * 0.9, 1e-3)).rate
            per_device = g / unit.num_devices
            if g > 0 and per_device > best_per_device:
                best_per_device = per_device
                max_units = pool.num_nodes // u
                units = max_units if spec.rate is None else min(max_units, math.ceil(spec.rate / g - 1e-9))
                best = Choice(sp, sd, n_p * units, n_d * units,
                              [f"{pool.device.name}:{k * u}" for k in range(units) for _ in range(n_p)],
                              [f"{pool.device.name}:{k * u}" for k in range(units) for _ in range(n_d)], True)
    return best

"""What serving costs beyond the engine's forward passes: the terms that make the simulator
hold under load (issue 15), fitted by `benchmarks/fidelity.py` and kept in a profile's
`"serving"` section, so `disagg simulate`/`place --latency-model PROFILE` use them too.

    "serving": {"dispatch_s": 0.004,              // arrival -> prefill queue (gRPC, routing, Ray hop)
                "return_s": 0.0,                  // first token -> client (the fit puts it all in dispatch_s)
                "handover_s": 0.005,              // controller hops after each KV copy
                "handover_serial": true,          // ... which hold the link (FIFO per link)
                "handover_s_per_stream": 1e-04,   // ... slower with every request in flight
                "step_host_s_per_stream": 1e-05,  // decode step: host time per request in flight
                "shared_speeds": [0.54, 0.53],    // shared GPU: speeds while both are busy
                "shared_speeds_by_batch": [[1, 0.9, 0.6], [16, 0.6, 0.48], [128, 0.5, 0.5]],
                                                  // ... beside a decode batch of b: [b, prefill, decode]
                "host_cores": 2, "other_cores": 0.3, "frontend_cpu_s_per_token": 0.0009,
                "frontend_cores_by_rate": [[0, 0.15], [120, 0.18], [800, 0.3]]}
                                                  // ... CPU: the frontend's cores at tokens/s

- The runtime's hand-over is a queue: each prefill rank has one sender thread per decode rank
  that moves one request's KV after another in the prefill's numbering (kv_transfer/agent.py;
  a CUDA IPC copy is queued on the stream and the thread goes on, so copies serialise on the
  GPU), and the controller then makes 3-4 awaited hops per request (receive_kv returns,
  first token seen, release, start_decode: cluster/transfers.py). In the simulator the copies
  on one prefill -> decode link go one at a time in FIFO order (each holds the link for bytes /
  bandwidth and lands the link's latency later: the next copy overlaps that latency), and the
  hops after each copy take `handover_s + handover_s_per_stream * requests in flight`: they wait their turn in the controller's event loop, which also fans
  every decode step's tokens out to the streams. With `handover_serial` (the default) the hops
  hold the link, so the next request's hand-over waits for them: a request's receive on the
  decode side completes only after the one numbered before it (the channel's order), so the
  hand-over is one FIFO queue per link whose service time grows with load. Measured on the
  H200 the hand-over grows like a queue near saturation (mean 12, 46, 136, 359 ms at 16, 48,
  64, 80 req/s), which a pure delay cannot follow.
- Host time per decode step that grows with load: the profile's `decode.c` is per running
  request (scheduling, sampling, output processing, the step's event); the worker's step also
  waits for the GIL it shares with the KV receive threads and the streaming generator, which
  grows with the requests in flight: `step_host_s_per_stream`.
- A shared GPU's split depends on the decode's load: beside a decode batch of 1 the prefill
  gets most of the device, beside 128 much less. `shared_speeds_by_batch` (measured by
  benchmarks/fidelity_calibration.py's `interference` at several decode batches) gives the
  speeds at each measured batch; the simulator reads them, interpolated linearly in the
  decode's current batch (clamped at the table's ends), whenever both are busy
  (`speeds_at`). Without the table the scalar `shared_speeds` holds at every batch.
- On CPU the device IS the cores (`host_cores` > 0): the prefill and decode workers (one
  thread each), the frontend and client and everyone else on the machine (`other_cores`,
  measured, as threads of at most a core each) share them; each busy worker runs at its
  max-min fair share (processor sharing). The frontend's cores follow the tokens streamed:
  `frontend_cores_by_rate` (rows [tokens/s, cores], measured at zero load: ~0.15 cores with
  nothing streaming, ~0.3 at 800 tokens/s on the 2-core machine, interpolated, flat past the
  last row), or without it `frontend_cpu_s_per_token` x tokens/s (which, one average over the
  calibration, put 0.9 cores on the frontend at 2,000 tokens/s where it used 0.3). Beside a
  busy worker of the other phase, a worker runs no faster than the co-run table says
  (`shared_speeds_by_batch`, measured on the CPU cluster as on a shared GPU; CoreShare).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from engine.errors import ConfigError


@dataclass(frozen=True)
class ServingTerms:
    dispatch_s: float = 0.0
    return_s: float = 0.0
    handover_s: float = 0.0
    handover_s_per_stream: float = 0.0
    handover_serial: bool = True        # the hops hold the link: the next copy waits for them
    step_host_s_per_stream: float = 0.0
    shared_speeds: tuple[float, float] | None = None
    shared_speeds_by_batch: tuple[tuple[float, float, float], ...] | None = None
    host_cores: float = 0.0
    other_cores: float = 0.0
    frontend_cpu_s_per_token: float = 0.0
    frontend_cores_by_rate: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "shared_speeds":
                if v is not None and (len(v) != 2 or not all(0 < s <= 1 for s in v)):
                    raise ConfigError(f"serving.shared_speeds must be two speeds in (0, 1], got {v}")
            elif f.name == "shared_speeds_by_batch":
                if v is not None:
                    check_speed_table(v, "serving.shared_speeds_by_batch")
            elif f.name == "frontend_cores_by_rate":
                if v is not None and (not v or any(len(r) != 2 or r[0] < 0 or r[1] < 0 for r in v)
                                      or [r[0] for r in v] != sorted({r[0] for r in v})):
                    raise ConfigError(f"serving.frontend_cores_by_rate must be rows [tokens_per_s >= 0, cores >= 0] "
                                      f"with distinct rates in increasing order, got {v!r}")
            elif f.name == "handover_serial":
                if not isinstance(v, bool):
                    raise ConfigError(f"serving.handover_serial must be true or false, got {v!r}")
            elif not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"serving.{f.name} must be a number >= 0, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "ServingTerms | None":
        if not d:
            return None
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"serving terms: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if d.get("shared_speeds") is not None:
            d["shared_speeds"] = tuple(float(x) for x in d["shared_speeds"])
        if d.get("shared_speeds_by_batch") is not None:
            d["shared_speeds_by_batch"] = speed_table(d["shared_speeds_by_batch"])
        if d.get("frontend_cores_by_rate") is not None:
            try:
                d["frontend_cores_by_rate"] = tuple((float(r), float(c)) for r, c in d["frontend_cores_by_rate"])
            except (TypeError, ValueError) as e:
                raise ConfigError(f"serving.frontend_cores_by_rate must be rows [tokens_per_s, cores], "
                                  f"got {d['frontend_cores_by_rate']!r}") from e
        return cls(**d)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if d["shared_speeds"] is not None:
            d["shared_speeds"] = list(d["shared_speeds"])
        if d["shared_speeds_by_batch"] is not None:
            d["shared_speeds_by_batch"] = [list(r) for r in d["shared_speeds_by_batch"]]
        else:
            del d["shared_speeds_by_batch"]     # profiles without the table stay as they were
        if d["frontend_cores_by_rate"] is not None:
            d["frontend_cores_by_rate"] = [list(r) for r in d["frontend_cores_by_rate"]]
        else:
            del d["frontend_cores_by_rate"]
        return d

    def handover_delay(self, in_flight: int) -> float:
        return self.handover_s + self.handover_s_per_stream * in_flight


def speed_table(rows) -> tuple[tuple[float, float, float], ...]:
    """`[[decode_batch, prefill_speed, decode_speed], ...]` as a tuple sorted by batch."""
    try:
        return tuple(sorted((float(b), float(p), float(d)) for b, p, d in rows))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"serving.shared_speeds_by_batch must be rows [decode_batch, prefill_speed, "
                          f"decode_speed], got {rows!r}") from e


def check_speed_table(rows, name: str) -> None:
    bad = not rows or any(len(r) != 3 for r in rows)
    if not bad:
        batches = [r[0] for r in rows]
        bad = batches != sorted(set(batches)) or batches[0] < 0 \
            or not all(0 < s <= 1 for r in rows for s in r[1:])
    if bad:
        raise ConfigError(f"{name} must be rows [decode_batch >= 0, prefill_speed, decode_speed] with distinct "
                          f"batches in increasing order and speeds in (0, 1], got {rows!r}")


def speeds_at(table, batch: float, step: float = 0.005) -> tuple[float, float]:
    """(prefill, decode) speeds beside a decode batch of `batch`: linear between the table's
    rows, the end rows' speeds beyond them; rounded to `step`, so that a batch growing by one
    request re-times the runs only when the speeds moved by that much."""
    from bisect import bisect_right
    i = bisect_right([r[0] for r in table], batch)
    if i == 0:
        p, d = table[0][1], table[0][2]
    elif i == len(table):
        p, d = table[-1][1], table[-1][2]
    else:
        (b0, p0, d0), (b1, p1, d1) = table[i - 1], table[i]
        w = (batch - b0) / (b1 - b0)
        p, d = p0 + w * (p1 - p0), d0 + w * (d1 - d0)
    if step:
        p, d = (max(step, round(round(x / step) * step, 9)) for x in (p, d))
    return min(1.0, p), min(1.0, d)


def _water_fill(demands: list[float], capacity: float) -> list[float]:
    """Max-min fair shares of `capacity` among `demands` (CFS between equal-weight tasks)."""
    shares = [0.0] * len(demands)
    todo = [i for i, d in enumerate(demands) if d > 0]
    left = capacity
    while todo:
        fair = left / len(todo)
        small = [i for i in todo if demands[i] <= fair]
        if not small:
            for i in todo:
                shares[i] = fair
            break
        for i in small:
            shares[i] = demands[i]
            left -= demands[i]
        todo = [i for i in todo if i not in small]
    return shares


def serving_terms(deployment) -> ServingTerms | None:
    """The serving terms of a deployment: its latency models' (a profile's "serving" section);
    the first group that has them speaks for all (one calibration covers one cluster)."""
    for g in (deployment.prefill, deployment.decode, deployment.colocated):
        if g is not None and getattr(g.latency, "serving", None) is not None:
            return g.latency.serving
    return None


class CoreShare:
    """CPU deployments: every worker instance, the frontend and the other processes share
    `host_cores`. After each event the simulator calls `update(now)`; when the set of busy
    workers or the frontend's demand (CPU per token x the decode instances' token rate)
    has changed, each busy worker's speed becomes its fair share (events returned).

    With a co-run table (`shared_speeds_by_batch`, or the scalar `shared_speeds`: measured on the
    running CPU cluster by benchmarks/fidelity_calibration.py's `interference`, as on a shared
    GPU) a busy prefill worker beside a busy decode worker runs at no more than the table's
    prefill speed at that decode's batch, and the decode at no more than its decode speed: on
    the 2-vCPU machine the two slow each other to ~0.6-0.8 even with a core each (caches,
    memory, the host under the VM), which a share of cores does not show. The lower of the
    share and the table's speed holds (both count the frontend's CPU; the table measured it)."""

    def __init__(self, terms: ServingTerms, instances: list, prefills: list = (), decodes: list = ()):
        self.terms, self.instances = terms, instances
        self.state = None
        table = terms.shared_speeds_by_batch or \
            (((0.0, *terms.shared_speeds),) if terms.shared_speeds else None)
        self.table = table if table and prefills and decodes else None
        self._prefill = {id(p) for p in prefills}
        self._decodes = list(decodes)
        self._speeds: dict = {}

    def frontend_cores(self) -> float:
        rate = 0.0
        for inst in self.instances:
            run = getattr(inst, "run", None)
            if run is not None and run[2] > 0:
                size = len(run[4]) if run[4] is not None else inst.lazy.size
                rate += size / run[2]           # tokens/s of the run in flight, at its speed
        table = self.terms.frontend_cores_by_rate
        if table:
            # Measured at zero load while streaming (benchmarks/fidelity_calibration.py): a base
            # with nothing streaming, growing less than in proportion with the tokens.
            cores = float(np.interp(rate, [r for r, _ in table], [c for _, c in table]))
        else:
            cores = self.terms.frontend_cpu_s_per_token * rate
        # Rounded so that a batch growing by one request does not cut every run.
        return round(cores, 2)

    def _corun(self) -> dict | None:
        """Co-run speed caps {id(instance): cap} while prefill and decode workers are both busy."""
        busy_d = [d for d in self._decodes if d.busy]
        if not busy_d or not any(inst.busy and id(inst) in self._prefill for inst in self.instances):
            return None
        caps = {}
        for d in busy_d:
            b = min(len(d.decode.running), d.decode.max_batch_size)
            sp = self._speeds.get(b)
            if sp is None:
                sp = self._speeds[b] = speeds_at(self.table, b)
            caps[id(d)] = sp[1]
        b = max(min(len(d.decode.running), d.decode.max_batch_size) for d in busy_d)
        p_cap = self._speeds.get(b) or speeds_at(self.table, b)
        for inst in self.instances:
            if inst.busy and id(inst) in self._prefill:
                caps[id(inst)] = p_cap[0]
        return caps

    def update(self, now: float) -> list:
        busy = tuple(inst.busy for inst in self.instances)
        front = self.frontend_cores() \
            if self.terms.frontend_cpu_s_per_token or self.terms.frontend_cores_by_rate else 0.0
        caps = self._corun() if self.table is not None else None
        state = (busy, front, tuple(sorted(caps.items())) if caps else None)
        if state == self.state:
            return []
        self.state = state
        # The other processes are many threads, none wanting more than a core: their load
        # competes as ceil(other_cores) tasks (one task of 1.5 cores would be capped at a fair share).
        other = self.terms.other_cores
        tasks = max(1, math.ceil(other - 1e-9)) if other > 0 else 0
        demands = [1.0 if b else 0.0 for b in busy] + [front] + ([other / tasks] * tasks if tasks else [])
        shares = _water_fill(demands, self.terms.host_cores)
        events = []
        for inst, b, share in zip(self.instances, busy, shares):
            speed = min(1.0, share)
            if caps and id(inst) in caps:
                speed = min(speed, caps[id(inst)])
            events.extend(inst.set_speed(now, speed if b else 1.0) or ())
        return events

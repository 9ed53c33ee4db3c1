"""Online re-planning: which role split of a fixed set of instances serves the recent load best.

The controller (cluster/replanner.py) and the over-time simulation (placement/replan_sim.py)
share this policy. Every few seconds it gets a window of recent requests (arrival times, prompt
and output lengths) and the requests queued now, simulates the current split and every split one
role flip away on that window with the planner's own simulator, and decides:

    keep     the current split is best, or no other wins by `margin` attainment
    confirm  another split wins by the margin, but not yet `confirmations` times in a row
    dwell    it won often enough, but the last flip was less than `min_dwell_s` ago
    flip     move one instance (the least loaded of its role) to the winning role
    skip     too few requests in the window to judge

Margin and confirmations are the hysteresis (a split that wins by a hair, or once, never flips
the cluster); the dwell time bounds flips per minute whatever the load does; a flip that would
undo the last one needs twice the margin and twice the dwell. Only splits that
can serve every request are candidates: prefill and decode both present, or colocated alone.
An instance keeps its TP and GPUs; only plans whose re-plannable phases share hardware (same
device, GPU type, tp, pp and GPU share) allow re-planning (`replan_roles`).

The window is the forecast: the next `window_s` seconds are assumed to look like the last, with
the requests queued now arriving first, the window sample replayed `repeat` times (a split whose
queue or KV memory keeps growing shows it only over a longer horizon). A decision for 8
instances of one kind (3 splits, 256 requests twice over) takes 0.1-0.5 s on the shared 2-core
development machine; `score_splits` takes only picklable arguments so the controller runs it in
a worker process, off its event loop.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from engine.errors import ConfigError
from engine.plan import Plan
from placement.workload import Workload

ROLES = ("prefill", "decode", "colocated")
OUTCOMES = ("keep", "confirm", "dwell", "flip", "skip")
SHORT = {"prefill": "P", "decode": "D", "colocated": "C"}


@dataclass(frozen=True, order=True)
class Split:
    """How many instances take each role."""

    prefill: int = 0
    decode: int = 0
    colocated: int = 0

    @classmethod
    def of(cls, roles) -> "Split":
        """The split of an iterable of role names."""
        roles = list(roles)
        bad = sorted(set(roles) - set(ROLES))
        if bad:
            raise ConfigError(f"unknown role(s) {bad}; roles are {ROLES}")
        return cls(roles.count("prefill"), roles.count("decode"), roles.count("colocated"))

    @property
    def servable(self) -> bool:
        """Every request can be served: prefill beside decode, or colocated alone (a prefill
        pool with no decode pool, or the reverse, strands requests)."""
        if min(self.prefill, self.decode, self.colocated) < 0:
            return False
        return (self.prefill >= 1 and self.decode >= 1) or (self.prefill == self.decode == 0 and self.colocated >= 1)

    @property
    def num_instances(self) -> int:
        return self.prefill + self.decode + self.colocated

    def count(self, role: str) -> int:
        return getattr(self, role)

    def moved(self, from_role: str, to_role: str) -> "Split":
        d = {r: self.count(r) for r in ROLES}
        d[from_role] -= 1
        d[to_role] += 1
        return Split(**d)

    def __str__(self) -> str:
        return "+".join(f"{self.count(r)}{SHORT[r]}" for r in ("colocated", "prefill", "decode") if self.count(r))


@dataclass
class ReplanConfig:
    """Knobs of the policy (defaults suit a GPU cluster; the CPU test shortens the times)."""

    margin: float = 0.05            # attainment (fraction of requests) a split must win by
    confirmations: int = 2          # consecutive decisions naming the same flip before it happens
    min_dwell_s: float = 60.0       # seconds between two flips
    window_s: float = 60.0          # recent arrivals the policy looks at
    max_window_requests: int = 256  # the most recent ones of the window, for speed
    repeat: int = 2                 # the forecast is the window sample this many times over
    min_window_requests: int = 16   # fewer: skip (nothing to judge)
    interval_s: float = 5.0         # how often the controller asks

    def __post_init__(self):
        if not 0 <= self.margin < 1:
            raise ConfigError(f"replan margin must be in [0, 1), got {self.margin}")
        if self.confirmations < 1:
            raise ConfigError(f"replan confirmations must be >= 1, got {self.confirmations}")
        for name in ("min_dwell_s", "window_s", "interval_s"):
            if not getattr(self, name) >= 0 or (name != "min_dwell_s" and not getattr(self, name) > 0):
                raise ConfigError(f"replan {name} must be > 0, got {getattr(self, name)}")
        if self.repeat < 1:
            raise ConfigError(f"replan repeat must be >= 1, got {self.repeat}")
        if self.max_window_requests < self.min_window_requests or self.min_window_requests < 1:
            raise ConfigError("replan needs 1 <= min_window_requests <= max_window_requests, got "
                              f"{self.min_window_requests} and {self.max_window_requests}")


@dataclass
class Window:
    """Recent arrivals (s, any origin) with their lengths, and the requests queued now
    (prompt length, output tokens still to come) that the next split must serve first."""

    arrival_s: np.ndarray
    prompt_lens: np.ndarray
    output_lens: np.ndarray
    queued: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_requests(self) -> int:
        return len(self.arrival_s)

    def workload(self, max_requests: int, max_model_len: int = 0, repeat: int = 1) -> Workload:
        """What the candidates are simulated on: the queued requests at t=0, then the most
        recent `max_requests` arrivals re-timed to start at t=0 (the next window, forecast as
        the last), `repeat` times back to back: a split that keeps up for a few seconds but
        whose queue or KV memory keeps growing shows it only over a longer horizon."""
        n = min(self.num_requests, max_requests)
        arr = np.asarray(self.arrival_s, dtype=np.float64)[-n:] if n else np.zeros(0)
        arr = arr - arr[0] if n else arr
        prompt = np.asarray(self.prompt_lens, dtype=np.int64)[-n:]
        output = np.asarray(self.output_lens, dtype=np.int64)[-n:]
        if n > 1 and repeat > 1:
            period = arr[-1] * n / (n - 1)          # the span plus one mean gap
            arr = np.concatenate([arr + k * period for k in range(repeat)])
            prompt, output = np.tile(prompt, repeat), np.tile(output, repeat)
        if self.queued:
            q = np.array(self.queued, dtype=np.int64).reshape(-1, 2)
            arr = np.concatenate([np.zeros(len(q)), arr])
            prompt = np.concatenate([q[:, 0], prompt])
            output = np.concatenate([q[:, 1], output])
        prompt, output = np.maximum(prompt, 1), np.maximum(output, 1)
        if max_model_len:
            prompt = np.minimum(prompt, max_model_len - 1)
            output = np.maximum(1, np.minimum(output, max_model_len - prompt))
        return Workload("replan-window", arr, prompt, output)


@dataclass
class Decision:
    """One decision, with the figures it compared (`scores`: split -> attainment and p90s)."""

    outcome: str
    current: Split
    best: Split
    reason: str
    instance_id: str | None = None
    from_role: str | None = None
    to_role: str | None = None
    scores: dict = field(default_factory=dict)
    eval_s: float = 0.0
    num_window_requests: int = 0

    def to_dict(self) -> dict:
        return {"outcome": self.outcome, "current": str(self.current), "best": str(self.best),
                "instance_id": self.instance_id, "from_role": self.from_role, "to_role": self.to_role,
                "reason": self.reason, "scores": self.scores, "eval_s": round(self.eval_s, 4),
                "num_window_requests": self.num_window_requests}


# Which plans allow it -----------------------------------------------------------------------
def _hardware(phase) -> tuple:
    return (phase.device, phase.gpu_type, phase.tp, phase.pp, phase.num_gpus_per_rank)


def replan_roles(plan: Plan) -> tuple[tuple[str, ...], str]:
    """(roles an instance may take, why) for a plan; no roles means re-planning is not allowed.

    Allowed when: the plan does not opt out (`replan: false`), it has an SLO to judge by, at
    least 2 instances in at least 2 roles, some flip of one instance leaves a split that can
    serve (not so for 1 prefill + 1 decode), and every role's instances have the same hardware
    (an instance keeps its TP and GPUs when it changes role). Plans whose prefill and decode
    instances share GPUs (fractions of a GPU, paired) are excluded: a flip would unpair them."""
    from placement.deployment import shared_pairs
    if not getattr(plan, "replan", True):
        return (), "the plan opts out (replan: false)"
    if plan.slo_ttft_s <= 0 or plan.slo_tpot_s <= 0:
        return (), "the plan has no SLO (slo_ttft_s, slo_tpot_s) to compare splits by"
    phases = plan.phases
    if len(phases) < 2:
        return (), f"a {plan.mode} plan has one role only"
    if sum(p.num_instances for p in phases.values()) < 2:
        return (), "fewer than 2 instances"
    hw = {name: _hardware(p) for name, p in phases.items()}
    if len(set(hw.values())) > 1:
        return (), ("its roles run on different hardware (device, gpu_type, tp, pp, GPU share: "
                    + ", ".join(f"{k} {v}" for k, v in hw.items()) + "); an instance keeps its TP and GPUs")
    if shared_pairs(plan):
        return (), "its prefill and decode instances share GPUs in pairs; a flip would unpair them"
    split = Split(*(phases[r].num_instances if r in phases else 0 for r in ROLES))
    if not any(split.count(a) and split.moved(a, b).servable for a in phases for b in phases if a != b):
        return (), f"no flip of one instance leaves {split} able to serve (e.g. 1 prefill + 1 decode)"
    return tuple(phases), f"{sum(p.num_instances for p in phases.values())} instances of the same hardware, roles {'/'.join(phases)}"


def plan_for_split(plan: Plan, split: Split) -> Plan:
    """The plan with `split`'s instance counts (mode from which roles are present)."""
    d = plan.to_dict()
    if split.colocated and not (split.prefill or split.decode):
        d["mode"] = "colocated"
    elif split.colocated:
        d["mode"] = "mixed"
    else:
        d["mode"] = "disaggregated"
    for role in ROLES:
        n = split.count(role)
        if role == "colocated" and plan.mode not in ("colocated", "mixed"):
            # A disaggregated plan has no colocated settings: an instance turned colocated keeps
            # its prefill settings (same hardware).
            d[role] = {**d["prefill"], "num_instances": max(n, 1)}
        elif n:
            d[role]["num_instances"] = n
    d["predicted"] = {}                  # a layout written for other counts does not apply
    return Plan.from_dict(d)


# Scoring (runs in a worker process in the controller) --------------------------------------
_DEPLOYMENTS: dict = {}


def _deployment(plan_dict: dict, split: Split, latency: str):
    from placement.deployment import deployment_from_plan
    key = (repr(sorted(plan_dict.items(), key=lambda kv: kv[0])), split, latency)
    dep = _DEPLOYMENTS.get(key)
    if dep is None:
        if len(_DEPLOYMENTS) > 256:
            _DEPLOYMENTS.clear()
        dep = _DEPLOYMENTS[key] = deployment_from_plan(plan_for_split(Plan.from_dict(plan_dict), split), latency=latency)
    return dep


def score_splits(plan_dict: dict, splits: list[Split], workload: Workload, latency: str,
                 slo: tuple[float, float]) -> dict[Split, dict]:
    """Simulate each split on the workload: attainment and p90 TTFT/TPOT per split."""
    from placement.simulator import simulate
    out = {}
    for s in splits:
        res = simulate(_deployment(plan_dict, s, latency), workload)
        out[s] = {"attainment": round(res.attainment(*slo), 4),
                  "ttft_p90_s": _p90(res.ttft_s), "tpot_p90_s": _p90(res.tpot_s)}
    return out


def warm_up() -> bool:
    """Import the simulator (a worker process calls this once, so the first decision is fast)."""
    import placement.simulator  # noqa: F401
    return True


def _p90(x) -> float | None:
    v = float(np.percentile(x, 90)) if len(x) else 0.0
    return round(v, 4) if math.isfinite(v) else None


# The policy ------------------------------------------------------------------------------
class ReplanPolicy:
    """Decides keep or flip from a window; holds the hysteresis state (the move being
    confirmed, the time of the last flip)."""

    def __init__(self, plan: Plan, config: ReplanConfig | None = None, latency: str = "roofline",
                 roles: tuple[str, ...] | None = None, max_model_len: int = 0):
        self.plan, self.config, self.latency = plan, config or ReplanConfig(), latency
        if roles is None:
            roles, why = replan_roles(plan)
            if not roles:
                raise ConfigError(f"re-planning is not possible for this plan: {why}")
        self.roles = tuple(roles)
        self.slo = (plan.slo_ttft_s, plan.slo_tpot_s)
        self.max_model_len = max_model_len
        self.plan_dict = plan.to_dict()
        self.last_flip_s: float | None = None
        self._streak: tuple[Split, int] | None = None   # the winning split and how often in a row
        self._previous: Split | None = None             # the split before the last flip
        self._pending_previous: Split | None = None

    def candidates(self, current: Split) -> list[Split]:
        """The current split and every servable split one flip away (within the roles)."""
        out = [current]
        for a in self.roles:
            for b in self.roles:
                if a != b and current.count(a) >= 1:
                    s = current.moved(a, b)
                    if s.servable and s not in out:
                        out.append(s)
        return out

    def prepare(self, roles: dict[str, str], window: Window):
        """(current split, candidates, workload) to score, or None when the window is too small."""
        if window.num_requests < self.config.min_window_requests:
            return None
        current = Split.of(roles.values())
        wl = window.workload(self.config.max_window_requests, self.max_model_len, self.config.repeat)
        return current, self.candidates(current), wl

    def decide(self, roles: dict[str, str], window: Window, now_s: float,
               loads: dict[str, float] | None = None, scores: dict | None = None) -> Decision:
        """One decision. `roles`: instance id -> role now; `loads`: instance id -> queued work
        (the least loaded instance of a role is the one that flips); `scores` from
        `score_splits` when the caller ran it elsewhere (else it runs here)."""
        t0 = time.perf_counter()
        prep = self.prepare(roles, window)
        current = Split.of(roles.values())
        if prep is None:
            return Decision("skip", current, current, f"{window.num_requests} requests in the window "
                            f"(< {self.config.min_window_requests}): nothing to judge",
                            num_window_requests=window.num_requests)
        current, cands, wl = prep
        if scores is None:
            scores = score_splits(self.plan_dict, cands, wl, self.latency, self.slo)
        d = self.judge(current, scores, roles, now_s, loads or {})
        d.eval_s, d.num_window_requests = time.perf_counter() - t0, wl.num_requests
        return d

    def judge(self, current: Split, scores: dict, roles: dict[str, str], now_s: float,
              loads: dict[str, float]) -> Decision:
        """Apply margin, confirmations and dwell to the scores."""
        cfg = self.config
        cur = scores[current]["attainment"]
        # Best by attainment; ties go to lower p90 TTFT + TPOT relative to the SLO, then to the
        # current split (no flip for nothing).
        def key(s):
            v = scores[s]
            lat = (v["ttft_p90_s"] or math.inf) / self.slo[0] + (v["tpot_p90_s"] or math.inf) / self.slo[1]
            return (-v["attainment"], lat, s != current)
        best = min(scores, key=key)
        table = {str(s): v for s, v in scores.items()}
        figures = ", ".join(f"{s} {v['attainment']:.1%}" for s, v in sorted(scores.items(), key=lambda kv: key(kv[0])))
        # Undoing the last flip needs twice the margin and twice the dwell: two near-equal splits
        # whose windows score far apart tick to tick would otherwise swap back and forth.
        undo = best == self._previous and best != current
        margin, dwell = (2 * cfg.margin, 2 * cfg.min_dwell_s) if undo else (cfg.margin, cfg.min_dwell_s)
        if best == current or scores[best]["attainment"] < cur + margin:
            self._streak = None
            why = ("current split is best" if best == current else
                   f"{best} wins by {scores[best]['attainment'] - cur:+.1%} < margin {margin:.0%}"
                   + (" (it would undo the last flip: margin doubled)" if undo else ""))
            return Decision("keep", current, best, f"keep {current}: {why} (attainment {figures})", scores=table)
        n = self._streak[1] + 1 if self._streak and self._streak[0] == best else 1
        self._streak = (best, n)
        from_role = next(r for r in ROLES if best.count(r) < current.count(r))
        to_role = next(r for r in ROLES if best.count(r) > current.count(r))
        gain = (f"{best} {scores[best]['attainment']:.1%} vs {current} {cur:.1%} (margin {margin:.0%}"
                f"{', undoing the last flip' if undo else ''}; {figures})")
        if n < cfg.confirmations:
            return Decision("confirm", current, best, f"{from_role}->{to_role} wins {n}/{cfg.confirmations} "
                            f"times in a row: {gain}", None, from_role, to_role, table)
        if self.last_flip_s is not None and now_s - self.last_flip_s < dwell:
            return Decision("dwell", current, best, f"{from_role}->{to_role} wins but the last flip was "
                            f"{now_s - self.last_flip_s:.0f} s ago (< {dwell:.0f} s): {gain}",
                            None, from_role, to_role, table)
        pool = sorted((i for i, r in roles.items() if r == from_role), key=lambda i: (loads.get(i, 0.0), _natural(i)))
        self._streak = None
        self._pending_previous = current
        return Decision("flip", current, best, f"flip {pool[0]} {from_role}->{to_role}: {gain}",
                        pool[0], from_role, to_role, table)

    def flipped(self, now_s: float) -> None:
        """The flip the last decision asked for is done (or started): the dwell time counts
        from here."""
        self.last_flip_s = now_s
        self._previous = self._pending_previous


def _natural(instance_id: str):
    # "prefill-10" after "prefill-9"; the highest index flips first among equal loads.
    head, _, tail = instance_id.rpartition("-")
    return (head, -int(tail)) if tail.isdigit() else (instance_id, 0)

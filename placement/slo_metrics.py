"""Per-request results of a simulation, SLO attainment, and goodput by search on rate.

A request meets its SLO when TTFT <= the TTFT target and TPOT <= the TPOT target, where
TPOT = (finish - first token) / (output tokens - 1) (0 for a one-token output). Attainment is
the fraction of requests that meet it; goodput is the highest rate whose attainment is >= the
target; per-device goodput divides by the devices used.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

BREAKDOWN = ("prefill_queue", "prefill_compute", "kv_transfer", "decode_queue")


@dataclass
class SimResult:
    """Timestamps (s, simulated clock) per request; NaN where a request never got there
    (rejected, or the run stopped early once the SLO was out of reach)."""

    arrival_s: np.ndarray
    prefill_start_s: np.ndarray
    first_token_s: np.ndarray
    transfer_end_s: np.ndarray
    decode_step_s: np.ndarray
    finish_s: np.ndarray
    prompt_lens: np.ndarray
    output_lens: np.ndarray
    num_preemptions: np.ndarray
    num_devices: int = 1
    completed: bool = True          # False: stopped early, attainment is below the target
    wall_s: float = 0.0
    num_events: int = 0

    @property
    def num_requests(self) -> int:
        return len(self.arrival_s)

    @property
    def rate(self) -> float:
        span = float(self.arrival_s[-1] - self.arrival_s[0]) if self.num_requests > 1 else 0.0
        return (self.num_requests - 1) / span if span > 0 else float("inf")

    @property
    def ttft_s(self) -> np.ndarray:
        return np.nan_to_num(self.first_token_s - self.arrival_s, nan=np.inf)

    @property
    def tpot_s(self) -> np.ndarray:
        steps = np.maximum(self.output_lens - 1, 1)
        tpot = (self.finish_s - self.first_token_s) / steps
        tpot = np.where(self.output_lens <= 1, 0.0, tpot)
        return np.nan_to_num(np.where(np.isnan(self.finish_s), np.inf, tpot), nan=np.inf)

    def slo_met(self, ttft_slo_s: float, tpot_slo_s: float) -> np.ndarray:
        return (self.ttft_s <= ttft_slo_s) & (self.tpot_s <= tpot_slo_s)

    def attainment(self, ttft_slo_s: float, tpot_slo_s: float) -> float:
        """Fraction of requests meeting both targets (unfinished requests miss)."""
        return float(self.slo_met(ttft_slo_s, tpot_slo_s).mean()) if self.num_requests else 1.0

    def breakdown(self) -> dict[str, np.ndarray]:
        """Per request: prefill queue (arrival to prefill start), prefill compute (to the first
        token), KV transfer (to the KV landing on decode; 0 when colocated) and decode queue
        (to the first decode step). TTFT is the first two; the last two delay the second token."""
        transfer_end = np.where(np.isnan(self.transfer_end_s), self.first_token_s, self.transfer_end_s)
        return {
            "prefill_queue": self.prefill_start_s - self.arrival_s,
            "prefill_compute": self.first_token_s - self.prefill_start_s,
            "kv_transfer": transfer_end - self.first_token_s,
            "decode_queue": self.decode_step_s - transfer_end,
        }

    def summary(self, ttft_slo_s: float, tpot_slo_s: float) -> dict:
        ttft, tpot = self.ttft_s, self.tpot_s
        parts = self.breakdown()
        return {
            "num_requests": self.num_requests, "rate": self.rate, "completed": self.completed,
            "attainment": self.attainment(ttft_slo_s, tpot_slo_s),
            "ttft_attainment": float((ttft <= ttft_slo_s).mean()),
            "tpot_attainment": float((tpot <= tpot_slo_s).mean()),
            "ttft_p50_s": _pct(ttft, 50), "ttft_p90_s": _pct(ttft, 90), "ttft_p99_s": _pct(ttft, 99),
            "tpot_p50_s": _pct(tpot, 50), "tpot_p90_s": _pct(tpot, 90), "tpot_p99_s": _pct(tpot, 99),
            "breakdown_mean_s": {k: float(np.nanmean(v)) if np.isfinite(v).any() else None
                                 for k, v in parts.items()},
            "num_preempted": int((self.num_preemptions > 0).sum()),
        }


def _pct(x: np.ndarray, q: float) -> float | None:
    v = float(np.percentile(x, q)) if len(x) else 0.0
    return v if math.isfinite(v) else None


@dataclass
class Goodput:
    """Result of a goodput search: `rate` passes, every probe is (rate, attainment).
    `result` is the whole simulation at `rate` when the search kept it (a passing probe runs
    to the end, so it is what a plain `simulate` at that rate gives): callers reuse it
    instead of replaying the same rate again. `below` is set when the search stopped at a
    failing probe at or under its `stop_below`: the goodput is below that rate, and `rate` is
    only what passed so far."""

    rate: float
    attainment: float
    probes: list[tuple[float, float]] = field(default_factory=list)
    result: SimResult | None = field(default=None, repr=False, compare=False)
    below: float | None = None


def search_goodput(attainment_at: Callable[[float], float], target: float, start_rate: float,
                   rel_tol: float = 0.04, max_probes: int = 24, min_rate: float = 1e-3,
                   max_rate: float = float("inf"), step: float = 2.0, accelerate: bool = False,
                   stop_below: float = 0.0) -> Goodput:
    """Highest rate (<= `max_rate`) whose attainment is >= `target`: grow or shrink
    `start_rate` by `step`x until the answer is bracketed, then bisect to `rel_tol` (a good
    start with a small step takes the fewest probes). With `accelerate` the step squares after
    each move (up to 2x): a start that is already the answer is confirmed in two probes, one
    that is far off is still bracketed in a few. Attainment falls with rate (queues only
    grow), so the bracket holds; a non-monotone blip costs at most some precision.
    `stop_below`: a caller that only needs the goodput if it reaches that rate (a candidate
    that cannot otherwise win) stops at the first failing probe at or under it (`below`)."""
    probes: list[tuple[float, float]] = []

    def probe(rate):
        a = attainment_at(rate)
        probes.append((rate, a))
        return a

    lo, hi, lo_att = 0.0, None, 1.0
    rate = start_rate
    while len(probes) < max_probes:
        a = probe(rate)
        if a >= target:
            lo, lo_att = rate, a
            if hi is not None or rate >= max_rate:
                break
            rate = min(rate * step, max_rate)
        else:
            hi = rate
            if rate <= stop_below:
                return Goodput(lo, lo_att, probes, below=rate)
            if lo > 0:
                break
            if rate < min_rate:
                return Goodput(0.0, a, probes)
            rate /= step
        if accelerate:
            step = min(step * step, 2.0)
    while hi is not None and lo > 0 and (hi - lo) > rel_tol * hi and len(probes) < max_probes:
        mid = (lo + hi) / 2
        a = probe(mid)
        if a >= target:
            lo, lo_att = mid, a
        else:
            hi = mid
            if mid <= stop_below:
                return Goodput(lo, lo_att, probes, below=mid)
    return Goodput(lo, lo_att, probes)

"""The re-planner in the controller (`disagg serve --replan auto`): a reconcile loop that, every
`interval_s`, measures the recent load, asks the policy (placement/replan.py) whether another
role split of the same instances would serve it better, and flips one instance at a time with
`Controller.change_role`.

    requests submitted ─► recent (arrival, prompt, output; refs to the controller's Tracked)
    every interval_s:  window + queued ─► score splits (worker process) ─► judge ─► log, metrics
                                                                        └► flip ─► change_role

Measurements: the window is every request that arrived in the last `window_s` (its output
length is what it produced once finished, else its max_tokens: what it may still take); the
queue is every older request still unfinished (prompt, tokens still to come). The log line and
`disagg_replan_window_*` gauges also show the window's rate, mean lengths and measured
attainment. Scoring runs in one worker process (spawned, so no Ray or gRPC state is forked):
the simulator is pure Python and would hold the event loop for tenths of a second.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import math
import multiprocessing
import time
from collections import deque

import numpy as np

from engine.errors import ConfigError
from placement.replan import OUTCOMES, ReplanConfig, ReplanPolicy, Window, replan_roles, score_splits, warm_up

log = logging.getLogger("disagg.replan")
MODES = ("auto", "off")


def default_latency_model(plan) -> str:
    """The committed profile of the plan's device and model if there is one, else roofline."""
    from placement.latency_profile import profile_path
    phase = next(iter(plan.phases.values()))
    device = phase.gpu_type or ("cpu" if phase.device == "cpu" else "H100")
    model = plan.model if plan.model else "embedded"
    path = profile_path(device, model.rstrip("/").rsplit("/", 1)[-1])
    return str(path) if path.is_file() else "roofline"


def make_policy(plan, mode: str, config: ReplanConfig, latency: str = "auto", max_model_len: int = 0):
    """(policy or None, why): None when `mode` is off or the plan does not allow re-planning."""
    if mode not in MODES:
        raise ConfigError(f"--replan must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return None, "off (--replan off)"
    roles, why = replan_roles(plan)
    if not roles:
        return None, f"off: {why}"
    lat = default_latency_model(plan) if latency == "auto" else latency
    return ReplanPolicy(plan, config, lat, roles, max_model_len), f"auto: {why}; latency model {lat}"


class Replanner:
    def __init__(self, controller, policy: ReplanPolicy, metrics=None, use_process: bool = True):
        self.c, self.policy = controller, policy
        self.cfg: ReplanConfig = policy.config
        self.recent: deque = deque()
        self.history: deque = deque(maxlen=200)        # decisions, newest last
        self.counts = {o: 0 for o in (*OUTCOMES, "failed")}
        self._pool = None
        self._use_process = use_process
        self._metrics(metrics)
        controller.observers.append(self.observe)

    def _metrics(self, metrics) -> None:
        self.m = None
        if metrics is None:
            return
        from prometheus_client import Counter, Gauge
        r = metrics.registry
        self.m = {
            "total": Counter("disagg_replan", "Re-planning decisions by outcome (keep, confirm, dwell, flip, skip, "
                             "failed) and the flip they name", ["outcome", "from_role", "to_role"], registry=r),
            "rate": Gauge("disagg_replan_window_rate_rps", "Arrival rate over the re-planner's window", registry=r),
            "prompt": Gauge("disagg_replan_window_mean_prompt_tokens", "Mean prompt length in the window", registry=r),
            "output": Gauge("disagg_replan_window_mean_output_tokens", "Mean output length in the window", registry=r),
            "attainment": Gauge("disagg_replan_window_attainment", "Measured SLO attainment of the window's "
                                "finished requests", registry=r),
            "predicted": Gauge("disagg_replan_predicted_attainment", "Simulated attainment of each split on the "
                               "last window", ["split"], registry=r),
        }

    # Measurements ------------------------------------------------------------------------
    def observe(self, t) -> None:
        """A request was submitted (Controller.observers)."""
        self.recent.append(t)

    def measure(self, now: float) -> tuple[Window, dict]:
        """The window (with the older unfinished requests as its queue) and what was measured."""
        start = now - self.cfg.window_s
        while self.recent and self.recent[0].times.get("arrival", now) < start and self.recent[0].closed:
            self.recent.popleft()
        arr, prompt, output, queued = [], [], [], []
        met = done = 0
        slo = self.policy.slo
        for t in self.recent:
            n_out = len(t.req.output_token_ids)
            remaining = n_out if t.closed else max(t.req.sampling.max_tokens, n_out)
            a = t.times.get("arrival", now)
            if a < start:
                if not t.closed:
                    queued.append((t.req.num_prompt_tokens, max(1, t.req.sampling.max_tokens - n_out)))
                continue
            arr.append(a)
            prompt.append(t.req.num_prompt_tokens)
            output.append(max(1, remaining))
            if t.closed:
                done += 1
                tm = t.timings()
                met += (t.finish_reason != "error" and tm.get("ttft_s", math.inf) <= slo[0]
                        and tm.get("tpot_s", 0.0) <= slo[1])
        w = Window(np.array(arr) - (arr[0] if arr else 0.0), np.array(prompt, dtype=np.int64),
                   np.array(output, dtype=np.int64), queued)
        span = (arr[-1] - arr[0]) if len(arr) > 1 else 0.0
        meas = {"num_requests": len(arr), "rate_rps": round((len(arr) - 1) / span, 3) if span > 0 else 0.0,
                "mean_prompt_tokens": round(float(np.mean(prompt)), 1) if prompt else 0.0,
                "mean_output_tokens": round(float(np.mean(output)), 1) if output else 0.0,
                "num_queued": len(queued), "num_finished": done,
                "attainment": round(met / done, 4) if done else None}
        return w, meas

    def loads(self) -> dict[str, float]:
        """Requests using each instance now (the least loaded instance of a role flips)."""
        out = {i.instance_id: 0.0 for i in self.c.instances}
        for t in self.c.tracked.values():
            for inst in (t.prefill, t.decode):
                if inst is not None:
                    out[inst.instance_id] = out.get(inst.instance_id, 0.0) + 1
        return out

    # The loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        log.info("re-planner on: every %.1f s over the last %.0f s, margin %.0f%%, %d confirmations, dwell %.0f s, "
                 "roles %s, latency model %s", self.cfg.interval_s, self.cfg.window_s, 100 * self.cfg.margin,
                 self.cfg.confirmations, self.cfg.min_dwell_s, "/".join(self.policy.roles), self.policy.latency)
        if self._use_process:
            self._pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            await asyncio.get_running_loop().run_in_executor(self._pool, warm_up)
        try:
            while True:
                await asyncio.sleep(self.cfg.interval_s)
                try:
                    await self.tick()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - a failed decision must not stop serving
                    log.warning("re-planner: decision failed: %s", e)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)

    async def _score(self, cands, wl) -> dict:
        args = (self.policy.plan_dict, cands, wl, self.policy.latency, self.policy.slo)
        if not self._use_process:
            return await asyncio.to_thread(score_splits, *args)
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        return await asyncio.get_running_loop().run_in_executor(self._pool, score_splits, *args)

    async def tick(self) -> dict | None:
        """One decision (returned as logged), and the flip it asks for."""
        now = time.monotonic()
        insts = self.c.instances
        if any(not i.alive or getattr(i, "draining", False) for i in insts):
            return None                 # a restart or role change is under way: judge after it
        roles = {i.instance_id: i.role for i in insts if i.role in self.policy.roles}
        window, meas = self.measure(now)
        self._gauges(meas)
        prep = self.policy.prepare(roles, window)
        if prep is None:
            d = self.policy.decide(roles, window, now)        # the "skip" decision, no simulation
        else:
            current, cands, wl = prep
            t0 = time.perf_counter()
            scores = await self._score(cands, wl)
            d = self.policy.judge(current, scores, roles, now, self.loads())
            d.eval_s, d.num_window_requests = time.perf_counter() - t0, wl.num_requests
        rec = {"time": time.time(), **d.to_dict(), "measured": meas}
        if d.outcome == "flip":
            try:
                await self.c.change_role(d.instance_id, d.to_role, reason=f"re-planner: {d.reason}")
                self.policy.flipped(time.monotonic())
            except Exception as e:  # noqa: BLE001 - refused or failed: logged, counted, tried again later
                rec["outcome"], rec["error"] = "failed", str(e)
        self._record(rec)
        return rec

    def _record(self, rec: dict) -> None:
        self.history.append(rec)
        self.counts[rec["outcome"]] += 1
        meas = rec["measured"]
        text = (f"re-planner {rec['outcome']}: {rec['reason']} | window {meas['num_requests']} requests, "
                f"{meas['rate_rps']} req/s, prompt {meas['mean_prompt_tokens']} / output {meas['mean_output_tokens']} "
                f"tokens, {meas['num_queued']} older still queued, measured attainment {meas['attainment']}; "
                f"simulated in {rec['eval_s']:.2f} s" + (f"; FAILED: {rec['error']}" if "error" in rec else ""))
        (log.warning if rec["outcome"] in ("flip", "failed") else log.info)(text)
        if self.m:
            self.m["total"].labels(rec["outcome"], rec["from_role"] or "", rec["to_role"] or "").inc()
            for split, v in rec["scores"].items():
                self.m["predicted"].labels(split).set(v["attainment"])

    def summary(self) -> dict:
        """For stats: decisions by outcome and the last few."""
        return {"counts": dict(self.counts), "roles": "/".join(self.policy.roles),
                "last": [{k: r[k] for k in ("outcome", "reason", "instance_id", "from_role", "to_role")}
                         for r in list(self.history)[-5:]]}

    def _gauges(self, meas: dict) -> None:
        if not self.m:
            return
        self.m["rate"].set(meas["rate_rps"])
        self.m["prompt"].set(meas["mean_prompt_tokens"])
        self.m["output"].set(meas["mean_output_tokens"])
        if meas["attainment"] is not None:
            self.m["attainment"].set(meas["attainment"])


def start(cluster, metrics, mode: str, config: ReplanConfig, latency: str = "auto") -> Replanner | None:
    """Start the re-planner of a started `cluster.api.Cluster` when `mode` and the plan allow it
    (logged either way); it stops with the controller."""
    c = cluster.controller
    policy, why = make_policy(c.plan, mode, config, latency, c.max_model_len)
    log.info("re-planning %s", why)
    if policy is None:
        return None
    r = Replanner(c, policy, metrics)
    c.replanner = r
    c.spawn(r.run())
    return r

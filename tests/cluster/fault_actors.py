"""Test-only rank actors that inject faults, passed to `Cluster(..., actor_cls=...)`. None of
this is on the production actor's surface.

    FaultInjectingRankActor.inject_fault("send_delay_s", s): delays the rank's next KV send;

    poison_prefill / poison_decode: a request whose prompt starts with that marker makes the
        model step of that role raise (while it is in the batch), as a bug triggered by one
        request's data would;
    start_reply_delay_s: the decode instance's start_decode returns this late (after the
        request joined the batch), so its first tokens reach the controller before the reply;
    step_delay_s: every step of the role sleeps first (a slow instance, so queues build).

Every trigger counts how often it fired (`fault_counts`), so a test can assert that its
scenario really happened instead of quietly running a milder one.
"""
from __future__ import annotations

import time

from cluster.actors import RankActor

POISON_PREFILL = [251, 251, 251]
POISON_DECODE = [252, 252, 252]


class InjectedFault(RuntimeError):
    pass


class FaultInjectingRankActor(RankActor):
    def inject_fault(self, kind: str, value: float) -> None:
        """'send_delay_s' delays this rank's next KV send (a hang when longer than the
        transfer timeout)."""
        if kind != "send_delay_s":
            raise ValueError(f"unknown fault {kind!r}")
        self.worker.kv.faults[kind] = value


class FaultyRank(RankActor):
    faults: dict = {}           # set per instance by faulty_actor()'s subclass

    def init(self, tp_address):
        info = super().init(tp_address)
        self.fired = {"poison": 0, "start_reply_delay": 0, "step_delay": 0}
        runner = self.worker.rt.runner
        execute = runner.execute

        def hooked(step, *args, **kw):
            delay = self.faults.get(f"{self.role}_step_delay_s", 0.0)
            if delay:
                self.fired["step_delay"] += 1
                time.sleep(delay)
            marker = self.faults.get(f"poison_{self.role}")
            if marker and self._poisoned(step, marker):
                self.fired["poison"] += 1
                raise InjectedFault(f"injected fault: a poison request is in this {self.role} step")
            return execute(step, *args, **kw)
        runner.execute = hooked
        return info

    def _poisoned(self, step, marker: list[int]) -> bool:
        if any(start == 0 and list(toks[:len(marker)]) == marker for toks, start, _, _ in step.prefill):
            return True
        if not step.decode:
            return False
        # A decode entry names its request only by its block table.
        with self.worker._lock:        # Ray calls (start_decode) add requests meanwhile
            reqs = list(self.worker.requests.values())
        by_table = {tuple(r.block_ids): r for r in reqs if r.block_ids}
        for _, _, table in step.decode:
            r = by_table.get(tuple(table))
            if r is not None and r.prompt_token_ids[:len(marker)] == marker:
                return True
        return False

    def start_decode(self, *args, **kw):
        super().start_decode(*args, **kw)
        delay = self.faults.get("start_reply_delay_s", 0.0)
        if delay:
            self.fired["start_reply_delay"] += 1
            time.sleep(delay)

    def fault_counts(self) -> dict:
        return dict(self.fired)


def faulty_actor(**faults):
    """A rank actor class (for `actor_cls`) with `faults` (see the module docstring) switched on."""
    faults = dict(faults)

    class FaultyRankActor(FaultyRank):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.faults = faults        # a closure: travels with the class to the workers
    return FaultyRankActor


def fault_counts(cluster) -> dict:
    """Sum of every live rank's fault counters."""
    import ray
    total: dict = {}
    for inst in cluster.controller.prefills + cluster.controller.decodes:
        for counts in ray.get([r.fault_counts.remote() for r in inst.ranks]):
            for k, v in counts.items():
                total[k] = total.get(k, 0) + v
    return total

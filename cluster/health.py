"""Failure detection and recovery for the controller's instances.

An instance is failed when any of its ranks stops answering a ping, its event stream breaks,
or a step raises. Then: every request the instance touched is abandoned on the survivors and
recomputed elsewhere (a new attempt, from prompt + tokens already streamed); the instance's
actors are killed and a fresh instance with the same id takes its place, reconnecting its KV
channels to every peer. While it restarts, requests that need its phase wait; when no instance
of a phase is alive or restarting, requests fail with a clear error.
"""
from __future__ import annotations

import asyncio
import logging
import time

from cluster.instances import create_instance, shutdown_instance

log = logging.getLogger("disagg.health")
PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 10.0
MAX_RESTARTS = 5


class HealthMonitor:
    def __init__(self, controller):
        self.c = controller
        self.restarting: set[str] = set()
        self.restarts: dict[str, int] = {}
        self.given_up: set[str] = set()
        self.recovery_s: list[float] = []

    def can_serve(self) -> bool:
        c = self.c
        ok = lambda insts: any(i.alive or i.instance_id in self.restarting for i in insts)  # noqa: E731
        return ok(c.prefills) and ok(c.decodes)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            for inst in [i for i in self.c.prefills + self.c.decodes if i.alive]:
                try:
                    await asyncio.wait_for(asyncio.gather(*[r.ping.remote() for r in inst.ranks]), PING_TIMEOUT_S)
                except Exception as e:  # noqa: BLE001 - dead actor or a hung one
                    await self.on_failure(inst, f"ping failed: {type(e).__name__}: {e}")

    async def on_failure(self, inst, why: str) -> None:
        c = self.c
        if not inst.alive:
            return
        inst.alive = False
        t0 = time.monotonic()
        c.counters["instance_failures"] += 1
        log.error("instance %s failed (%s): recomputing its requests elsewhere and restarting it", inst.instance_id, why)
        self.restarting.add(inst.instance_id)
        for t in list(c.tracked.values()):
            if t.phase in ("prefill", "transfer", "decode") and inst in (t.prefill, t.decode):
                await self._abandon(t)
        c._spawn(self._restart(inst, t0))

    async def _abandon(self, t) -> None:
        """Free the survivors' part of the current attempt and start a new one."""
        from cluster.controller import _quiet
        c, wid, attempt = self.c, t.wid, t.attempt
        if t.prefill is not None and t.prefill.alive:
            if t.phase == "prefill" and await _quiet(t.prefill.driver.cancel.remote(wid)):
                c.prefill_tokens[t.prefill.instance_id] -= t.req.num_tokens
            await _quiet(t.prefill.driver.release.remote(wid))
        if t.decode is not None and t.decode.alive:
            await _quiet(t.decode.driver.cancel.remote(wid))
        await c._retry(t, "an instance it used failed", attempt)

    async def _restart(self, inst, t0: float) -> None:
        c = self.c
        iid = inst.instance_id
        n = self.restarts[iid] = self.restarts.get(iid, 0) + 1
        try:
            await shutdown_instance(inst)
        except Exception as e:  # noqa: BLE001 - it is dead already
            log.debug("shutdown of %s: %s", iid, e)
        if n > MAX_RESTARTS:
            log.error("instance %s failed %d times: not restarting it", iid, n)
            self._give_up(iid)
            return
        mc = c.model_config
        phase = c.plan.prefill if inst.role == "prefill" else c.plan.decode
        try:
            new = await create_instance(c.plan, inst.role, int(iid.rsplit("-", 1)[1]), phase,
                                        mc.num_layers, mc.num_kv_heads)
            peers = c.decodes if inst.role == "prefill" else c.prefills
            new.alive = False
            pool = c.prefills if inst.role == "prefill" else c.decodes
            pool[pool.index(inst)] = new
            c._adopt(new)
            await asyncio.gather(*[c._connect(new, d) if inst.role == "prefill" else c._connect(d, new)
                                   for d in peers if d.alive])
        except Exception as e:  # noqa: BLE001 - could not come back
            log.error("restart of %s failed: %s", iid, e)
            self._give_up(iid)
            return
        new.alive = True
        self.restarting.discard(iid)
        c.counters["instance_restarts"] += 1
        self.recovery_s.append(time.monotonic() - t0)
        log.warning("instance %s is back after %.1f s", iid, self.recovery_s[-1])
        c._spawn(c._consume(new))
        await c.dispatch_pending()

    def _give_up(self, iid: str) -> None:
        self.restarting.discard(iid)
        self.given_up.add(iid)
        if not self.can_serve():
            for t in list(self.c.pending):
                self.c._fail(t, f"instance {iid} is down for good and no other can serve the request")

"""Failure detection and recovery for the controller's instances.

An instance is failed when any of its ranks stops answering a ping (or reports its step loop
dead or stuck), its event stream breaks, or a step raises. Then every request whose current
attempt uses it is abandoned on the survivors and recomputed elsewhere (a new attempt, from
prompt + tokens already streamed); the instance's actors are killed and a fresh instance with
the same id takes its place and reconnects its KV channels to every live peer. While it
restarts, requests that need its phase wait; when no instance of a phase is alive or
restarting, requests fail with a clear error.
"""
from __future__ import annotations

import asyncio
import logging
import time

from cluster.instances import create_instance, shutdown_instance
from cluster.transfers import quiet

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
        self._join_lock = asyncio.Lock()

    def can_serve(self) -> bool:
        c = self.c
        ok = lambda insts: any(i.alive or i.instance_id in self.restarting for i in insts)  # noqa: E731
        return ok(c.colocated) or (ok(c.prefills) and ok(c.decodes))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            for inst in [i for i in self.c.instances if i.alive]:
                try:
                    await asyncio.wait_for(asyncio.gather(*[r.ping.remote() for r in inst.ranks]), PING_TIMEOUT_S)
                except Exception as e:  # noqa: BLE001 - dead, hung, or its loop died
                    try:
                        await self.on_failure(inst, f"ping failed: {type(e).__name__}: {e}")
                    except Exception:  # noqa: BLE001 - monitoring must go on
                        log.exception("handling the failure of %s failed", inst.instance_id)

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
            uses = (t.decode is inst) or (t.prefill is inst and t.phase in ("prefill", "transfer"))
            if uses and t.phase in ("prefill", "transfer", "decode"):
                await self._abandon(t)
        c.spawn(self._restart(inst, t0))

    async def _abandon(self, t) -> None:
        """Free the survivors' part of the current attempt and start a new one. A scheduled
        transfer's task frees both sides itself once its receives have ended."""
        c, wid, attempt, phase = self.c, t.wid, t.attempt, t.phase
        if phase == "prefill" and t.prefill.alive:
            if await quiet(t.prefill.driver.cancel.remote(wid)):
                c.prefill_tokens[t.prefill.instance_id] -= t.req.num_tokens
                await c.release_decode(t.decode, wid, len(t.blocks or ()))
            # else: it was scheduled meanwhile; its `scheduled` event drains it
        elif phase == "prefill":
            await c.release_decode(t.decode, wid, len(t.blocks or ()))
        elif phase == "decode" and t.decode.alive:
            await quiet(t.decode.driver.cancel.remote(wid))
        await c.retry(t, "an instance it used failed", attempt)

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
        phase = c.plan.phases[inst.role]
        new = None
        try:
            new = await create_instance(c.plan, inst.role, int(iid.rsplit("-", 1)[1]), phase,
                                        mc.num_layers, mc.num_kv_heads, c.actor_cls)
            new.alive = False
            pool = c.pool(inst.role)
            pool[pool.index(inst)] = new
            c.adopt(new)
            # One restart joins at a time, so two instances restarting together still meet:
            # the second connects to the first, which is alive by then.
            async with self._join_lock:
                peers = {"prefill": c.decodes, "decode": c.prefills}.get(inst.role, [])
                await asyncio.gather(*[c.connect(new, d) if inst.role == "prefill" else c.connect(d, new)
                                       for d in peers if d.alive])
                new.alive = True
        except Exception as e:  # noqa: BLE001 - could not come back
            log.error("restart of %s failed: %s", iid, e)
            if new is not None:
                await shutdown_instance(new)
            self._give_up(iid)
            return
        self.restarting.discard(iid)
        c.counters["instance_restarts"] += 1
        self.recovery_s.append(time.monotonic() - t0)
        log.warning("instance %s is back after %.1f s", iid, self.recovery_s[-1])
        c.spawn(c._consume(new))
        await c.dispatch_pending()

    def _give_up(self, iid: str) -> None:
        self.restarting.discard(iid)
        self.given_up.add(iid)
        if not self.can_serve():
            for t in list(self.c.pending):
                self.c.fail(t, f"instance {iid} is down for good and no other can serve the request")

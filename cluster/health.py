"""Failure detection and recovery for the controller's instances.

An instance is failed when any of its ranks stops answering a ping (or reports its step loop
dead or stuck), its event stream breaks, or a step raises. Then every request whose current
attempt uses it is abandoned on the survivors and recomputed elsewhere (a new attempt, from
prompt + tokens already streamed); the instance's actors are killed and a fresh instance with
the same id takes its place and reconnects its KV channels to every live peer. While it
restarts, requests that need its phase wait; when no instance of a phase is alive or
restarting, requests fail with a clear error.

Restart budget (plan: max_restarts, restart_window_s, restart_backoff_s): an instance restarts
at most max_restarts times within any restart_window_s. Past that it is down (requests that
need it fail fast) and is tried again as soon as the window allows, never given up for good.
A restart that fails, and every restart after the first in the window, waits restart_backoff_s
first, doubling each time (at most MAX_BACKOFF_S), so a crash loop cannot spin; requests wait
meanwhile.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from cluster.instances import shutdown_instance
from cluster.transfers import quiet
from engine.request import RequestState

PREFILLING, TRANSFERRING, DECODING = RequestState.PREFILLING, RequestState.TRANSFERRING, RequestState.DECODING

log = logging.getLogger("disagg.health")
PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 60.0


class RestartBudget:
    """At most `max_restarts` restarts within any `window_s`; the backoff before the next one."""

    def __init__(self, max_restarts: int, window_s: float, backoff_s: float):
        self.max_restarts, self.window_s, self.backoff_s = max_restarts, window_s, backoff_s
        self.times: deque[float] = deque()

    def wait_s(self, now: float, failed_tries: int = 0) -> tuple[float, float]:
        """(seconds until the window has room for a restart, backoff for the restarts already
        in the window plus tries that failed)."""
        while self.times and now - self.times[0] >= self.window_s:
            self.times.popleft()
        room = 0.0 if len(self.times) < self.max_restarts else self.times[0] + self.window_s - now
        k = len(self.times) + failed_tries
        return room, (min(self.backoff_s * 2 ** (k - 1), MAX_BACKOFF_S) if k else 0.0)

    def record(self, now: float) -> None:
        self.times.append(now)


class HealthMonitor:
    def __init__(self, controller):
        self.c = controller
        self.restarting: set[str] = set()
        self.restarts: dict[str, int] = {}             # restarts tried per instance, all time
        self.budgets: dict[str, RestartBudget] = {}
        self.down: dict[str, float] = {}               # instance -> when it is tried again (monotonic)
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
            uses = (t.decode is inst) or (t.prefill is inst and t.state in (PREFILLING, TRANSFERRING))
            if uses and t.state in (PREFILLING, TRANSFERRING, DECODING):
                await self._abandon(t)
        c.spawn(self._restart(inst, t0))

    async def _abandon(self, t) -> None:
        """Free the survivors' part of the current attempt and start a new one. A scheduled
        transfer's task frees both sides itself once its receives have ended."""
        c, wid, attempt, state = self.c, t.wid, t.attempt, t.state
        if state is PREFILLING and not t.colocated and t.prefill.alive:
            await c.admission.cancel_prefill(t)
            # when that fails, it was scheduled meanwhile; its KVScheduled event drains it
        elif state is PREFILLING and not t.colocated:
            await c.admission.release_decode(t.decode, wid, len(t.blocks or ()))
        elif state in (PREFILLING, DECODING) and t.decode.alive:
            await quiet(t.decode.driver.cancel.remote(wid))
        await c.retry(t, "an instance it used failed", attempt)

    async def _restart(self, inst, t0: float) -> None:
        c, iid = self.c, inst.instance_id
        try:
            await shutdown_instance(inst)
        except Exception as e:  # noqa: BLE001 - it is dead already
            log.debug("shutdown of %s: %s", iid, e)
        plan = c.plan
        budget = self.budgets.setdefault(iid, RestartBudget(plan.max_restarts, plan.restart_window_s,
                                                            plan.restart_backoff_s))
        failed_tries = 0
        while True:
            room, backoff = budget.wait_s(time.monotonic(), failed_tries)
            if room > 0:            # over budget: down (requests fail fast) until the window allows
                await self._wait_down(iid, max(room, backoff), len(budget.times))
            elif backoff > 0:       # still restarting: requests wait
                await asyncio.sleep(backoff)
            budget.record(time.monotonic())
            self.restarts[iid] = self.restarts.get(iid, 0) + 1
            new = await self._replace(inst)
            if new is not None:
                break
            failed_tries += 1
        self.restarting.discard(iid)
        c.counters["instance_restarts"] += 1
        self.recovery_s.append(time.monotonic() - t0)
        log.warning("instance %s is back after %.1f s", iid, self.recovery_s[-1])
        c.spawn(c._consume(new))
        await c.admission.dispatch_pending()

    async def _replace(self, inst):
        """A fresh instance in `inst`'s place, connected to its live peers; None if it failed."""
        c, iid = self.c, inst.instance_id
        new = None
        try:
            new = await c.pools.create(inst.role, 0, instance_id=iid, phase=inst.phase)
            new.alive = False
            pool = c.pool(inst.role)
            pool[next(k for k, i in enumerate(pool) if i.instance_id == iid)] = new
            c.admission.adopt(new)
            # One restart joins at a time, so two instances restarting together still meet:
            # the second connects to the first, which is alive by then.
            async with self._join_lock:
                peers = c.pools.peers(new)
                await asyncio.gather(*[c.pools.connect(new, d) if inst.role == "prefill" else c.pools.connect(d, new)
                                       for d in peers if d.alive])
                new.alive = True
            return new
        except Exception as e:  # noqa: BLE001 - could not come back: tried again after a backoff
            log.error("restart of %s failed: %s", iid, e)
            if new is not None:
                new.alive = False
                await shutdown_instance(new)
            return None

    async def _wait_down(self, iid: str, wait_s: float, num_recent: int) -> None:
        """The instance is down for `wait_s`: requests that only it could serve fail now, with
        a clear reason, rather than wait."""
        c = self.c
        self.restarting.discard(iid)
        self.down[iid] = time.monotonic() + wait_s
        log.error("instance %s is down: %d restarts in the last %.0f s; next try in %.1f s",
                  iid, num_recent, c.plan.restart_window_s, wait_s)
        if not self.can_serve():
            for t in list(c.admission.pending):
                c.fail(t, f"instance {iid} is down ({num_recent} restarts in the last {c.plan.restart_window_s:.0f} s; "
                          f"next try in {wait_s:.0f} s) and no other instance can serve the request")
        await asyncio.sleep(wait_s)
        del self.down[iid]
        self.restarting.add(iid)

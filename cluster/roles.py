"""Role change while serving: an instance becomes prefill, decode or colocated without
reloading its weights (issue 19).

    validate ─► stop routing to it ─► drain ─► pause its loop ─► new role's worker over the
    same RankRuntime (every rank) ─► rebuild KV channels ─► move it between pools ─► adopt

Draining hands work over rather than waiting for it: a request still queued on a prefill
instance, or decoding on a decode or colocated instance, is taken back and recomputed elsewhere
by the recompute-retry path (prompt + tokens already streamed: the client's stream goes on with
no duplicated or missing token). A prefill that has started is let finish, and its KV hand-over
completes (or fails and is retried, as any transfer). Nothing is dropped.

Instance ids are stable across role changes ("prefill-0" may serve as decode): the role is
reported beside the id (health, stats, the `disagg_instance_role` gauge, `disagg roles`). A
restart after a failure keeps the id and the current role.

One change at a time (a lock); each is logged with its reason and duration, and so is each
refusal. A caller that goes away does not stop a change: it finishes.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from cluster.instances import Instance
from cluster.transfers import quiet
from engine.errors import ConfigError
from engine.request import RequestState

PREFILLING, TRANSFERRING, DECODING = RequestState.PREFILLING, RequestState.TRANSFERRING, RequestState.DECODING
ROLES = ("prefill", "decode", "colocated")
DRAIN_TIMEOUT_S = 120.0
POLL_S = 0.02

log = logging.getLogger("disagg.roles")


class RoleChangeError(ConfigError):
    """A role change that was refused or could not finish. `code` says which kind, for the
    gRPC status: not_found, invalid_argument, failed_precondition, unavailable."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


@dataclass
class RoleChange:
    """One role change, as logged and kept in `RoleChanger.history`."""
    instance_id: str
    old_role: str
    role: str
    reason: str
    seconds: float
    drain_s: float
    switch_s: float
    handed_over: int
    time: float


class RoleChanger:
    def __init__(self, controller):
        self.c = controller
        self.lock = asyncio.Lock()
        self.history: list[RoleChange] = []

    def find(self, instance_id: str) -> Instance:
        for inst in self.c.instances:
            if inst.instance_id == instance_id:
                return inst
        known = ", ".join(f"{i.instance_id} ({i.role})" for i in self.c.instances)
        raise RoleChangeError("not_found", f"unknown instance {instance_id!r}; instances: {known}")

    def check(self, inst: Instance, role: str) -> None:
        """Refuse a change that cannot be done now, naming why."""
        if role not in ROLES:
            raise RoleChangeError("invalid_argument", f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if inst.role == role:
            raise RoleChangeError("failed_precondition", f"{inst.instance_id} is already {role}")
        if not inst.alive:
            raise RoleChangeError("failed_precondition", f"{inst.instance_id} is not alive (restarting or down); "
                                  "try again once it serves")
        live = {r: sum(1 for i in self.c.pool(r) if i.alive) for r in ROLES}
        live[inst.role] -= 1
        live[role] += 1
        if not (live["colocated"] or (live["prefill"] and live["decode"])):
            missing = "decode" if live["prefill"] else "prefill"
            raise RoleChangeError("failed_precondition", (
                f"refused: {inst.instance_id} {inst.role} -> {role} would leave no live {missing} instance "
                f"({live['prefill']} prefill, {live['decode']} decode, no colocated), so nothing could serve"))
        peers = {"prefill": self.c.pool("decode"), "decode": self.c.pool("prefill")}.get(role, [])
        other = {p.phase.device for p in peers} - {inst.phase.device}
        if other:
            raise RoleChangeError("failed_precondition", f"{inst.instance_id} runs on {inst.phase.device} but its "
                                  f"{role} peers run on {other.pop()}: KV cannot move between them")

    async def change(self, instance_id: str, role: str, reason: str = "") -> RoleChange:
        if role not in ROLES:       # before waiting for the lock: bad input is answered at once
            raise RoleChangeError("invalid_argument", f"role must be one of {', '.join(ROLES)}, got {role!r}")
        # Shielded: a caller that goes away (a gRPC deadline) must not stop a change half done.
        task = asyncio.ensure_future(self._locked_change(instance_id, role, reason or "no reason given"))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())    # logged already
        return await asyncio.shield(task)

    async def _locked_change(self, instance_id: str, role: str, reason: str) -> RoleChange:
        async with self.lock:
            try:
                inst = self.find(instance_id)
                self.check(inst, role)
            except RoleChangeError as e:
                log.warning("role change %s -> %s refused (%s): %s", instance_id, role, reason, e)
                raise
            return await self._change(inst, role, reason)

    async def _change(self, inst: Instance, role: str, reason: str) -> RoleChange:
        c, old = self.c, inst.role
        t0 = time.monotonic()
        log.warning("role change %s: %s -> %s (%s): draining", inst.instance_id, old, role, reason)
        inst.draining = True
        try:
            handed_over = await self._drain(inst)
        except BaseException:
            inst.draining = False
            raise
        t1 = time.monotonic()
        try:
            await self._switch(inst, role)
        except Exception as e:  # noqa: BLE001 - its state is unknown: replace it, as after a crash
            inst.draining = False
            log.error("role change %s -> %s failed while switching: %s", inst.instance_id, role, e)
            await c.monitor.on_failure(inst, f"role change failed: {e}")
            raise RoleChangeError("unavailable", f"{inst.instance_id}: the role change failed ({e}); "
                                  f"the instance is restarted as {inst.role}") from None
        inst.draining = False
        await c.admission.dispatch_pending()
        done = RoleChange(inst.instance_id, old, role, reason, time.monotonic() - t0, t1 - t0,
                          time.monotonic() - t1, handed_over, time.time())
        self.history.append(done)
        if c.metrics:
            c.metrics.on_role_change(inst.instance_id, old, role, done.seconds)
        log.warning("role change %s: %s -> %s done in %.2f s (drain %.2f s, %d requests handed over; switch "
                    "%.2f s) — %s", inst.instance_id, old, role, done.seconds, done.drain_s, handed_over,
                    done.switch_s, reason)
        return done

    # Draining ----------------------------------------------------------------------------
    async def _drain(self, inst: Instance) -> int:
        """Until no attempt uses `inst` and its rank 0 paused with nothing left: hand work over
        (see the module docstring). Returns how many requests were handed over."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        handed = 0
        while True:
            users = [t for t in list(self.c.tracked.values()) if _uses(t, inst)]
            # Together: each hand-over is a few worker calls (cancel, reserve, add).
            handed += sum(await asyncio.gather(*[self._hand_over(t, inst) for t in users]))
            if not users:
                try:
                    busy = await inst.driver.pause.remote()
                except Exception as e:  # noqa: BLE001 - dead: the health monitor restarts it
                    raise RoleChangeError("unavailable", f"{inst.instance_id} failed while draining ({e}); "
                                          f"it restarts as {inst.role}") from None
                if not busy:
                    return handed
            else:
                busy = f"{len(users)} requests"
            if not inst.alive:
                raise RoleChangeError("unavailable", f"{inst.instance_id} failed while draining; it restarts "
                                      f"as {inst.role}")
            if time.monotonic() > deadline:
                raise RoleChangeError("unavailable", f"{inst.instance_id} could not drain within "
                                      f"{DRAIN_TIMEOUT_S:.0f} s ({busy} still there); it keeps its role")
            await asyncio.sleep(POLL_S)

    async def _hand_over(self, t, inst: Instance) -> int:
        """Move one attempt off `inst` if it can move now (1), or leave it to finish (0): a
        started prefill, a transfer in flight (it lands, then decodes, then moves)."""
        c, attempt, why = self.c, t.attempt, f"{inst.instance_id} changes role"
        if t.state is TRANSFERRING:
            return 0
        if t.state is PREFILLING and not t.colocated:
            # Queued on a prefill instance (this one, or one that sends its KV here).
            if not await c.admission.cancel_prefill(t):
                return 0                # its prefill started: let it finish and hand its KV over
        else:
            await quiet(t.decode.driver.cancel.remote(t.wid))
        await c.retry(t, why, attempt)
        return 1

    # Switching -----------------------------------------------------------------------------
    async def _switch(self, inst: Instance, role: str) -> None:
        """Rank 0 is paused and empty: every rank builds the new role's worker; then channels
        and pools follow. Under the health monitor's join lock, as a restarted instance joins:
        a peer that restarts meanwhile connects before or after, never to a half-switched one."""
        async with self.c.monitor._join_lock:
            await self._switch_locked(inst, role)

    async def _switch_locked(self, inst: Instance, role: str) -> None:
        c = self.c
        await c.pools.disconnect(inst)
        settings = {}
        if role == "colocated" and "colocated" in c.plan.phases:
            ph = c.plan.phases["colocated"]
            settings = {"schedule": ph.schedule, "chunk_tokens": ph.chunk_tokens}
        infos = await asyncio.gather(*[r.change_role.remote(role, settings) for r in inst.ranks])
        log.info("%s: workers rebuilt in %.3f s (weights and KV cache kept)", inst.instance_id,
                 max(i["seconds"] for i in infos))
        a = c.admission
        for counts in (a.prefill_tokens, a.prefill_assigned, a.decode_free):
            counts.pop(inst.instance_id, None)      # the old role's view of it
        c.pools.move(inst, role)
        a.adopt(inst)
        await c.pools.connect_all(inst)


def _uses(t, inst: Instance) -> bool:
    """The attempt of `t` holds something on `inst` (a queue slot, blocks, a running decode)."""
    if t.state not in (PREFILLING, TRANSFERRING, DECODING):
        return False
    return (t.prefill is inst and t.state is not DECODING) or t.decode is inst

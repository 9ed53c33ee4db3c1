"""Admission and routing: which route takes a request (the colocated instances, or the
prefill/decode pool: the least loaded by requests in flight per rank, ties to colocated;
engine/routing.py), which instance within it (prefill and colocated: fewest queued prompt
tokens less the expected prefix-cache hit, or with routing "load" fewest queued tokens for
prefill and fewest requests in flight per rank for colocated; decode: most free blocks after
reservations), and the queue of requests waiting for capacity (FCFS:
retries and requests that already waited go back to the front).

It owns the router's view of the instances: requests in flight per route, queued tokens and a
prefix index (PrefixRouter: the block hashes routed there, LRU at its KV capacity) per prefill
and colocated instance, free blocks per decode instance. Events refresh the last (each carries its
instance's load); the others are counted here as requests come and go. A request is charged to
its prefill (or colocated) instance's queue with the tokens it is expected to compute (prompt
less expected hit), and exactly that charge comes off when its prefill is done (colocated: its
first token) or taken back.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from cluster.instances import Instance
from cluster.tracking import Tracked
from cluster.transfers import quiet
from engine.errors import InvalidRequestError, OverloadedError
from engine.request import RequestState
from engine.routing import PD_ROUTE, PrefixRouter, pick_decode, pick_route
from model.instance import RequestSpec
from prefill_worker.worker import PrefillSpec

log = logging.getLogger("disagg.admission")


class Admission:
    def __init__(self, block_size: int, pool: Callable[[str], list[Instance]], can_serve: Callable[[], bool],
                 fail: Callable[[Tracked, str], None], drop: Callable[[Tracked], None], retry_pending_s: float = 1.0,
                 routing: str = "prefix"):
        self.block_size = block_size
        self.pool, self.can_serve, self.fail, self.drop = pool, can_serve, fail, drop
        self.retry_pending_s = retry_pending_s
        self.pending: deque[Tracked] = deque()
        self.inflight: dict[str, int] = {}            # attempts per route (a colocated instance, or the pool)
        self.prefill_tokens: dict[str, int] = {}      # queued prompt tokens per prefill instance
        self.prefill_assigned: dict[str, int] = {}    # requests given to each prefill or colocated (tie-break)
        self.decode_free: dict[str, int] = {}         # free blocks per decode instance, after reservations
        self.router = PrefixRouter(routing, block_size)
        # wid (P/D) or request id (colocated) -> (instance, tokens charged to its queue)
        self.charges: dict[str, tuple[str, int]] = {}
        self.prefix_tokens: dict[str, list[int]] = {}   # instance -> [cached, prompt] tokens prefilled

    def adopt(self, inst: Instance) -> None:
        """A new (or restarted) instance joins with an empty queue and every block free."""
        if inst.role in ("prefill", "colocated"):
            self.prefill_tokens[inst.instance_id] = 0
            self.router.adopt(inst.instance_id, inst.num_blocks)
            for wid in [w for w, (i, _) in self.charges.items() if i == inst.instance_id]:
                del self.charges[wid]       # charged to the instance this one replaces
        elif inst.role == "decode":
            self.decode_free[inst.instance_id] = inst.num_blocks
        else:
            self.router.forget(inst.instance_id)     # a former prefill's cache is no target now

    def on_load(self, inst: Instance, free_blocks: int) -> None:
        if inst.role == "decode":
            self.decode_free[inst.instance_id] = free_blocks

    def charge(self, wid: str, instance_id: str, num_tokens: int) -> None:
        self.charges[wid] = (instance_id, num_tokens)
        self.prefill_tokens[instance_id] += num_tokens

    def uncharge(self, wid: str) -> None:
        """The attempt's prefill ran or was taken back: its charge leaves the queue."""
        entry = self.charges.pop(wid, None)
        if entry is not None and entry[0] in self.prefill_tokens:
            self.prefill_tokens[entry[0]] -= entry[1]

    def prefilled(self, inst: Instance, wid: str, num_tokens: int, num_cached_tokens: int) -> None:
        """A prefill on `inst` is done (prefill: its KV is scheduled; colocated: its first token
        came, `wid` is then the request id): uncharge it and count its hit."""
        self.uncharge(wid)
        counts = self.prefix_tokens.setdefault(inst.instance_id, [0, 0])
        counts[0] += num_cached_tokens
        counts[1] += num_tokens

    def prefix_stats(self) -> dict:
        """Per prefill or colocated instance: prompt tokens prefilled, those served by its prefix cache, and
        their ratio (the hit rate)."""
        return {i: {"hit_tokens": h, "prompt_tokens": n, "hit_rate": h / n if n else 0.0}
                for i, (h, n) in self.prefix_tokens.items()}

    def forget(self, t: Tracked) -> None:
        """t holds nothing here any more (finished, failed, dropped)."""
        self.unassign(t)
        if t in self.pending:
            self.pending.remove(t)

    async def release_decode(self, d: Instance | None, wid: str, num_blocks: int) -> None:
        """Give back an attempt's decode reservation (a no-op once it started decoding)."""
        if d is not None and d.alive and num_blocks:
            if await quiet(d.driver.release.remote(wid)):
                self.decode_free[d.instance_id] += num_blocks

    async def cancel_prefill(self, t: Tracked) -> bool:
        """Take a queued attempt back from its prefill instance and give back its decode
        reservation; False when its prefill has started (the transfer then frees both)."""
        if not (t.prefill.alive and await quiet(t.prefill.driver.cancel.remote(t.wid))):
            return False
        self.uncharge(t.wid)
        await self.release_decode(t.decode, t.wid, len(t.blocks or ()))
        return True

    async def release(self, t: Tracked) -> None:
        """Free what the current attempt holds on live workers, then drop the request. Once its
        transfer is scheduled the transfer task frees both sides, when no receive can write."""
        if t.state is RequestState.QUEUED:
            self.forget(t)
        elif t.state is RequestState.PREFILLING and not t.colocated:
            if not await self.cancel_prefill(t):
                return
        elif t.state in (RequestState.PREFILLING, RequestState.DECODING):
            if t.decode.alive:
                await quiet(t.decode.driver.cancel.remote(t.wid))
        elif t.state is RequestState.TRANSFERRING:
            return
        self.drop(t)

    async def dispatch(self, t: Tracked, from_submit: bool = False, front: bool = False) -> None:
        """Hand the current attempt to the least loaded route, or park it."""
        live_c = [i for i in self.pool("colocated") if i.routable]
        live_p = [i for i in self.pool("prefill") if i.routable]
        live_d = [i for i in self.pool("decode") if i.routable]
        pd = bool(live_p and live_d)
        if not live_c and not pd:
            if self.can_serve():
                self.park(t, front)
            else:
                self.fail(t, "no prefill or decode instance can serve the request any more")
            return
        loads = [self.inflight.get(i.instance_id, 0) / i.phase.ranks_per_instance for i in live_c]
        pd_load = self.inflight.get(PD_ROUTE, 0) / sum(i.phase.ranks_per_instance for i in live_p + live_d) if pd else None
        k = pick_route(loads, pd_load)
        if k == PD_ROUTE:
            await self._dispatch_pd(t, live_p, live_d, live_c, from_submit, front)
        else:
            await self._dispatch_colocated(t, live_c, k, from_submit, front)

    async def _dispatch_colocated(self, t: Tracked, live_c: list[Instance], k: int, from_submit: bool,
                                  front: bool) -> None:
        """The whole attempt runs on one colocated instance: live_c[k] (the load rule's choice)
        with routing "load", else the one with the fewest queued prompt tokens less the expected
        prefix hit (engine.routing.PrefixRouter.pick, as for prefill instances)."""
        attempt, wid = t.attempt, t.wid
        keys = self.router.keys(t.req.prompt_token_ids)
        hit = 0
        if keys:
            ids = [i.instance_id for i in live_c]
            k, hit = self.router.pick(ids, [self.prefill_tokens.get(i, 0) for i in ids], keys,
                                      [self.prefill_assigned.get(i, 0) for i in ids])
        inst = live_c[k]
        self.prefill_assigned[inst.instance_id] = self.prefill_assigned.get(inst.instance_id, 0) + 1
        # Set before awaiting: the first tokens may arrive before the call returns.
        t.prefill, t.decode, t.blocks = None, inst, None
        t.move(RequestState.PREFILLING)
        self.assign(t, inst.instance_id)
        # Charged until its first token (or until it leaves the instance): see unassign.
        self.charge(t.request_id, inst.instance_id, t.req.num_tokens - hit)
        spec = RequestSpec(wid, t.req.prompt_token_ids, t.req.sampling, list(t.req.output_token_ids),
                           attempt=attempt)
        try:
            await inst.driver.add_request.remote(spec)
        except Exception as e:  # noqa: BLE001 - overload, a request that cannot fit, or inst died
            if t.attempt == attempt:
                self._refused(t, e, from_submit, front)
            return
        if t.attempt == attempt and t.closed:       # cancelled while the call was on its way
            await quiet(inst.driver.cancel.remote(wid))

    def _refused(self, t: Tracked, e: Exception, from_submit: bool, front: bool) -> None:
        """An instance refused the current attempt: re-raise to the submitter (nothing half
        done), fail it, or park it until there is room."""
        self.unassign(t)
        if t.state.terminal:            # cancelled (and dropped) while the call was on its way
            return
        t.move(RequestState.QUEUED)
        cause = getattr(e, "cause", e)
        if isinstance(cause, InvalidRequestError):
            if from_submit:
                raise cause from None
            self.fail(t, str(cause))
            return
        if isinstance(cause, OverloadedError) and from_submit:
            raise cause from None
        if not t.closed:
            self.park(t, front)

    def assign(self, t: Tracked, route: str) -> None:
        self.unassign(t)
        t.route = route
        self.inflight[route] = self.inflight.get(route, 0) + 1

    def unassign(self, t: Tracked) -> None:
        if t.route is not None and t.route != PD_ROUTE:
            self.uncharge(t.request_id)     # a colocated attempt's prompt left that queue
        if t.route is not None:
            self.inflight[t.route] -= 1
            t.route = None

    async def _dispatch_pd(self, t: Tracked, live_p: list[Instance], live_d: list[Instance],
                           live_c: list[Instance], from_submit: bool, front: bool) -> None:
        """Reserve decode blocks and hand the current attempt to a prefill instance; without
        free decode blocks, a colocated instance takes it (or it waits)."""
        attempt, wid = t.attempt, t.wid

        def stale() -> bool:
            return t.attempt != attempt or t.closed

        need_tokens = t.req.num_tokens + 1
        free = [self.decode_free[d.instance_id] for d in live_d]
        blocks = d = None
        while True:
            k = pick_decode(free, -(-need_tokens // self.block_size))
            if k is None:
                break
            d = live_d[k]
            blocks = await quiet(d.driver.reserve.remote(wid, need_tokens))
            if blocks:
                self.decode_free[d.instance_id] -= len(blocks)
                break
            free[k] = -1
        if blocks and (stale() or not d.alive):
            await self.release_decode(d, wid, len(blocks))
            if t.closed and t.attempt == attempt:
                self.drop(t)
            return
        if not blocks:
            if not stale() and live_c:
                k = min(range(len(live_c)), key=lambda j: self.inflight.get(live_c[j].instance_id, 0))
                await self._dispatch_colocated(t, live_c, k, from_submit, front)
            elif not stale():
                self.park(t, front)
            return
        keys = self.router.keys(t.req.prompt_token_ids)
        k, hit = self.router.pick([i.instance_id for i in live_p], [self.prefill_tokens[i.instance_id] for i in live_p],
                                  keys, [self.prefill_assigned.get(i.instance_id, 0) for i in live_p])
        p = live_p[k]
        t.prefill, t.decode, t.blocks = p, d, blocks
        t.move(RequestState.PREFILLING)
        self.assign(t, PD_ROUTE)
        t.token_seen[attempt] = asyncio.Event()
        # Count the request against p before awaiting, so concurrent dispatches see it.
        self.charge(wid, p.instance_id, t.req.num_tokens - hit)
        self.prefill_assigned[p.instance_id] = self.prefill_assigned.get(p.instance_id, 0) + 1
        spec = PrefillSpec(wid, t.req.prompt_token_ids, t.req.sampling, list(t.req.output_token_ids),
                           attempt=attempt, peer=d.instance_id, dst_block_ids=blocks)
        try:
            await p.driver.add_request.remote(spec)
        except Exception as e:  # noqa: BLE001 - overload, a request that cannot fit, or p died
            self.uncharge(wid)
            await self.release_decode(d, wid, len(blocks))
            if t.attempt == attempt:
                self._refused(t, e, from_submit, front)

    def park(self, t: Tracked, front: bool = False) -> None:
        """Wait for capacity (decode blocks, a prefill queue slot, a restarting instance).
        Retries and requests that already waited go back to the front: FCFS holds."""
        self.unassign(t)
        t.move(RequestState.QUEUED)
        if t not in self.pending:
            if front or t.attempt:
                self.pending.appendleft(t)
            else:
                self.pending.append(t)

    async def dispatch_pending(self) -> None:
        for _ in range(len(self.pending)):
            if not self.pending:
                return
            t = self.pending.popleft()
            if t.closed:
                self.drop(t)
                continue
            if t.state is not RequestState.QUEUED:
                continue        # a stale entry: another path (a retry) already dispatched this attempt
            await self.dispatch(t, front=True)
            if t.state is RequestState.QUEUED:      # still no room: it is back at the front; stop here
                return

    async def retry_loop(self) -> None:
        """A safety net: waiting requests are retried after every batch of events (each event
        carries its instance's load, and blocks freed outside a step send one of their own);
        this retries them every `retry_pending_s` besides, without asking the workers anything."""
        while True:
            await asyncio.sleep(self.retry_pending_s)
            if not self.pending:
                continue
            try:
                await self.dispatch_pending()
            except Exception:  # noqa: BLE001 - this loop must outlive any one failure
                log.exception("dispatching waiting requests failed")

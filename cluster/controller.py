"""The controller: routes requests to colocated instances or to prefill and decode instances,
moves them through the request states, streams tokens back, and recovers from failures.

    submit ─► pending ─► prefill (queued, computing) ─► transfer ─► decode ─► done
                 ▲                                         │            │
                 └──── transfer failed / instance died: recompute ◄─────┘

Routing: a request goes to the least loaded route, a colocated instance or the prefill/decode
pool, by requests in flight per rank (ties to colocated; engine/routing.py). Within the pool:
the prefill instance with the fewest queued prompt tokens, the decode instance with the most
free blocks after reservations (shared with the simulator). A request the pool cannot take now
(no free decode blocks) goes to a colocated instance when the plan has one.
Decode blocks are reserved before the prefill starts, so KV can leave layer by layer while the
prefill still runs; the prefill frees its blocks only after every decode rank confirmed
(cluster/transfers.py).

Every attempt at a request has its own worker-side id `request_id#attempt`. A retry (after a
failed transfer or a dead instance) is a new attempt that recomputes prompt + tokens already
streamed, so the client's stream continues with no duplicated or missing token, and late
messages about an abandoned attempt are recognised and ignored. Every await re-checks that the
attempt is still current. Runs on one asyncio loop: no locks.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from cluster.health import HealthMonitor
from cluster.instances import Instance, choose_transport, connect_pair, create_instance, shutdown_instance
from cluster.tracking import StreamDelta, Tracked, split_wid
from cluster.transfers import TransferCoordinator, quiet
from engine.errors import InvalidRequestError, OverloadedError, RequestFailedError
from engine.plan import Plan
from engine.request import Request
from engine.routing import PD_ROUTE, pick_decode, pick_prefill, pick_route
from model.instance import RequestSpec
from model.output_processor import OutputProcessor
from prefill_worker.worker import PrefillSpec

log = logging.getLogger("disagg.controller")
MAX_ATTEMPTS = 6


class Controller:
    def __init__(self, plan: Plan, model_config, tokenizer, metrics=None, max_pending: int = 1024,
                 actor_cls=None):
        self.plan, self.model_config = plan, model_config
        self.actor_cls = actor_cls          # None: RankActor (tests pass fault-injecting subclasses)
        self.outputs = OutputProcessor(tokenizer)
        self.metrics = metrics
        self.max_pending = max_pending
        self.colocated: list[Instance] = []
        self.prefills: list[Instance] = []
        self.decodes: list[Instance] = []
        self.inflight: dict[str, int] = {}            # attempts per route (a colocated instance, or the pool)
        self.state = "starting"
        self.tracked: dict[str, Tracked] = {}
        self.pending: deque[Tracked] = deque()
        self.prefill_tokens: dict[str, int] = {}      # queued prompt tokens per prefill instance
        self.prefill_assigned: dict[str, int] = {}    # requests given to each (tie-break)
        self.decode_free: dict[str, int] = {}
        self.epochs: dict[tuple[str, str], int] = {}
        self.transports: dict[tuple[str, str], str] = {}
        self.pair_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self.monitor = HealthMonitor(self)
        self.transfers = TransferCoordinator(self)
        self.counters = {"kv_transfer_failures": 0, "retries": 0, "channel_rebuilds": 0,
                         "instance_failures": 0, "instance_restarts": 0, "rejected": 0,
                         "requests_failed_alone": 0}

    # Lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        mc = self.model_config
        roles = [(role, i, phase) for role, phase in self.plan.phases.items() for i in range(phase.num_instances)]
        made = await asyncio.gather(
            *[create_instance(self.plan, role, i, phase, mc.num_layers, mc.num_kv_heads, self.actor_cls)
              for role, i, phase in roles],
            return_exceptions=True)
        failed = [m for m in made if isinstance(m, BaseException)]
        if failed:
            await asyncio.gather(*[shutdown_instance(m) for m in made if isinstance(m, Instance)], return_exceptions=True)
            raise failed[0]
        for inst in made:
            self.pool(inst.role).append(inst)
            self.adopt(inst)
        await asyncio.gather(*[self.connect(pi, di) for pi in self.prefills for di in self.decodes])
        for inst in self.instances:
            self.spawn(self._consume(inst))
        self.state = "serving"
        self.spawn(self.monitor.run())
        self.spawn(self._kick_pending())

    def pool(self, role: str) -> list[Instance]:
        return {"colocated": self.colocated, "prefill": self.prefills, "decode": self.decodes}[role]

    @property
    def instances(self) -> list[Instance]:
        return self.colocated + self.prefills + self.decodes

    def adopt(self, inst: Instance) -> None:
        if inst.role == "prefill":
            self.prefill_tokens[inst.instance_id] = 0
        elif inst.role == "decode":
            self.decode_free[inst.instance_id] = inst.num_blocks

    async def connect(self, pi: Instance, di: Instance) -> None:
        key = (pi.instance_id, di.instance_id)
        self.transports[key] = choose_transport(self.plan.kv_transport, pi, di)
        self.epochs[key] = self.epochs.get(key, -1) + 1
        await connect_pair(pi, di, self.epochs[key], self.transports[key])

    @property
    def max_model_len(self) -> int:
        return min(i.max_model_len for i in self.instances)

    @property
    def max_request_blocks(self) -> int:
        return min(i.num_blocks for i in self.instances)

    async def health(self) -> dict:
        """{"state": starting | serving | not_serving | draining, "roles": live instances per
        role}. Serving: every role the plan needs has a live instance (a mixed plan serves when
        its colocated pool or its prefill/decode pair is complete)."""
        roles = {r: sum(i.alive for i in self.pool(r)) for r in ("prefill", "decode", "colocated")}
        state = self.state
        if state == "serving" and not (roles["colocated"] or (roles["prefill"] and roles["decode"])):
            state = "not_serving"
        return {"state": state, "roles": roles}

    async def shutdown(self) -> None:
        self.state = "draining"
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*[shutdown_instance(i) for i in self.instances], return_exceptions=True)

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # Requests ----------------------------------------------------------------------------
    async def submit(self, req: Request) -> Tracked:
        """Accept a validated request, or raise OverloadedError / RequestFailedError /
        InvalidRequestError with nothing half done."""
        if len(self.pending) >= self.max_pending:
            self.counters["rejected"] += 1
            if self.metrics:
                self.metrics.requests.labels("rejected").inc()
            raise OverloadedError(f"{len(self.pending)} requests are waiting for capacity; try again later")
        if not self.monitor.can_serve():
            raise RequestFailedError("no prefill or decode instance (nor colocated one) is alive or restarting")
        t = Tracked(req)
        t.times["arrival"] = time.monotonic()
        self.tracked[req.request_id] = t
        self.outputs.add(req.request_id, req.prompt_token_ids, req.sampling.stop)
        if self.metrics:
            self.metrics.on_submit(t)
        # Shielded: a caller that goes away mid-dispatch must not leave it half done.
        task = asyncio.ensure_future(self._dispatch(t, from_submit=True))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            self.spawn(self._cancel_after(task, req.request_id))
            raise
        except (OverloadedError, InvalidRequestError):
            self.counters["rejected"] += 1
            self.outputs.discard(req.request_id)
            self.tracked.pop(req.request_id, None)
            if self.metrics:
                self.metrics.on_rejected(t)
            raise
        return t

    async def _cancel_after(self, task: asyncio.Task, request_id: str) -> None:
        try:
            await task
        except Exception:  # noqa: BLE001 - a refused request holds nothing
            self.tracked.pop(request_id, None)
            return
        await self.cancel(request_id)

    async def stream(self, t: Tracked):
        """The request's StreamDelta items until the last one."""
        while True:
            item = await t.out.get()
            yield item
            if item.finish_reason is not None:
                return

    async def cancel(self, request_id: str) -> None:
        t = self.tracked.get(request_id)
        if t is None or t.closed:
            return
        t.cancel_requested = True
        self.close(t, "cancelled")
        await self.release_attempt(t, drop=True)

    async def release_attempt(self, t: Tracked, drop: bool) -> None:
        """Free what the current attempt holds on live workers. Once its transfer is scheduled
        the transfer task frees both sides, when no receive can write any more."""
        if t.phase == "pending":
            if t in self.pending:
                self.pending.remove(t)
        elif t.phase == "prefill":
            if t.prefill.alive and await quiet(t.prefill.driver.cancel.remote(t.wid)):
                self.prefill_tokens[t.prefill.instance_id] -= t.req.num_tokens
                await self.release_decode(t.decode, t.wid, len(t.blocks or ()))
            else:
                return
        elif t.phase == "decode":
            if t.decode.alive:
                await quiet(t.decode.driver.cancel.remote(t.wid))
        elif t.phase == "transfer":
            return
        if drop:
            self.drop(t)

    async def release_decode(self, d: Instance | None, wid: str, num_blocks: int) -> None:
        """Give back an attempt's decode reservation (a no-op once it started decoding)."""
        if d is not None and d.alive and num_blocks:
            if await quiet(d.driver.release.remote(wid)):
                self.decode_free[d.instance_id] += num_blocks

    # Routing -----------------------------------------------------------------------------
    async def _dispatch(self, t: Tracked, from_submit: bool = False, front: bool = False) -> None:
        """Hand the current attempt to the least loaded route, or park it."""
        live_c = [i for i in self.colocated if i.alive]
        live_p = [i for i in self.prefills if i.alive]
        live_d = [i for i in self.decodes if i.alive]
        pd = bool(live_p and live_d)
        if not live_c and not pd:
            if self.monitor.can_serve():
                self._park(t, front)
            else:
                self.fail(t, "no prefill or decode instance can serve the request any more")
            return
        loads = [self.inflight.get(i.instance_id, 0) / i.phase.ranks_per_instance for i in live_c]
        pd_load = self.inflight.get(PD_ROUTE, 0) / sum(i.phase.ranks_per_instance for i in live_p + live_d) if pd else None
        k = pick_route(loads, pd_load)
        if k == PD_ROUTE:
            await self._dispatch_pd(t, live_p, live_d, live_c, from_submit, front)
        else:
            await self._dispatch_colocated(t, live_c[k], from_submit, front)

    async def _dispatch_colocated(self, t: Tracked, inst: Instance, from_submit: bool, front: bool) -> None:
        """The whole attempt runs on one colocated instance."""
        attempt, wid = t.attempt, t.wid
        # Set before awaiting: the first tokens may arrive before the call returns.
        t.prefill, t.decode, t.blocks, t.phase = None, inst, None, "decode"
        self._assign(t, inst.instance_id)
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
        self._unassign(t)
        t.phase = "pending"
        cause = getattr(e, "cause", e)
        if isinstance(cause, InvalidRequestError):
            if from_submit:
                raise cause from None
            self.fail(t, str(cause))
            return
        if isinstance(cause, OverloadedError) and from_submit:
            raise cause from None
        if not t.closed:
            self._park(t, front)

    def _assign(self, t: Tracked, route: str) -> None:
        self._unassign(t)
        t.route = route
        self.inflight[route] = self.inflight.get(route, 0) + 1

    def _unassign(self, t: Tracked) -> None:
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
            k = pick_decode(free, -(-need_tokens // self.plan.block_size))
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
                await self._dispatch_colocated(t, min(live_c, key=lambda i: self.inflight.get(i.instance_id, 0)),
                                               from_submit, front)
            elif not stale():
                self._park(t, front)
            return
        p = live_p[pick_prefill([self.prefill_tokens[i.instance_id] for i in live_p],
                                [self.prefill_assigned.get(i.instance_id, 0) for i in live_p])]
        t.prefill, t.decode, t.blocks, t.phase = p, d, blocks, "prefill"
        self._assign(t, PD_ROUTE)
        t.token_seen[attempt] = asyncio.Event()
        # Count the request against p before awaiting, so concurrent dispatches see it.
        self.prefill_tokens[p.instance_id] += t.req.num_tokens
        self.prefill_assigned[p.instance_id] = self.prefill_assigned.get(p.instance_id, 0) + 1
        spec = PrefillSpec(wid, t.req.prompt_token_ids, t.req.sampling, list(t.req.output_token_ids),
                           attempt=attempt, peer=d.instance_id, dst_block_ids=blocks)
        try:
            await p.driver.add_request.remote(spec)
        except Exception as e:  # noqa: BLE001 - overload, a request that cannot fit, or p died
            self.prefill_tokens[p.instance_id] -= t.req.num_tokens
            await self.release_decode(d, wid, len(blocks))
            if t.attempt == attempt:
                self._refused(t, e, from_submit, front)

    def _park(self, t: Tracked, front: bool = False) -> None:
        """Wait for capacity (decode blocks, a prefill queue slot, a restarting instance).
        Retries and requests that already waited go back to the front: FCFS holds."""
        self._unassign(t)
        t.phase = "pending"
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
            await self._dispatch(t, front=True)
            if t.phase == "pending":      # still no room: it is back at the front; stop here
                return

    async def _kick_pending(self) -> None:
        """While requests wait, re-read the decode instances' free blocks and retry. Events
        refresh the estimate while instances are busy; this covers idle ones whose blocks were
        freed outside a step (a cancel, a released reservation)."""
        while True:
            await asyncio.sleep(0.25)
            if not self.pending:
                continue
            try:
                live = [d for d in self.decodes if d.alive]
                free = await asyncio.gather(*[quiet(d.driver.free_blocks.remote()) for d in live])
                for d, n in zip(live, free):
                    if n is not None:
                        self.decode_free[d.instance_id] = n
                await self.dispatch_pending()
            except Exception:  # noqa: BLE001 - this loop must outlive any one failure
                log.exception("dispatching waiting requests failed")

    # Events from the workers -----------------------------------------------------------
    async def _consume(self, inst: Instance) -> None:
        try:
            async for ref in inst.driver.events.remote():
                for ev in await ref:
                    self._on_event(inst, ev)
                if self.pending:
                    await self.dispatch_pending()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the instance is gone
            if inst.alive:
                log.warning("event stream of %s ended: %s", inst.instance_id, e)
                self.spawn(self.monitor.on_failure(inst, f"event stream ended: {e}"))

    def _current(self, wid: str) -> Tracked | None:
        rid, attempt = split_wid(wid)
        t = self.tracked.get(rid)
        return t if t is not None and t.attempt == attempt else None

    def _on_event(self, inst: Instance, ev: dict) -> None:
        if not any(inst is i for i in self.pool(inst.role)):
            return                                  # from an instance that was replaced
        kind = ev["type"]
        if kind == "scheduled":
            t = self._current(ev["request_id"])
            if t is not None and t.prefill is inst and t.phase == "prefill":
                t.phase = "transfer"
                self.prefill_tokens[inst.instance_id] -= ev["num_tokens"]
                t.num_cached_tokens = max(t.num_cached_tokens, ev["num_cached_tokens"])
                self.spawn(self.transfers.transfer(t, t.attempt, ev))
            else:
                self.spawn(self.transfers.drain(inst, ev))
        elif kind == "token":
            self._on_prefill_token(ev)
        elif kind == "tokens":
            if inst.role == "decode":
                self.decode_free[inst.instance_id] = ev["free_blocks"]
            if self.metrics:
                self.metrics.on_decode_step(inst.instance_id, ev)
            for wid, toks in ev["tokens"].items():
                t = self._current(wid)
                if t is not None and t.phase == "decode" and t.decode is inst:
                    self._deliver(t, toks, ev["finished"].get(wid), ev.get("logprobs", {}).get(wid))
            for wid in ev["finished"]:
                t = self._current(wid)
                if t is not None and t.phase == "decode" and t.decode is inst:
                    self.drop(t)
        elif kind == "request_failed":
            # A step failed on this request alone (model/step_isolation.py); the instance has
            # dropped it. After a prefill its transfer task (which drains the junk KV) sees the
            # request closed and frees both sides.
            t = self._current(ev["request_id"])
            if t is not None:
                self._fail_alone(t, ev["message"])
                if t.attempt in t.token_seen:
                    t.token_seen[t.attempt].set()
        elif kind == "error":
            log.error("%s: %s", inst.instance_id, ev["message"])
            self.spawn(self.monitor.on_failure(inst, ev["message"]))

    def _on_prefill_token(self, ev: dict) -> None:
        t = self._current(ev["request_id"])
        if t is None:
            return
        if "first_token" not in t.times:
            t.durations["prefill_queue_s"] = ev["prefill_queue_s"]
            t.durations["prefill_compute_s"] = ev["prefill_compute_s"]
        t.times["prefill_end"] = time.monotonic()
        if not t.closed:
            lp = ev.get("logprobs")
            self._deliver(t, [ev["token_id"]], ev["finish_reason"], [lp] if lp else None)
        t.token_seen[t.attempt].set()

    def _deliver(self, t: Tracked, tokens: list[int], finish_reason: str | None, logprobs=None) -> None:
        if t.closed:
            return
        now = time.monotonic()
        t.req.output_token_ids.extend(tokens)
        if finish_reason is None and t.req.num_tokens >= self.max_model_len:
            # The smallest instance's context: a retry must fit anywhere it may be sent.
            finish_reason = "length"
            self.spawn(self.release_attempt(t, drop=True))
        first = "first_token" not in t.times
        t.times.setdefault("first_token", now)
        t.times["last_token"] = now
        if self.metrics:
            self.metrics.on_tokens(t, len(tokens), first, now)
        delta = self.outputs.process(t.request_id, tokens, finish_reason)
        if delta.finish_reason is not None and finish_reason is None:     # a stop string matched
            self.spawn(self.release_attempt(t, drop=True))
        t.out.put_nowait(StreamDelta(t.request_id, tokens, delta.text, logprobs=logprobs))
        if delta.finish_reason is not None:
            self.close(t, delta.finish_reason)

    def _fail_alone(self, t: Tracked, why: str) -> None:
        """A worker isolated this request as the cause of a failed step: it fails (the client
        gets INTERNAL with `why`); the instance and every other request go on."""
        self.counters["requests_failed_alone"] += 1
        self.fail(t, why)

    def close(self, t: Tracked, reason: str, error: str | None = None) -> None:
        """End the caller's stream (the workers may free their part a little later)."""
        if t.closed:
            return
        t.finish_reason = reason
        t.times["finish"] = time.monotonic()
        self.outputs.discard(t.request_id)
        usage = {"prompt_tokens": t.req.num_prompt_tokens, "completion_tokens": t.req.num_output_tokens,
                 "cached_tokens": t.num_cached_tokens}
        if self.metrics:
            self.metrics.on_finish(t, reason)
        t.out.put_nowait(StreamDelta(t.request_id, [], "", reason, usage, t.timings(), error))

    def fail(self, t: Tracked, message: str) -> None:
        log.error("request %s failed: %s", t.request_id, message)
        self.close(t, "error", message)
        if t in self.pending:
            self.pending.remove(t)
        self.drop(t)

    def drop(self, t: Tracked) -> None:
        self._unassign(t)
        t.phase = "done"
        if self.tracked.get(t.request_id) is t:
            del self.tracked[t.request_id]

    async def retry(self, t: Tracked, why: str, failed_attempt: int) -> None:
        """A new attempt for `t`: recompute prompt + tokens streamed so far elsewhere. Only
        once per failed attempt, whoever notices the failure first."""
        if t.attempt != failed_attempt:
            return
        if t.closed:
            self.drop(t)
            return
        t.attempt += 1
        self._unassign(t)
        self.counters["retries"] += 1
        if t.attempt >= MAX_ATTEMPTS:
            self.fail(t, f"gave up after {t.attempt} attempts: {why}")
            return
        t.phase = "pending"
        await self._dispatch(t, front=True)

    def block_bytes(self) -> int:
        dtype = self.plan.dtype
        if dtype == "auto":
            dtype = self.model_config.dtype if self.plan.prefill.device == "cuda" else "float32"
        return self.plan.block_size * self.model_config.kv_bytes_per_token(dtype)

    # Stats -----------------------------------------------------------------------------------
    async def stats(self) -> dict:
        insts = self.instances
        per = await asyncio.gather(*[asyncio.wait_for(i.driver.stats.remote(), 10) for i in insts],
                                   return_exceptions=True)
        workers = {i.instance_id: (s if not isinstance(s, BaseException) else {"error": str(s)})
                   for i, s in zip(insts, per)}
        for i in insts:
            workers[i.instance_id]["alive"] = i.alive
        phases: dict[str, int] = {}
        for t in self.tracked.values():
            phases[t.phase] = phases.get(t.phase, 0) + 1
        return {"workers": workers, "num_tracked": len(self.tracked), "num_pending": len(self.pending),
                "requests_by_phase": phases, "counters": dict(self.counters),
                "transports": {f"{a}->{b}": k for (a, b), k in self.transports.items()}}


def describe(t: Tracked) -> str:
    """One line about a tracked request, for logs and failing tests."""
    where = f"{t.prefill.instance_id if t.prefill else '-'}->{t.decode.instance_id if t.decode else '-'}"
    return (f"{t.request_id} attempt={t.attempt} phase={t.phase} {where} tokens={t.req.num_output_tokens}"
            f" closed={t.closed}")

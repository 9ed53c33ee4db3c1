"""The controller: routes requests to colocated instances or to prefill and decode instances,
moves them through the request states, streams tokens back, and recovers from failures.

    submit ─► QUEUED ─► PREFILLING ─► TRANSFERRING ─► DECODING ─► FINISHED | CANCELLED | FAILED
                ▲        (colocated: PREFILLING ─► DECODING)   │
                └──── transfer failed / instance died: recompute ◄─┘
    (engine/request.py's state machine, on each request's controller copy)

It is split by concern, each part owning its state: admission and routing
(cluster/admission.py: the waiting queue, the router's view of every instance), KV hand-over
(cluster/transfers.py), streaming to clients (cluster/streams.py), instance health
(cluster/health.py) and the instances with their KV channels (cluster/instances.py `Pools`).
This file keeps the requests (`tracked`) and the events that arrive from the instances
(engine/events.py; each carries its instance's load).

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

from cluster.admission import Admission
from cluster.health import HealthMonitor
from cluster.instances import Instance, Pools
from cluster.roles import RoleChanger
from cluster.streams import Streams
from cluster.tracking import Tracked, split_wid
from cluster.transfers import TransferCoordinator
from engine.errors import InvalidRequestError, OverloadedError, RequestFailedError
from engine.events import FirstToken, KVScheduled, RequestFailed, StepFailed, StepTokens, WorkerEvent
from engine.plan import Plan
from engine.request import Request, RequestState

QUEUED, PREFILLING, TRANSFERRING, DECODING = (RequestState.QUEUED, RequestState.PREFILLING,
                                              RequestState.TRANSFERRING, RequestState.DECODING)
FINISHED, CANCELLED, FAILED = RequestState.FINISHED, RequestState.CANCELLED, RequestState.FAILED

log = logging.getLogger("disagg.controller")
MAX_ATTEMPTS = 6


class Controller:
    def __init__(self, plan: Plan, model_config, tokenizer, metrics=None, max_pending: int = 1024,
                 actor_cls: type | None = None):
        self.plan, self.model_config = plan, model_config
        self.metrics = metrics
        self.max_pending = max_pending
        self.pools = Pools(plan, model_config, actor_cls)
        self.state = "starting"
        self.tracked: dict[str, Tracked] = {}
        self.streams = Streams(tokenizer, metrics, lambda: self.max_model_len)
        self.admission = Admission(plan.block_size, self.pool, lambda: self.monitor.can_serve(), self.fail, self.drop,
                                   routing=plan.routing)
        self._tasks: set[asyncio.Task] = set()
        self.observers: list = []           # called with each accepted request (cluster/replanner.py)
        self.replanner = None               # set by cluster.replanner.start
        self.monitor = HealthMonitor(self)
        self.transfers = TransferCoordinator(self)
        self.roles = RoleChanger(self)
        self.counters = {"kv_transfer_failures": 0, "retries": 0, "channel_rebuilds": 0,
                         "instance_failures": 0, "instance_restarts": 0, "rejected": 0,
                         "requests_failed_alone": 0}

    # Lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await self.pools.start()
        for inst in self.instances:
            self.admission.adopt(inst)
            self.spawn(self._consume(inst))
        self.state = "serving"
        self.spawn(self.monitor.run())
        self.spawn(self.admission.retry_loop())

    def pool(self, role: str) -> list[Instance]:
        return self.pools.of(role)

    @property
    def colocated(self) -> list[Instance]:
        return self.pools.of("colocated")

    @property
    def prefills(self) -> list[Instance]:
        return self.pools.of("prefill")

    @property
    def decodes(self) -> list[Instance]:
        return self.pools.of("decode")

    @property
    def instances(self) -> list[Instance]:
        return self.pools.all

    @property
    def max_model_len(self) -> int:
        return min(i.max_model_len for i in self.instances)

    @property
    def max_request_blocks(self) -> int:
        return min(i.num_blocks for i in self.instances)

    async def health(self) -> dict:
        """{"state": starting | serving | not_serving | draining, "roles": live instances per
        role, "instances": each instance's current role}. Serving: every role the plan needs
        has a live instance (a mixed plan serves when its colocated pool or its prefill/decode
        pair is complete)."""
        roles = {r: sum(i.alive for i in self.pool(r)) for r in ("prefill", "decode", "colocated")}
        state = self.state
        if state == "serving" and not (roles["colocated"] or (roles["prefill"] and roles["decode"])):
            state = "not_serving"
        return {"state": state, "roles": roles, "instances": {i.instance_id: i.role for i in self.instances}}

    async def change_role(self, instance_id: str, role: str, reason: str = "") -> None:
        """Make instance `instance_id` serve as `role` ("prefill", "decode" or "colocated")
        without reloading its weights: stop routing to it, drain it (its requests finish or
        are handed over, none lost), switch every rank's worker, rebuild its KV channels and
        route to it again. The id stays; the role is reported beside it. One change at a time.
        Raises ConfigError (cluster/roles.py RoleChangeError) naming why a change is refused:
        unknown instance or role, the role it has already, an instance not alive, or a change
        that would leave nothing able to serve. See cluster/roles.py."""
        await self.roles.change(instance_id, role, reason)

    async def shutdown(self) -> None:
        self.state = "draining"
        for t in list(self._tasks):
            t.cancel()
        await self.pools.shutdown()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # Requests ----------------------------------------------------------------------------
    async def submit(self, req: Request) -> Tracked:
        """Accept a validated request, or raise OverloadedError / RequestFailedError /
        InvalidRequestError with nothing half done."""
        if len(self.admission.pending) >= self.max_pending:
            self.counters["rejected"] += 1
            if self.metrics:
                self.metrics.requests.labels("rejected").inc()
            raise OverloadedError(f"{len(self.admission.pending)} requests are waiting for capacity; try again later")
        if not self.monitor.can_serve():
            raise RequestFailedError("no prefill or decode instance (nor colocated one) is alive or restarting")
        t = Tracked(req)
        self.tracked[req.request_id] = t
        self.streams.open(t)
        for observe in self.observers:
            observe(t)
        # Shielded: a caller that goes away mid-dispatch must not leave it half done.
        task = asyncio.ensure_future(self.admission.dispatch(t, from_submit=True))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            self.spawn(self._cancel_after(task, req.request_id))
            raise
        except (OverloadedError, InvalidRequestError):
            self.counters["rejected"] += 1
            self.tracked.pop(req.request_id, None)
            self.streams.refused(t)
            raise
        return t

    async def _cancel_after(self, task: asyncio.Task, request_id: str) -> None:
        try:
            await task
        except Exception:  # noqa: BLE001 - a refused request holds nothing
            self.tracked.pop(request_id, None)
            return
        await self.cancel(request_id)

    def stream(self, t: Tracked):
        """The request's StreamDelta items until the last one."""
        return self.streams.items(t)

    async def cancel(self, request_id: str) -> None:
        t = self.tracked.get(request_id)
        if t is None or t.closed:
            return
        t.cancel_requested = True
        self.streams.close(t, "cancelled")
        await self.admission.release(t)

    # Events from the workers -----------------------------------------------------------
    async def _consume(self, inst: Instance) -> None:
        try:
            async for ref in inst.driver.events.remote():
                for ev in await ref:
                    self._on_event(inst, ev)
                if self.admission.pending:
                    await self.admission.dispatch_pending()
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

    def _on_event(self, inst: Instance, ev: WorkerEvent) -> None:
        if not any(inst is i for i in self.pool(inst.role)):
            return                                  # from an instance that was replaced
        if ev.load is not None:
            self.admission.on_load(inst, ev.load.free_blocks)
        if isinstance(ev, KVScheduled):
            t = self._current(ev.request_id)
            if t is not None and t.prefill is inst and t.state is PREFILLING:
                t.move(TRANSFERRING)
                self.admission.prefilled(inst, ev.request_id, ev.num_tokens, ev.num_cached_tokens)
                if self.metrics:
                    self.metrics.on_prefilled(inst.instance_id, ev.num_tokens, ev.num_cached_tokens)
                t.num_cached_tokens = max(t.num_cached_tokens, ev.num_cached_tokens)
                self.spawn(self.transfers.transfer(t, t.attempt, ev))
            else:
                self.spawn(self.transfers.drain(inst, ev))
        elif isinstance(ev, FirstToken):
            self._on_prefill_token(ev)
        elif isinstance(ev, StepTokens):
            self._on_step_tokens(inst, ev)
        elif isinstance(ev, RequestFailed):
            # A step failed on this request alone (model/step_isolation.py); the instance has
            # dropped it and goes on. After a prefill its transfer task (which drains the junk
            # KV) sees the request closed and frees both sides.
            t = self._current(ev.request_id)
            if t is not None:
                self._fail_alone(t, ev.message)
                if t.attempt in t.token_seen:
                    t.token_seen[t.attempt].set()
        elif isinstance(ev, StepFailed):
            log.error("%s: %s", inst.instance_id, ev.message)
            self.spawn(self.monitor.on_failure(inst, ev.message))

    def _on_step_tokens(self, inst: Instance, ev: StepTokens) -> None:
        if self.metrics:
            self.metrics.on_decode_step(inst.instance_id, ev.batch_size)
        for wid, toks in ev.tokens.items():
            t = self._current(wid)
            if t is not None and t.decode is inst and (t.state is DECODING or (t.colocated and t.state is PREFILLING)):
                if t.state is PREFILLING:       # a colocated prefill ended: its queue charge and hit
                    cached = ev.num_cached_tokens.get(wid, 0)
                    self.admission.prefilled(inst, t.request_id, t.req.num_tokens, cached)
                    if self.metrics:
                        self.metrics.on_prefilled(inst.instance_id, t.req.num_tokens, cached)
                    t.num_cached_tokens = max(t.num_cached_tokens, cached)
                t.move(DECODING)
                self.deliver(t, toks, ev.finished.get(wid), ev.logprobs.get(wid))
        for wid in ev.finished:
            t = self._current(wid)
            if t is not None and t.state is DECODING and t.decode is inst:
                self.drop(t)

    def _on_prefill_token(self, ev: FirstToken) -> None:
        t = self._current(ev.request_id)
        if t is None:
            return
        if "first_token" not in t.times:
            t.durations["prefill_queue_s"] = ev.prefill_queue_s
            t.durations["prefill_compute_s"] = ev.prefill_compute_s
        t.times["prefill_end"] = time.monotonic()
        if not t.closed:
            self.deliver(t, [ev.token_id], ev.finish_reason, [ev.logprobs] if ev.logprobs else None)
        t.token_seen[t.attempt].set()

    def deliver(self, t: Tracked, tokens: list[int], finish_reason: str | None, logprobs=None) -> None:
        if self.streams.deliver(t, tokens, finish_reason, logprobs):
            self.spawn(self.admission.release(t))     # ended here: free the workers' part

    def _fail_alone(self, t: Tracked, why: str) -> None:
        """A worker isolated this request as the cause of a failed step: it fails (the client
        gets INTERNAL with `why`); the instance and every other request go on."""
        self.counters["requests_failed_alone"] += 1
        self.fail(t, why)

    def fail(self, t: Tracked, message: str) -> None:
        log.error("request %s failed: %s", t.request_id, message)
        self.streams.close(t, "error", message)
        self.drop(t)

    def drop(self, t: Tracked) -> None:
        self.admission.forget(t)
        if not t.state.terminal:
            reason = t.finish_reason or "error"
            t.move(CANCELLED if reason == "cancelled" else FAILED if reason == "error" else FINISHED)
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
        self.admission.unassign(t)
        self.counters["retries"] += 1
        if t.attempt >= MAX_ATTEMPTS:
            self.fail(t, f"gave up after {t.attempt} attempts: {why}")
            return
        t.move(QUEUED)
        if t in self.admission.pending:       # never dispatched twice: from here and from the queue
            self.admission.pending.remove(t)
        await self.admission.dispatch(t, front=True)

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
            workers[i.instance_id]["role"] = i.role         # the controller's view, also for a dead one
            workers[i.instance_id]["draining"] = i.draining
        phases: dict[str, int] = {}
        for t in self.tracked.values():
            phases[t.state.value] = phases.get(t.state.value, 0) + 1
        return {"workers": workers, "num_tracked": len(self.tracked), "num_pending": len(self.admission.pending),
                "requests_by_state": phases, "counters": dict(self.counters),
                "replan": self.replanner.summary() if self.replanner else None,
                "routing": self.plan.routing, "prefix_cache": self.admission.prefix_stats(),
                "transports": {f"{a}->{b}": k for (a, b), k in self.pools.transports.items()},
                "role_changes": [dict(vars(r)) for r in self.roles.history]}


def describe(t: Tracked) -> str:
    """One line about a tracked request, for logs and failing tests."""
    where = f"{t.prefill.instance_id if t.prefill else '-'}->{t.decode.instance_id if t.decode else '-'}"
    return (f"{t.request_id} attempt={t.attempt} state={t.state.value} {where} tokens={t.req.num_output_tokens}"
            f" closed={t.closed}")

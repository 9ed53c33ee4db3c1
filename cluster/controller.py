"""The controller: routes requests to prefill and decode instances, moves them through the
request states, coordinates KV transfers, and streams tokens back.

    submit ─► pending ─► prefill (queued, then computing) ─► transfer ─► decode ─► done
                 ▲                                              │
                 └──────── transfer failed: recompute ◄─────────┘

Routing: the prefill instance with the fewest queued prompt tokens, the decode instance with
the most free blocks after reservations (engine/routing.py, shared with the simulator).
Decode blocks are reserved before the prefill starts, so the KV can leave layer by layer while
the prefill still runs. The prefill frees its blocks only after every decode rank confirmed.
Runs on one asyncio loop: no locks.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from cluster.instances import Instance, choose_transport, connect_pair, create_instance, shutdown_instance
from cluster.tracking import StreamDelta, Tracked
from engine.errors import OverloadedError, RequestFailedError
from engine.plan import Plan
from engine.request import Request
from engine.routing import pick_decode, pick_prefill
from model.output_processor import OutputProcessor
from prefill_worker.worker import PrefillSpec

log = logging.getLogger("disagg.controller")
MAX_ATTEMPTS = 4


class Controller:
    def __init__(self, plan: Plan, model_config, tokenizer, metrics=None, max_pending: int = 1024):
        self.plan, self.model_config = plan, model_config
        self.outputs = OutputProcessor(tokenizer)
        self.metrics = metrics
        self.max_pending = max_pending
        self.prefills: list[Instance] = []
        self.decodes: list[Instance] = []
        self.tracked: dict[str, Tracked] = {}
        self.pending: deque[Tracked] = deque()
        self.prefill_tokens: dict[str, int] = {}      # queued prompt tokens per prefill instance
        self.decode_free: dict[str, int] = {}         # free blocks per decode instance, last known
        self.epochs: dict[tuple[str, str], int] = {}
        self.transports: dict[tuple[str, str], str] = {}
        self._pair_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self.counters = {"kv_transfer_failures": 0, "retries": 0, "channel_rebuilds": 0}

    # Lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        mc = self.model_config
        p, d = self.plan.prefill, self.plan.decode
        made = await asyncio.gather(
            *[create_instance(self.plan, "prefill", i, p, mc.num_layers, mc.num_kv_heads) for i in range(p.num_instances)],
            *[create_instance(self.plan, "decode", i, d, mc.num_layers, mc.num_kv_heads) for i in range(d.num_instances)])
        self.prefills, self.decodes = list(made[:p.num_instances]), list(made[p.num_instances:])
        for inst in self.prefills:
            self.prefill_tokens[inst.instance_id] = 0
        for inst in self.decodes:
            self.decode_free[inst.instance_id] = inst.num_blocks
        for pi in self.prefills:
            for di in self.decodes:
                key = (pi.instance_id, di.instance_id)
                self.transports[key] = choose_transport(self.plan.kv_transport, pi, di)
                self.epochs[key] = 0
                self._pair_locks[key] = asyncio.Lock()
        await asyncio.gather(*[connect_pair(pi, di, 0, self.transports[(pi.instance_id, di.instance_id)])
                               for pi in self.prefills for di in self.decodes])
        for inst in self.prefills + self.decodes:
            self._spawn(self._consume(inst))

    @property
    def max_model_len(self) -> int:
        return min(i.max_model_len for i in self.prefills + self.decodes)

    @property
    def max_request_blocks(self) -> int:
        return min(i.num_blocks for i in self.prefills + self.decodes)

    async def shutdown(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*[shutdown_instance(i) for i in self.prefills + self.decodes], return_exceptions=True)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # Requests ----------------------------------------------------------------------------
    async def submit(self, req: Request) -> Tracked:
        """Accept a validated request, or raise OverloadedError (nothing half done)."""
        if len(self.pending) >= self.max_pending:
            raise OverloadedError(f"{len(self.pending)} requests are waiting for capacity; try again later")
        t = Tracked(req)
        t.times["arrival"] = time.monotonic()
        self.tracked[req.request_id] = t
        self.outputs.add(req.request_id, req.prompt_token_ids, req.sampling.stop)
        if self.metrics:
            self.metrics.on_submit(t)
        try:
            await self._dispatch(t)
        except OverloadedError:
            self._drop(t)
            raise
        return t

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
        self._close(t, "cancelled")
        await self._cancel_on_workers(t)

    async def _cancel_on_workers(self, t: Tracked) -> None:
        if t.phase == "pending":
            if t in self.pending:
                self.pending.remove(t)
            self._drop(t)
        elif t.phase == "prefill":
            if await t.prefill.driver.cancel.remote(t.request_id):
                self.prefill_tokens[t.prefill.instance_id] -= t.req.num_tokens
                await t.decode.driver.release.remote(t.request_id)
                self._drop(t)
            # else: already scheduled; the transfer task frees both sides when it ends
        elif t.phase == "decode":
            await t.decode.driver.cancel.remote(t.request_id)
            self._drop(t)
        # phase "transfer": _transfer releases both sides when the transfer ends

    # Routing -----------------------------------------------------------------------------
    async def _dispatch(self, t: Tracked) -> None:
        live_p = [i for i in self.prefills if i.alive]
        live_d = [i for i in self.decodes if i.alive]
        if not live_p or not live_d:
            self._fail(t, "no live prefill or decode instance can serve the request")
            return
        need_tokens = t.req.num_tokens + 1
        free = [self.decode_free[d.instance_id] for d in live_d]
        blocks = None
        while True:
            k = pick_decode(free, -(-need_tokens // self.plan.block_size))
            if k is None:
                break
            d = live_d[k]
            blocks = await d.driver.reserve.remote(t.request_id, need_tokens)
            if blocks is not None:
                self.decode_free[d.instance_id] -= len(blocks)
                break
            free[k] = -1
        if blocks is None:
            t.phase = "pending"
            self.pending.append(t)
            return
        p = live_p[pick_prefill([self.prefill_tokens[i.instance_id] for i in live_p])]
        t.prefill, t.decode, t.blocks, t.phase = p, d, blocks, "prefill"
        t.token_seen[t.attempt] = asyncio.Event()
        spec = PrefillSpec(t.request_id, t.req.prompt_token_ids, t.req.sampling, d.instance_id, blocks,
                           list(t.req.output_token_ids), attempt=t.attempt)
        try:
            await p.driver.add_request.remote(spec)
        except Exception as e:
            await d.driver.release.remote(t.request_id)
            self.decode_free[d.instance_id] += len(blocks)
            cause = getattr(e, "cause", e)
            if isinstance(cause, OverloadedError):
                raise cause from None
            raise
        self.prefill_tokens[p.instance_id] += t.req.num_tokens

    async def _dispatch_pending(self) -> None:
        for _ in range(len(self.pending)):
            t = self.pending.popleft()
            if t.closed:
                self._drop(t)
                continue
            await self._dispatch(t)
            if t.phase == "pending":      # still no room: keep FIFO order, stop here
                self.pending.remove(t)
                self.pending.appendleft(t)
                return

    # Events from the workers -----------------------------------------------------------
    async def _consume(self, inst: Instance) -> None:
        try:
            async for ref in inst.driver.events.remote():
                for ev in await ref:
                    self._on_event(inst, ev)
                if self.pending:
                    await self._dispatch_pending()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the instance is gone
            log.warning("event stream of %s ended: %s", inst.instance_id, e)

    def _on_event(self, inst: Instance, ev: dict) -> None:
        kind = ev["type"]
        if kind == "scheduled":
            t = self.tracked.get(ev["request_id"])
            if t is not None and t.prefill is inst and ev.get("attempt", 0) == t.attempt:
                t.phase = "transfer"
                self.prefill_tokens[inst.instance_id] -= ev["num_tokens"]
                t.num_cached_tokens = max(t.num_cached_tokens, ev["num_cached_tokens"])
                self._spawn(self._transfer(t, t.attempt, ev))
        elif kind == "token":
            self._on_prefill_token(ev)
        elif kind == "tokens":
            self.decode_free[inst.instance_id] = ev["free_blocks"]
            if self.metrics:
                self.metrics.on_decode_step(inst.instance_id, ev)
            for rid, toks in ev["tokens"].items():
                t = self.tracked.get(rid)
                if t is not None and t.phase == "decode":
                    self._deliver(t, toks, ev["finished"].get(rid))
            for rid in ev["finished"]:
                t = self.tracked.get(rid)
                if t is not None and t.phase == "decode":
                    self._drop(t)
        elif kind == "error":
            log.error("%s: %s", inst.instance_id, ev["message"])

    def _on_prefill_token(self, ev: dict) -> None:
        t = self.tracked.get(ev["request_id"])
        if t is None or ev.get("attempt", 0) != t.attempt:
            return
        if "first_token" not in t.times:
            t.durations["prefill_queue_s"] = ev["prefill_queue_s"]
            t.durations["prefill_compute_s"] = ev["prefill_compute_s"]
        t.times["prefill_end"] = time.monotonic()
        if not t.closed:
            self._deliver(t, [ev["token_id"]], ev["finish_reason"])
        t.token_seen[t.attempt].set()

    def _deliver(self, t: Tracked, tokens: list[int], finish_reason: str | None) -> None:
        if t.closed:
            return
        now = time.monotonic()
        t.req.output_token_ids.extend(tokens)
        first = "first_token" not in t.times
        t.times.setdefault("first_token", now)
        t.times["last_token"] = now
        if self.metrics:
            self.metrics.on_tokens(t, len(tokens), first, now)
        delta = self.outputs.process(t.request_id, tokens, finish_reason)
        if delta.finish_reason is not None and finish_reason is None:     # a stop string matched
            self._spawn(self._cancel_on_workers(t))
        self._emit(t, StreamDelta(t.request_id, tokens, delta.text))
        if delta.finish_reason is not None:
            self._close(t, delta.finish_reason)

    def _emit(self, t: Tracked, item: StreamDelta) -> None:
        t.out.put_nowait(item)

    def _close(self, t: Tracked, reason: str, error: str | None = None) -> None:
        """End the caller's stream (resources on the workers may be freed later)."""
        if t.closed:
            return
        t.finish_reason = reason
        t.times["finish"] = time.monotonic()
        self.outputs.discard(t.request_id)
        usage = {"prompt_tokens": t.req.num_prompt_tokens, "completion_tokens": t.req.num_output_tokens,
                 "cached_tokens": t.num_cached_tokens}
        if self.metrics:
            self.metrics.on_finish(t, reason)
        self._emit(t, StreamDelta(t.request_id, [], "", reason, usage, t.timings(), error))

    def _fail(self, t: Tracked, message: str) -> None:
        self._close(t, "error", message)
        self._drop(t)

    def _drop(self, t: Tracked) -> None:
        t.phase = "done"
        self.tracked.pop(t.request_id, None)

    # KV transfer -----------------------------------------------------------------------------
    async def _transfer(self, t: Tracked, attempt: int, ev: dict) -> None:
        p, d = t.prefill, t.decode
        blocks = t.blocks[:ev["num_blocks"]]
        t0 = time.monotonic()
        results = await asyncio.gather(
            *[r.receive_kv.remote(p.instance_id, ev["epoch"], ev["seq"], blocks) for r in d.ranks],
            return_exceptions=True)
        errors = [r if isinstance(r, Exception) else r[1] for r in results if isinstance(r, Exception) or not r[0]]
        await t.token_seen[attempt].wait()
        t.durations["kv_transfer_s"] = max(0.0, time.monotonic() - max(t0, t.times.get("prefill_end", t0)))
        if self.metrics and not errors:
            self.metrics.on_transfer(p.instance_id, d.instance_id, len(blocks) * self._block_bytes(), time.monotonic() - t0)
        await p.driver.release.remote(t.request_id)
        if errors:
            self.counters["kv_transfer_failures"] += 1
            log.warning("KV transfer of %s from %s to %s failed: %s", t.request_id, p.instance_id, d.instance_id, errors[0])
            await d.driver.release.remote(t.request_id)
            self.decode_free[d.instance_id] += len(t.blocks)
            await self._rebuild(p, d, ev["epoch"])
            await self._retry(t, f"KV transfer failed: {errors[0]}")
            return
        if t.closed:
            await d.driver.release.remote(t.request_id)
            self.decode_free[d.instance_id] += len(t.blocks)
            self._drop(t)
            return
        t.times["transfer_end"] = time.monotonic()
        await d.driver.start_decode.remote(t.request_id, t.req.prompt_token_ids, list(t.req.output_token_ids),
                                           t.req.sampling, t.req.arrival_s)
        t.phase = "decode"
        if t.cancel_requested:
            await self._cancel_on_workers(t)

    def _block_bytes(self) -> int:
        return self.plan.block_size * self.model_config.kv_bytes_per_token(self._dtype_name())

    def _dtype_name(self) -> str:
        if self.plan.dtype != "auto":
            return self.plan.dtype
        return self.model_config.dtype if self.plan.prefill.device == "cuda" else "float32"

    async def _rebuild(self, p: Instance, d: Instance, failed_epoch: int) -> None:
        key = (p.instance_id, d.instance_id)
        async with self._pair_locks[key]:
            if self.epochs[key] != failed_epoch:
                return                      # someone rebuilt it already
            self.epochs[key] += 1
            self.counters["channel_rebuilds"] += 1
            await connect_pair(p, d, self.epochs[key], self.transports[key])

    async def _retry(self, t: Tracked, why: str) -> None:
        if t.closed:
            self._drop(t)
            return
        t.attempt += 1
        self.counters["retries"] += 1
        if t.attempt >= MAX_ATTEMPTS:
            self._fail(t, f"gave up after {t.attempt} attempts: {why}")
            return
        t.phase = "pending"
        await self._dispatch(t)

    # Stats -----------------------------------------------------------------------------------
    async def stats(self) -> dict:
        insts = self.prefills + self.decodes
        per = await asyncio.gather(*[i.driver.stats.remote() for i in insts], return_exceptions=True)
        workers = {i.instance_id: (s if not isinstance(s, Exception) else {"error": str(s)}) for i, s in zip(insts, per)}
        return {"workers": workers, "num_tracked": len(self.tracked), "num_pending": len(self.pending),
                "counters": dict(self.counters),
                "transports": {f"{a}->{b}": k for (a, b), k in self.transports.items()}}

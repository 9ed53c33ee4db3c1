"""KV transfer coordination for the controller: every `scheduled` event from a prefill instance
becomes exactly one receive on every rank of the decode instance it names, in the channel's
order; the prefill's blocks are freed once all decode ranks confirmed (or failed).

An attempt that is gone by the time its transfer is scheduled is still received, into nothing
(drained): otherwise every later transfer on that channel would wait for it. A decode
reservation is given back only once no receive can still write into it.
"""
from __future__ import annotations

import asyncio
import logging
import time

from cluster.instances import Instance
from cluster.tracking import Tracked
from engine.request import RequestState

log = logging.getLogger("disagg.transfers")
SLOW_HANDOVER_S = 0.2       # hand-overs slower than this are logged with where the time went


async def quiet(ref):
    """Await a worker call whose failure (a dead actor) the health monitor handles anyway."""
    try:
        return await ref
    except Exception as e:  # noqa: BLE001
        log.debug("worker call failed: %s", e)
        return None


class TransferCoordinator:
    def __init__(self, controller):
        self.c = controller

    async def transfer(self, t: Tracked, attempt: int, ev: dict) -> None:
        """The current attempt's KV leaves prefill instance t.prefill for t.decode."""
        c = self.c
        p, d, wid = t.prefill, t.decode, ev.request_id
        reserved = len(t.blocks)
        blocks = t.blocks[:ev.num_blocks]
        t0 = time.monotonic()
        results = await asyncio.gather(
            *[r.receive_kv.remote(p.instance_id, ev.epoch, ev.seq, blocks) for r in d.ranks],
            return_exceptions=True)
        received = time.monotonic()
        errors = [str(r) if isinstance(r, Exception) else r[1] for r in results if isinstance(r, Exception) or not r[0]]
        if not errors:
            try:
                await asyncio.wait_for(t.token_seen[attempt].wait(), c.plan.kv_transfer_timeout_s)
            except asyncio.TimeoutError:
                errors.append("the first token never arrived")
        exposed_s = max(0.0, time.monotonic() - max(t0, t.times.get("prefill_end", t0)))
        if exposed_s > SLOW_HANDOVER_S:
            end = t.times.get("prefill_end", t0)
            log.warning("slow KV hand-over of %s (%d blocks, %s -> %s, seq %d): %.3f s after its prefill; "
                        "the receive returned %.3f s after it was called and %.3f s after the prefill, which ended %.3f s "
                        "after the transfer was scheduled", wid, len(blocks), p.instance_id, d.instance_id, ev.seq,
                        exposed_s, received - t0, received - end, end - t0)
        await quiet(p.driver.release.remote(wid))
        if t.attempt != attempt:            # abandoned meanwhile: no receive can write any more
            await c.admission.release_decode(d, wid, reserved)
            return
        t.durations["kv_transfer_s"] = exposed_s
        if errors:
            c.counters["kv_transfer_failures"] += 1
            log.warning("KV transfer of %s from %s to %s failed: %s", wid, p.instance_id, d.instance_id, errors[0])
            await c.admission.release_decode(d, wid, reserved)
            if p.alive and d.alive:
                await self.rebuild(p, d, ev.epoch)
            await c.retry(t, f"KV transfer failed: {errors[0]}", attempt)
            return
        if c.metrics:
            c.metrics.on_transfer(p.instance_id, d.instance_id, len(blocks) * c.block_bytes(), exposed_s)
        if t.closed:
            await c.admission.release_decode(d, wid, reserved)
            c.drop(t)
            return
        t.times["transfer_end"] = time.monotonic()
        t.move(RequestState.DECODING)   # before the call returns: the first decode tokens may arrive first
        try:
            await d.driver.start_decode.remote(wid, t.req.prompt_token_ids, list(t.req.output_token_ids),
                                               t.req.sampling, t.req.arrival_s)
            started = time.monotonic() - t.times["transfer_end"]
            if started > SLOW_HANDOVER_S:
                log.warning("slow start_decode of %s on %s: %.3f s", wid, d.instance_id, started)
        except Exception as e:  # noqa: BLE001 - the decode instance died: health handles it
            await c.monitor.on_failure(d, f"start_decode failed: {e}")
            return
        if t.attempt == attempt and t.cancel_requested:
            await c.admission.release(t)

    async def drain(self, p: Instance, ev: dict) -> None:
        """A transfer scheduled for an attempt that is gone: receive and drop it so the channel's
        order holds, then free both sides of that attempt."""
        c, wid = self.c, ev.request_id
        c.admission.uncharge(wid)
        d = next((i for i in c.decodes if i.instance_id == ev.peer and i.alive), None)
        if d is not None:
            await asyncio.gather(*[quiet(r.receive_kv.remote(p.instance_id, ev.epoch, ev.seq, ev.num_blocks))
                                   for r in d.ranks])
            await quiet(d.driver.release.remote(wid))
        await quiet(p.driver.release.remote(wid))

    async def rebuild(self, p: Instance, d: Instance, failed_epoch: int) -> None:
        key = (p.instance_id, d.instance_id)
        async with self.c.pools.lock(p, d):
            if self.c.pools.epochs.get(key) != failed_epoch:
                return                      # rebuilt already
            self.c.counters["channel_rebuilds"] += 1
            try:
                await self.c.pools.connect(p, d)
            except Exception as e:  # noqa: BLE001 - the next transfer fails and tries again
                log.error("rebuilding the KV channels %s -> %s failed: %s", p.instance_id, d.instance_id, e)


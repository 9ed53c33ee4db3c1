"""Simulated prefill instances, and helpers shared with `engine_instance`.

A prefill instance is a block manager + `PrefillPolicy`, as in the prefill worker: FCFS
batches under a token budget; the head of the queue waits for blocks (back-pressure while KV
waits for transfer). Handlers return the next events, `(time_s, handler, arg)`.
"""
from __future__ import annotations

import math

from engine.batching import PrefillPolicy
from engine.block_manager import BlockManager
from placement.blocks import CountingBlockManager
from placement.deployment import InstanceGroup



def _run_time(first: float, growth: float, num_steps: int) -> float:
    """Duration of `num_steps` steps taking first, first + growth, first + 2 growth, ..."""
    return num_steps * first + growth * num_steps * (num_steps - 1) / 2


def _steps_ended(first: float, growth: float, elapsed: float) -> int:
    """How many steps of a run have ended `elapsed` seconds after it started."""
    if growth > 0:
        b = first - growth / 2
        m = int((-b + math.sqrt(b * b + 2 * growth * elapsed)) / growth)
    else:
        m = int(elapsed / first) if first > 0 else 1 << 30
    # Float rounding can leave m one off either way.
    while (m + 1) * first + growth * (m + 1) * m / 2 <= elapsed:
        m += 1
    while m > 0 and m * first + growth * m * (m - 1) / 2 > elapsed:
        m -= 1
    return m


def make_block_manager(num_blocks: int, block_size: int, exact: bool, prefix_caching: bool = False):
    if exact or prefix_caching:
        return BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return CountingBlockManager(num_blocks, block_size)


class PrefillInstance:
    """Prefill batches under a token budget; with pp stages up to pp batches are in flight.
    `on_prefilled(instance, request, now)` gets each request after its batch.

    `speed` (1 = the latency model's times) is lowered by the simulator while a decode
    instance sharing this one's GPU is busy (`set_speed`): the batch in flight then ends later
    by the work it has left, at the new speed."""

    def __init__(self, index: int, group: InstanceGroup, block_size: int, on_prefilled,
                 exact_blocks: bool = False, prefix_caching: bool = False):
        self.index = index
        self.bm = make_block_manager(group.num_blocks, block_size, exact_blocks, prefix_caching)
        self.policy = PrefillPolicy(self.bm, group.max_batch_tokens, group.max_batch_size)
        self.latency = group.latency
        self.on_prefilled = on_prefilled
        self.queued_tokens = 0          # what pick_prefill compares
        self.stage_free_s = 0.0
        self.speed = 1.0
        self.flight: dict[int, list] = {}   # batch number -> [end_s, version, chunks]
        self.num_batches = 0

    @property
    def busy(self) -> bool:
        return bool(self.flight)

    def add(self, req, now: float, charge: int | None = None):
        """Queue `req`; `charge` is the tokens the router expects it to compute here (its
        prompt less the expected prefix hit), which `queued_tokens` counts until it runs."""
        self.policy.add(req, now)
        req.queue_charge = req.num_tokens if charge is None else charge
        self.queued_tokens += req.queue_charge
        return self.kick(now)

    def kick(self, now: float, _=None):
        """Start the next batch if the first stage is free and the head of the queue fits."""
        if now < self.stage_free_s or not self.policy.waiting:
            return None
        chunks = self.policy.schedule(now)
        if not chunks:
            return None                 # the head waits for blocks: back-pressure
        cached = [c.start for c in chunks]
        self.queued_tokens -= sum(c.request.queue_charge for c in chunks)
        t = self.latency.prefill_time([c.start + c.num_tokens for c in chunks],
                                      cached if any(cached) else None) / self.speed
        interval = self.latency.prefill_interval(t)
        self.stage_free_s = now + interval
        self.num_batches += 1
        self.flight[self.num_batches] = [now + t, 0, chunks]
        events = [(now + t, self._done, (self.num_batches, 0))]
        if interval < t:
            events.append((now + interval, self.kick, None))
        return events

    def set_speed(self, now: float, speed: float):
        """Run at `speed` from `now` on: batches in flight end later (or sooner) by the work they
        have left; returns their new end events."""
        old, self.speed = self.speed, speed
        if old == speed or not self.flight:
            return None
        stretch = old / speed
        events = []
        if self.stage_free_s > now:
            self.stage_free_s = now + (self.stage_free_s - now) * stretch
            if self.latency.pp > 1:         # the next stage's kick, at its new time
                events.append((self.stage_free_s, self.kick, None))
        for number, entry in self.flight.items():
            if entry[0] > now:
                entry[0] = now + (entry[0] - now) * stretch
                entry[1] += 1           # the old end event is stale now
                events.append((entry[0], self._done, (number, entry[1])))
        return events

    def _done(self, now: float, arg):
        number, version = arg
        entry = self.flight.get(number)
        if entry is None or entry[1] != version:
            return None                 # rescheduled by set_speed
        del self.flight[number]
        chunks = entry[2]
        events = []
        self.policy.complete(chunks)
        for c in chunks:
            events.extend(self.on_prefilled(self, c.request, now) or ())
        events.extend(self.kick(now) or ())
        return events

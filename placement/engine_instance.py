"""A simulated decode or colocated instance: block manager + `ColocatedPolicy`, as in the
decode worker. Transferred requests join through `policy.decode.add`; requests preempted when
blocks run out recompute through the same policy's prefill queue.

Decode steps are the hot path, so between events the instance runs a *fast-forward run*: k
steps of an unchanging batch, k chosen so that no request finishes before the last step and no
step needs a block that is not free. Anything that changes the batch (a join, an arrival, a
decode-side reservation that would leave the run short of blocks) cuts the run after the step
in progress. Steps that preempt, and every prefill or mixed step (except the chunked mixed
steps below), go through `ColocatedPolicy.schedule` one at a time, exactly as in the worker.

Chunked mixed steps (prefill chunks + the whole decode batch) are taken with the lazy batch
when it tracks the batch and the step preempts nobody (placement/lazy_mixed.py).

Two ways to run: `DecodePolicy.max_steps_without_preemption` and `DecodePolicy.fast_forward`
at O(batch) per run; or, with the counting block manager, LAZY_MIN_BATCH requests running and
all of them in the batch, a `LazyBatch` at O(1) per join or finish.

`speed` (1 = the latency model's times) is lowered by the simulator while a prefill instance
sharing this one's GPU is busy (`set_speed`): the run in flight is cut after its step in
progress and the next steps take 1/speed as long. `host_step_s` (set by the simulator from
the serving terms) adds host time to each decode step that grows with the requests in flight.
"""
from __future__ import annotations

from itertools import repeat

from engine.batching import Batch, ColocatedPolicy
from placement.blocks import CountingBlockManager
from placement.deployment import InstanceGroup
from placement.sim_instances import _run_time, _steps_ended, make_block_manager
from placement.lazy import LazyBatch
from placement.lazy_mixed import lazy_mixed_step

LAZY_MIN_BATCH = 8              # running requests from which decode runs use a LazyBatch


class EngineInstance:
    """The decode side of a disaggregated deployment, or a colocated instance.
    `on_first_token(req, now)` is told of first tokens sampled here (colocated);
    `on_finish(req, now)` gets finished requests after their blocks are freed and returns
    events."""

    def __init__(self, index: int, group: InstanceGroup, block_size: int, on_first_token, on_finish,
                 exact_blocks: bool = False, max_run_steps: int = 1 << 30, lazy_min_batch: int | None = None,
                 lazy_mixed: bool = True, prefix_caching: bool = False):
        self.index = index
        # Chunked mixed steps with the decode batch kept lazy (placement/lazy_mixed.py);
        # False: every mixed step through ColocatedPolicy.schedule (the reference, in tests).
        self.lazy_mixed = lazy_mixed and max_run_steps > 0
        # A LazyBatch pays off from a few running requests; below, plain passes are cheaper.
        self.lazy_min_batch = LAZY_MIN_BATCH if lazy_min_batch is None else lazy_min_batch
        self.max_run_steps = max_run_steps      # 0: every step through policy.schedule (tests)
        self.bm = make_block_manager(group.num_blocks, block_size, exact_blocks, prefix_caching)
        self.policy = ColocatedPolicy(self.bm, group.max_batch_tokens, group.max_batch_size,
                                      group.mode, group.chunk_tokens)
        self.decode = self.policy.decode
        self.latency = group.latency
        self.on_first_token = on_first_token
        self.on_finish = on_finish
        self.block_size = block_size
        self.use_lazy = isinstance(self.bm, CountingBlockManager)
        self.lazy: LazyBatch | None = None      # None: requests are materialised
        self.queued_tokens = 0          # prompt tokens waiting in this instance's prefill queue
        self.busy = False
        self.run = None                 # (start_s, num_steps, first_s, growth_s, batch or None)
        self.run_token = 0              # invalidates the end event of a cut run
        self.run_blocks_applied = False
        self.run_need = None            # blocks the run in flight takes as it goes (lazily)
        self.inbox: list = []           # (request, time, joins_decode) that came while busy
        self.fresh: list = []           # in decode, first decode step not yet recorded
        self.speed = 1.0
        self.host_step_s = None         # () -> host seconds a decode step adds now (serving terms)

    def set_speed(self, now: float, speed: float):
        """Steps started from `now` on take 1/speed of the model's time; the run in flight ends
        after its step in progress (events returned)."""
        if speed == self.speed:
            return None
        self.speed = speed
        return self._cut(now)

    # Entry points ---------------------------------------------------------------------
    def join(self, req, now: float):
        """A request whose KV has arrived joins the decode batch (next step boundary)."""
        return self._enter(req, now, True)

    def arrive(self, req, now: float):
        """A new request joins the prefill queue (colocated instances)."""
        self.queued_tokens += req.num_tokens
        return self._enter(req, now, False)

    def kick(self, now: float):
        """Start a step if idle (blocks were freed here from outside)."""
        return None if self.busy else self._next(now)

    def free_blocks(self, now: float) -> int:
        """Free blocks as the worker would report them at `now`: a run in flight has taken
        the blocks of every step started so far (the worker allocates at each step's start)."""
        free = self.bm.num_free_blocks
        if self.run is None or self.run_blocks_applied or self._run_need() == 0:
            return free
        start, k, first, growth, _ = self.run
        started = 1 + _steps_ended(first, growth, now - start)
        return free - (self.run_need if started >= k else self._need(started))

    @property
    def pending_blocks(self) -> int:
        """At least the blocks the run in flight has yet to take, cheaply: free_blocks(now) lies
        within [bm.num_free_blocks - pending_blocks, bm.num_free_blocks]."""
        if self.run is None or self.run_blocks_applied:
            return 0
        if self.run_need is not None:
            return self.run_need
        k, batch = self.run[1], self.run[4]
        size = len(batch) if batch is not None else len(self.lazy.state)
        return size * (k // self.block_size + 1)    # no request takes more in k steps

    def _run_need(self) -> int:
        if self.run_need is None:
            self.run_need = self._need(self.run[1])
        return self.run_need

    def reserve(self, num_blocks: int, now: float, events: list) -> list[int] | None:
        """Blocks for an incoming KV transfer, or None. If the reservation would leave the run
        in flight short of blocks, the run is cut first (`sync`), as the worker would have
        taken its blocks step by step."""
        if self.bm.num_free_blocks - self.pending_blocks < num_blocks:
            if self.run is not None and not self.run_blocks_applied and \
                    self.bm.num_free_blocks - self._run_need() < num_blocks:
                events.extend(self.sync(now) or ())
            if self.bm.num_free_blocks - self.pending_blocks < num_blocks:
                return None
        return self.bm.allocate_blocks(num_blocks)

    def sync(self, now: float):
        """Cut the run after the step in progress and take the blocks of the steps started."""
        events = self._cut(now)
        if self.run is not None and not self.run_blocks_applied:
            self._take_run_blocks(self.run[1])
            self.run_blocks_applied = True
        return events

    def _enter(self, req, now, joins_decode):
        if self.busy:
            self.inbox.append((req, now, joins_decode))
            return self._cut(now)
        self._admit(req, now, joins_decode)
        return self._next(now)

    def _admit(self, req, now, joins_decode):
        if not joins_decode:
            self.policy.add(req, now)
            return
        self.decode.add(req, now)
        self._track(req)

    def _track(self, req):
        """A request just appended to decode.running: record it for its first decode step and
        let the lazy batch track it (it tracks running[:max_batch_size] only)."""
        self.fresh.append(req)
        if self.lazy is None:
            return
        running, m = self.decode.running, self.decode.max_batch_size
        if len(running) <= m:
            if not self.lazy.admit(req):
                self._materialize()
        elif running[-1] is not req and running.index(req) < m:
            # A request of the batch the lazy batch would miss (a prefill step moved several
            # requests past the batch cap): the plain path steps it, so drop the lazy one.
            self._materialize()

    def _materialize(self):
        if self.lazy is not None:
            self.lazy.materialize_all()
            self.lazy = None

    # Fast-forward runs ----------------------------------------------------------------
    def _need(self, num_steps):
        return self.lazy.need(num_steps) if self.lazy is not None else self.decode.blocks_needed(num_steps)

    def _take_run_blocks(self, num_steps):
        if self.lazy is not None:
            self.bm.take_blocks(self.lazy.need(num_steps))
        else:
            self.decode.fast_forward(num_steps)

    def _cut(self, now):
        if self.run is None:
            return None
        start, k, first, growth, batch = self.run
        started = min(k, 1 + _steps_ended(first, growth, now - start))
        if started >= k:
            return None
        self.run = (start, started, first, growth, batch)
        self.run_token += 1
        self.run_need = None
        return [(start + _run_time(first, growth, started), self._run_end, self.run_token)]

    def _start_run(self, now, batch, batch_size, num_steps, sum_context):
        first, growth, valid = self.latency.decode_line(batch_size, sum_context)
        if self.host_step_s is not None:
            first += self.host_step_s()
        if self.speed != 1.0:
            first, growth = first / self.speed, growth / self.speed
        k = min(num_steps, valid)
        self.run = (now, k, first, growth, batch)
        self.run_token += 1
        self.run_need = None
        self.run_blocks_applied = False
        self.busy = True
        if self.fresh:
            self._mark_decode_step(now, batch)
        return [(now + _run_time(first, growth, k), self._run_end, self.run_token)]

    def _run_end(self, now, token):
        if token != self.run_token:
            return None
        k, batch = self.run[1], self.run[4]
        self.run = None
        if not self.run_blocks_applied:
            self._take_run_blocks(k)
        if self.lazy is not None:
            lazy = self.lazy
            finished = lazy.advance(k)
            for r in finished:
                lazy.materialize(r)
                lazy.drop(r)
        else:
            finished = []
            for r in batch:
                out = r.output_token_ids
                out.extend(repeat(0, k))
                if len(out) >= r.sampling.max_tokens:
                    finished.append(r)
        self._release(finished)
        return self._after_step(now, finished)

    def _release(self, finished):
        # What ColocatedPolicy.release does for requests that are only in the decode batch.
        if not finished:
            return
        running = self.decode.running
        for r in finished:
            try:
                del running[running.index(r)]   # the simulator's requests compare identities
            except ValueError:
                pass
            self.bm.free(r.block_ids)
        lazy, m = self.lazy, self.decode.max_batch_size
        if lazy is not None and len(running) > m - len(finished):
            for r in running[m - len(finished):m]:     # moved up into the batch
                if id(r) not in lazy.state and not lazy.admit(r):
                    self._materialize()
                    break

    # Real steps through ColocatedPolicy.schedule ----------------------------------------
    def _start_batch(self, now, b: Batch):
        lat = self.latency
        decode_context = sum(r.num_tokens for r in b.decode)
        if b.prefill:
            # A request's first chunk starts at its prefix hit: those tokens leave the queue too.
            self.queued_tokens -= b.num_prefill_tokens + sum(c.start for c in b.prefill
                                                             if c.start == c.request.num_cached_tokens)
            chunks = [(c.num_tokens, c.start) for c in b.prefill]
            if b.decode:
                t = lat.mixed_time(chunks, len(b.decode), decode_context)
            else:
                cached = [c.start for c in b.prefill]
                t = lat.prefill_time([c.start + c.num_tokens for c in b.prefill],
                                     cached if any(cached) else None)
        else:
            t = lat.decode_time(len(b.decode), decode_context)
        if self.host_step_s is not None and b.decode:
            t += self.host_step_s()
        t /= self.speed
        for r in b.preempted:
            self.queued_tokens += r.num_tokens
            if r in self.fresh:
                self.fresh.remove(r)
        self._mark_decode_step(now, b.decode)
        self.busy = True
        return [(now + t, self._batch_done, b)]

    def _batch_done(self, now, b: Batch):
        finished = []
        for r in b.sampled:
            r.output_token_ids.append(0)
            if "first_token" not in r.times:
                self.on_first_token(r, now)
            if len(r.output_token_ids) >= r.sampling.max_tokens:
                finished.append(r)
        done = set(map(id, finished))
        self.policy.complete(b, finished, now)      # releases the finished ones
        for c in b.prefill:
            if c.is_last and id(c.request) not in done:
                self._track(c.request)              # complete() moved it into decode
        return self._after_step(now, finished)

    # Between steps ----------------------------------------------------------------------
    def _after_step(self, now, finished):
        if not finished and not self.inbox:
            self.busy = False
            return self._next(now)
        events = []
        for r in finished:
            events.extend(self.on_finish(r, now) or ())
        self.busy = False
        inbox, self.inbox = self.inbox, []
        for req, t, joins_decode in inbox:
            self._admit(req, t, joins_decode)
        events.extend(self._next(now) or ())
        return events

    def _real_step(self, now, prefill_only=False):
        if not prefill_only:
            self._materialize()
        b = self.policy.schedule(now)
        assert not (prefill_only and b.decode), "a prefill_first step with prefill waiting runs no decode"
        return self._start_batch(now, b) if not b.empty else None

    def _next(self, now):
        """Pick the next step: a prefill (or mixed) step when the head of the prefill queue
        can start, else a fast-forward decode run, else a single real step that preempts."""
        waiting = self.policy.prefill.waiting
        if waiting:
            head = waiting[0]
            # A counting block manager's can_allocate, without the request's token list.
            if head.block_ids or (-(-head.num_tokens // self.block_size) <= self.bm.num_free_blocks
                                  if self.use_lazy else self.bm.can_allocate(head.all_token_ids)):
                if self.lazy_mixed and self.policy.mode == "chunked" and self.use_lazy and self.decode.running:
                    events = self._try_lazy_mixed(now)
                    if events is not None:
                        return events
                # prefill_first runs the prefill alone: the decode batch (lazy or not) waits.
                return self._real_step(now, prefill_only=self.policy.mode == "prefill_first")
        running = self.decode.running
        if not running:
            return None
        lazy = self.lazy
        if lazy is not None and not self._keep_lazy(len(running)):
            self._materialize()
            lazy = None
        if self.use_lazy and (lazy is not None or len(running) >= self.lazy_min_batch):
            if lazy is None:
                self._build_lazy()
                lazy = self.lazy
            if lazy is not None:
                heap = lazy.heap
                limit = heap[0][0] - lazy.step if heap else 1 << 30     # lazy.steps_to_first_finish()
                if self.max_run_steps < limit:
                    limit = self.max_run_steps
                k = lazy.max_steps(self.bm.num_free_blocks, limit)
                if k == 0:
                    return self._real_step(now)     # this step preempts
                return self._start_run(now, None, len(lazy.state), k, lazy.sum_tokens)
        return self._next_eager(now, running)

    def _try_lazy_mixed(self, now):
        running = self.decode.running
        if self.lazy is not None and not self._keep_lazy(len(running)):
            self._materialize()
        if self.lazy is None and len(running) >= self.lazy_min_batch:
            self._build_lazy()
        return lazy_mixed_step(self, now) if self.lazy is not None else None

    def _keep_lazy(self, num_running: int) -> bool:
        """Whether the lazy batch stays for the next step (else it is materialised): it tracks
        every request of the batch (`_track` drops one that would miss any), so it gives the
        plain path's answers; below half the threshold plain passes are cheaper."""
        return bool(self.lazy.state) and num_running >= self.lazy_min_batch // 2

    def _build_lazy(self):
        lazy = LazyBatch(self.block_size)
        if lazy.admit_all(self.decode.running[:self.decode.max_batch_size]):
            self.lazy = lazy

    def _next_eager(self, now, running):
        # running itself is the batch when it fits: nothing changes it until the run ends.
        batch = running if len(running) <= self.decode.max_batch_size else running[:self.decode.max_batch_size]
        steps_left, context = 1 << 30, 0
        for r in batch:
            n_out = len(r.output_token_ids)
            context += len(r.prompt_token_ids) + n_out
            left = r.sampling.max_tokens - n_out
            if left < steps_left:
                steps_left = left
        limit = min(steps_left, self.max_run_steps)
        if self.bm.num_free_blocks >= len(batch) * (limit // self.block_size + 1) and limit > 0:
            k = limit           # plenty of blocks: no request can take more than this in `limit` steps
        else:
            k = self.decode.max_steps_without_preemption(limit)
        if k == 0:
            return self._real_step(now)             # this step preempts
        return self._start_run(now, batch, len(batch), k, context)

    def _mark_decode_step(self, now, batch):
        """Record the first decode step of requests that just entered decode (`fresh`);
        `batch` None means the lazy batch."""
        if not self.fresh:
            return
        if batch is None:
            members = self.lazy.state
        elif not batch:
            return
        else:   # fresh requests are running: when the batch is all of running, all are in it
            members = None if len(batch) >= len(self.decode.running) else set(map(id, batch))
        keep = []
        for r in self.fresh:
            if members is None or id(r) in members:
                r.times.setdefault("decode_step", now)
            else:
                keep.append(r)
        self.fresh = keep

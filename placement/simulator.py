"""Discrete-event simulation of a deployment serving a workload.

    result = simulate(deployment, workload)          # -> metrics.SimResult

The event heap holds `(time_s, seq, handler, arg)`; a handler returns the events it causes
(vidur's shape). The controller here does what the cluster controller does, with the same
routing functions (engine.routing): on arrival a request is routed to a decode instance by
`pick_decode` over free blocks, which reserves blocks_for(prompt + 1) there, and to a prefill
instance by `PrefixRouter.pick` (queued prompt tokens, less the expected prefix hit with
routing="prefix"); when no decode instance can take it,
it waits here in arrival order. After its prefill the request has its first token (TTFT ends),
its KV moves over the prefill->decode link (the copies' bytes on one link go one after another;
the link's latency overlaps the next copy) and
the prefill blocks are freed only once the transfer completes. A colocated deployment routes
each arrival by the same `PrefixRouter.pick` with routing="prefix" (colocated instances then
hold a prefix cache too), else to the instance with the most free blocks after its queued prompts. A mixed
deployment (a colocated pool beside prefill and decode pools) picks the pool per arrival by
queued prompt tokens (`_colocated_first`).

Prefill and decode instances that share GPUs (`Deployment.shared`) time-slice them: after each
event the simulator looks at whether each pair is busy, and while both are, each runs at its
share of `Deployment.shared_speeds` (a prefill batch in flight is stretched by its remaining work; a
decode run is cut after its step in progress and continues at the new speed). With a
`Deployment.shared_speed_table` (a calibrated profile's `shared_speeds_by_batch`) the split
follows the decode's current batch: re-read whenever that batch changes while both are busy.

A calibrated profile's serving terms (placement/serving.py) add what serving costs beyond the
engine: arrivals reach the controller `dispatch_s` late, the controller's hops after each KV
copy (fixed + per request in flight) hold the link (`handover_serial`), decode steps cost more per request in
flight, and on CPU the workers share the cores with the frontend and the other processes.

`phase="prefill"` or `"decode"` simulates one phase alone, as DistServe's Algorithm 1 sizes
them: prefill-only requests end at their first token; decode-only requests arrive with their
KV already in place.
"""
from __future__ import annotations

import gc
import heapq
import time
from collections import deque

import numpy as np

from engine.batching import finish
from engine.request import TRANSITIONS, FinishReason, Request, RequestState
from engine.routing import PrefixRouter, pick_decode
from engine.sampling_params import SamplingParams
from placement.deployment import Deployment
from placement.engine_instance import EngineInstance
from placement.serving import CoreShare, ServingTerms, serving_terms, speeds_at
from placement.sim_instances import PrefillInstance
from placement.slo_metrics import SimResult
from placement.workload import Workload, prompt_token_ids

PHASES = ("both", "prefill", "decode")
_NAN = float("nan")


_ALLOWED = {id(a): frozenset(map(id, b)) for a, b in TRANSITIONS.items()}


class SimRequest(Request):
    """The simulator's requests: two are equal only when they are the same object (their ids
    differ anyway, so the answers are Request's), which lets the policies' list scans (`in`,
    `remove`) compare identities instead of every field."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def transition(self, new_state: RequestState) -> None:
        # Request.transition's check by identity (an Enum member hashes in Python).
        if id(new_state) not in _ALLOWED[id(self.state)]:
            super().transition(new_state)       # raises InvalidTransition
        self.state = new_state


class _TokenCount:
    """What a counting block manager is given for a request's tokens: it only asks how many."""

    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class CountedRequest(SimRequest):
    """A request whose token contents never matter (counting block manager, no prefix
    caching): `all_token_ids` is only measured, so it is not built (a copy of the prompt per
    call)."""

    @property
    def all_token_ids(self):
        return _TokenCount(len(self.prompt_token_ids) + len(self.output_token_ids))


class Simulator:
    """One simulation run. `slo=(ttft_s, tpot_s)` with `max_misses` stops the run as soon as
    more than `max_misses` requests are known to miss (a goodput probe that cannot pass).
    `exact_blocks` uses the engine's BlockManager instead of the counting twin;
    `max_run_steps=0` turns fast-forwarding off: every step goes through
    `ColocatedPolicy.schedule`; `lazy_min_batch` is the batch size from which decode runs use
    a LazyBatch (default: engine_instance.LAZY_MIN_BATCH), `lazy_mixed=False` runs chunked mixed steps with the decode batch
    materialised (tests check that every way gives the same answer). `serving` (default: the
    latency model's, from a profile's "serving" section) adds what serving costs beyond the
    engine (placement/serving.py)."""

    def __init__(self, deployment: Deployment, workload: Workload, phase: str = "both",
                 exact_blocks: bool = False, prefix_caching: bool = False,
                 slo: tuple[float, float] | None = None, max_misses: int | None = None,
                 max_run_steps: int = 1 << 30, lazy_min_batch: int | None = None, lazy_mixed: bool = True,
                 serving: ServingTerms | None = None, routing: str = "load"):
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if phase != "both" and not deployment.disaggregated:
            raise ValueError("a single-phase simulation needs a disaggregated deployment")
        self.dep, self.wl, self.phase = deployment, workload, phase
        self.exact_blocks = exact_blocks
        self.prefix_caching = prefix_caching and workload.hash_ids is not None
        self.slo, self.max_misses = slo, max_misses
        bs = deployment.block_size
        self.block_size = bs
        n = workload.num_requests
        self.times = {k: [_NAN] * n for k in ("prefill_start", "first_token", "transfer_end",
                                              "decode_step", "finish")}
        self.preemptions = [0] * n
        self.num_misses = 0
        self.stopped = False
        self.pending: deque[Request] = deque()        # waiting at the controller for decode blocks
        # Plain lists: indexing numpy arrays one element at a time is slow.
        self._arrivals = workload.arrival_s.tolist()
        self._prompts = workload.prompt_lens.tolist()
        self._outputs = workload.output_lens.tolist()
        self.link_free_s: dict[tuple[int, int], float] = {}
        self._links: dict = {}
        self._sampling: dict[int, SamplingParams] = {}   # one frozen object per output length
        self._engine_options = dict(exact_blocks=exact_blocks, max_run_steps=max_run_steps,
                                    lazy_min_batch=lazy_min_batch, lazy_mixed=lazy_mixed)
        self._build_instances(exact_blocks)
        self.serving = serving if serving is not None else serving_terms(deployment)
        self.in_flight = 0              # requests arrived and not finished (the load terms' count)
        self._dispatch_s = self.serving.dispatch_s if self.serving else 0.0
        self._return_s = self.serving.return_s if self.serving else 0.0
        if self.serving and self.serving.step_host_s_per_stream:
            per_stream = self.serving.step_host_s_per_stream
            for inst in self.decodes + self.colocated:
                inst.host_step_s = lambda: per_stream * self.in_flight
        self.router = PrefixRouter(routing if self.prefix_caching else "load", bs)
        for p in self.prefills:
            self.router.adopt(p.index, deployment.prefill.num_blocks)
        for c in self.colocated:            # keyed apart from prefill instance p.index
            self.router.adopt(("colocated", c.index), deployment.colocated.num_blocks)
        self._num_assigned = [0] * len(self.prefills)
        self._num_assigned_colocated = [0] * len(self.colocated)

    def _build_instances(self, exact):
        dep, bs = self.dep, self.block_size
        self.prefills, self.decodes, self.colocated = [], [], []
        if dep.prefill is not None:
            if self.phase != "decode":
                self.prefills = [PrefillInstance(i, dep.prefill, bs, self._on_prefilled, exact,
                                                 self.prefix_caching)
                                 for i in range(dep.prefill.num_instances)]
            if self.phase != "prefill":
                self.decodes = [EngineInstance(i, dep.decode, bs, self._on_first_token,
                                               self._on_finish, **self._engine_options)
                                for i in range(dep.decode.num_instances)]
        if dep.colocated is not None:
            self.colocated = [EngineInstance(i, dep.colocated, bs, self._on_first_token,
                                             self._on_finish, **self._engine_options,
                                             prefix_caching=self.prefix_caching)
                              for i in range(dep.colocated.num_instances)]
        # Requests that can never fit anywhere are refused at arrival (they count as misses).
        groups = [g for g in (dep.prefill if self.prefills else None,
                              dep.decode if self.decodes else None, dep.colocated) if g]
        self._max_blocks = min(g.num_blocks for g in groups)

    # The loop ---------------------------------------------------------------------------
    def run(self) -> SimResult:
        # The run makes ~10 objects per event and frees them by reference counting; the
        # cyclic collector only re-walks the live ones, so it is off for the run.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if enabled:
                gc.enable()

    def _run(self) -> SimResult:
        wall = time.perf_counter()
        heap = [(float(self.wl.arrival_s[0]) + self._dispatch_s, 0, self._arrive, 0)] \
            if self.wl.num_requests else []
        seq, num_events = 1, 0
        push, pop = heapq.heappush, heapq.heappop
        pairs = [(self.prefills[i], self.decodes[j]) for i, j in self.dep.shared] \
            if self.prefills and self.decodes else []
        p_speed, d_speed = self.dep.shared_speeds
        busy = [(False, False, p_speed, d_speed)] * len(pairs)
        table, table_speeds = self.dep.shared_speed_table, {}
        cores = CoreShare(self.serving, self.prefills + self.decodes + self.colocated, self.prefills, self.decodes) \
            if self.serving and self.serving.host_cores else None
        while heap and not self.stopped:
            now, _, handler, arg = pop(heap)
            num_events += 1
            events = handler(now, arg)
            if pairs:
                events = list(events or ())
                for k, (p, d) in enumerate(pairs):
                    if table is not None and p.busy and d.busy:
                        # The split follows the decode's batch (the requests it steps now).
                        b = min(len(d.decode.running), d.decode.max_batch_size)
                        speeds = table_speeds.get(b)
                        if speeds is None:
                            speeds = table_speeds[b] = speeds_at(table, b)
                        state = (True, True, *speeds)
                    else:
                        state = (p.busy, d.busy, p_speed, d_speed)
                    if state != busy[k]:
                        busy[k] = state
                        events.extend(p.set_speed(now, state[2] if state[1] else 1.0) or ())
                        events.extend(d.set_speed(now, state[3] if state[0] else 1.0) or ())
            if cores is not None:
                events = list(events or ())
                events.extend(cores.update(now))
            if events:
                for t, h, a in events:
                    push(heap, (t, seq, h, a))
                    seq += 1
        return self._result(time.perf_counter() - wall, num_events)

    def _result(self, wall_s, num_events) -> SimResult:
        t = {k: np.array(v) for k, v in self.times.items()}
        return SimResult(self.wl.arrival_s.copy(), t["prefill_start"], t["first_token"],
                         t["transfer_end"], t["decode_step"], t["finish"],
                         self.wl.prompt_lens.copy(), self.wl.output_lens.copy(),
                         np.array(self.preemptions), self.dep.num_devices, not self.stopped,
                         wall_s, num_events)

    # Arrivals and routing ---------------------------------------------------------------
    def _arrive(self, now, i):
        # `now` is when the request reaches the controller: its arrival plus `dispatch_s`.
        events = []
        if i + 1 < len(self._arrivals):
            events.append((self._arrivals[i + 1] + self._dispatch_s, self._arrive, i + 1))
        req = self._make_request(i, self._arrivals[i] if self._dispatch_s else now)
        self.in_flight += 1
        longest = req.num_tokens + (req.sampling.max_tokens if self.phase != "prefill" else 1)
        if self.block_size * self._max_blocks < longest:
            self._miss()                       # larger than any instance's KV cache
            self.in_flight -= 1
            return events
        if self.colocated and (not self.prefills or self._colocated_first()):
            events.extend(self._route_colocated(req, now) or ())
        else:
            self.pending.append(req)
            events.extend(self._dispatch(now) or ())
        return events

    def _make_request(self, i, now) -> Request:
        n, out = self._prompts[i], self._outputs[i]
        if self.prefix_caching or self.exact_blocks:
            hashes = self.wl.hash_ids[i] if self.prefix_caching else None
            prompt = prompt_token_ids(i, n, 32000, hashes)
        else:
            prompt = [0] * n            # contents never matter to a counting block manager
        sampling = self._sampling.get(out)
        if sampling is None:
            sampling = self._sampling[out] = SamplingParams(max_tokens=out, ignore_eos=True)
        cls = SimRequest if self.prefix_caching or self.exact_blocks else CountedRequest
        req = cls(str(i), prompt, sampling, arrival_s=now)
        req.index = i
        return req

    def _colocated_first(self) -> bool:
        # A mixed deployment sends each arrival to the pool whose least-loaded instance has the
        # fewest prompt tokens queued (ties: colocated), and none to P/D while requests wait
        # there for decode blocks.
        if self.pending:
            return True
        return min(c.queued_tokens for c in self.colocated) <= min(p.queued_tokens for p in self.prefills)

    def _route_colocated(self, req, now):
        keys = self.router.keys(req.prompt_token_ids)
        if keys:        # the controller's rule: queued prompt tokens less the expected hit
            k, _ = self.router.pick([("colocated", c.index) for c in self.colocated],
                                    [c.queued_tokens for c in self.colocated], keys, self._num_assigned_colocated)
            self._num_assigned_colocated[k] += 1
        else:
            free = _free_for_routing(self.colocated, now, [c.bm.blocks_for(c.queued_tokens) for c in self.colocated])
            k = free.index(max(free))       # pick_decode(free, -inf): the most, ties to the first
        return self.colocated[k].arrive(req, now)

    def _dispatch(self, now):
        """Route waiting requests in arrival order while a decode instance can take the head."""
        events = []
        while self.pending:
            req = self.pending[0]
            inst = self._reserve_decode(req, now, events)
            if inst is None and self.decodes:
                break
            self.pending.popleft()
            req.decode_instance = inst
            if self.prefills:
                events.extend(self._route_prefill(req, now) or ())
            else:
                events.extend(self._join_without_prefill(req, now) or ())
        return events

    def _route_prefill(self, req, now):
        # The controller's rule (engine.routing): queued tokens less the expected prefix hit.
        keys = self.router.keys(req.prompt_token_ids)
        # Ties go to the instance given the fewest requests, as in the controller.
        k, hit = self.router.pick([p.index for p in self.prefills], [p.queued_tokens for p in self.prefills], keys,
                                  self._num_assigned)
        self._num_assigned[k] += 1
        return self.prefills[k].add(req, now, req.num_tokens - hit)

    def _reserve_decode(self, req, now, events):
        if not self.decodes:
            return None
        need = self.decodes[0].bm.blocks_for(req.num_tokens + 1)
        free = _free_for_routing(self.decodes, now, need=need)
        refused: set[int] = set()
        while True:
            j = pick_decode(free, need)
            if j is None:
                return None
            inst = self.decodes[j]
            table = inst.reserve(need, now, events)
            if table is not None:
                req.reserved_blocks = table
                return inst
            # Its run in flight needed those blocks (rare): ask the others for exact counts.
            refused.add(j)
            free = [-1 if i in refused else d.free_blocks(now) for i, d in enumerate(self.decodes)]

    def _join_without_prefill(self, req, now):
        # Decode-only simulation: the KV is already there and the first token already sent.
        req.transition(RequestState.PREFILLING)
        req.transition(RequestState.TRANSFERRING)
        req.output_token_ids.append(0)
        req.mark("first_token", now)
        self.times["first_token"][req.index] = now
        self.times["prefill_start"][req.index] = now
        return self._land_kv(req, now)

    # Prefill -> transfer -> decode ------------------------------------------------------
    def _on_prefilled(self, p: PrefillInstance, req, now):
        req.output_token_ids.append(0)
        self._on_first_token(req, now)
        if self.phase == "prefill" or len(req.output_token_ids) >= req.sampling.max_tokens:
            p.bm.free(req.block_ids)
            events = []
            if self.decodes:         # the reservation goes back; a recompute may now fit there
                req.decode_instance.bm.free(req.reserved_blocks)
                events.extend(req.decode_instance.kick(now) or ())
            finish(req, FinishReason.LENGTH, now)
            events.extend(self._on_finish(req, now) or ())
            return events
        req.transition(RequestState.TRANSFERRING)
        d = req.decode_instance
        key = (p.index, d.index)
        link = self._links.get(key) or self._links.setdefault(key, self.dep.link(*key))
        # The link serialises the copies' bytes; its latency (setup, messages) is a delay that
        # the next copy overlaps, so it does not hold the link.
        start = max(now, self.link_free_s.get(key, 0.0))
        total = p.latency.kv_transfer_time(req.num_computed_tokens * self.dep.kv_bytes_per_token, link)
        latency = min(total, p.latency.kv_transfer_time(0, link))
        end = start + total - latency           # the bytes are through
        self.link_free_s[key] = end
        end += latency
        if self.serving:                        # the controller's hops after the copy
            hops = self.serving.handover_delay(self.in_flight)
            if self.serving.handover_serial:    # ... in the channel's order: the link waits
                self.link_free_s[key] = end + hops
            end += hops
        return [(end, self._transfer_done, (p, req))]

    def _transfer_done(self, now, arg):
        p, req = arg
        p.bm.free(req.block_ids)           # prefill keeps its KV until the decode side has it
        self.times["transfer_end"][req.index] = now
        events = self._land_kv(req, now) or []
        events.extend(p.kick(now) or ())
        return events

    def _land_kv(self, req, now):
        req.block_ids = req.reserved_blocks
        req.reserved_blocks = None
        req.num_cached_tokens = 0
        req.num_computed_tokens = req.num_prompt_tokens
        return req.decode_instance.join(req, now)

    # Bookkeeping ------------------------------------------------------------------------
    def _on_first_token(self, req, now):
        req.mark("first_token", now)
        now += self._return_s               # when the client has it
        i = req.index
        self.times["first_token"][i] = now
        self.times["prefill_start"][i] = req.times.get("prefill_start", now)
        if self.slo and now - req.arrival_s > self.slo[0]:
            req.missed = True
            self._miss()

    def _on_finish(self, req, now):
        i = req.index
        t = self.times
        self.in_flight -= 1
        t["finish"][i] = now + self._return_s
        t["decode_step"][i] = req.times.get("decode_step", _NAN)
        self.preemptions[i] = req.num_preemptions
        if req.state is not RequestState.FINISHED:
            finish(req, FinishReason.LENGTH, now)
        if self.slo and not getattr(req, "missed", False) and req.num_output_tokens > 1:
            if (t["finish"][i] - t["first_token"][i]) / (req.num_output_tokens - 1) > self.slo[1]:
                self._miss()
        return self._dispatch(now) if self.pending else None

    def _miss(self):
        self.num_misses += 1
        if self.max_misses is not None and self.num_misses > self.max_misses:
            self.stopped = True


def _free_for_routing(instances, now, minus=None, need=None) -> list[int]:
    """Free blocks (less `minus`) per instance as `pick_decode` should see them at `now`, with
    exact counts (`free_blocks`, O(batch) mid-run) computed only for instances that could be
    picked: an instance whose upper bound is below another's lower bound cannot win, and the
    winner's lower bound decides as well as its exact count when it already covers `need`."""
    upper = [inst.bm.num_free_blocks for inst in instances]
    if minus:
        upper = [u - m for u, m in zip(upper, minus)]
    # pending_blocks is 0 without a run in flight.
    lower = [u if inst.run is None else u - inst.pending_blocks for u, inst in zip(upper, instances)]
    top = max(lower)
    contenders = [i for i, u in enumerate(upper) if u >= top]
    if len(contenders) == 1 and (need is None or top >= need):
        return lower
    for i in contenders:
        if lower[i] != upper[i]:
            lower[i] = upper[i] - instances[i].bm.num_free_blocks + instances[i].free_blocks(now)
    return lower


def simulate(deployment: Deployment, workload: Workload, phase: str = "both", **kwargs) -> SimResult:
    """Run one simulation; keyword arguments go to `Simulator`."""
    return Simulator(deployment, workload, phase, **kwargs).run()

"""Async scheduling: the host work of one step overlaps the device work of the next, as vLLM
v1's async scheduling does.

    sync:   schedule N | run N (device) | sample, copy, wait | postprocess N | schedule N+1 ...
    async:  schedule N+1 | launch N+1 (its input tokens: N's, still on the device)
                         | wait for N's tokens, postprocess N, emit   (the device runs N+1)

How tokens stay exactly those of the sync loop:
- A request sampled at step N gets a placeholder token (PLACEHOLDER) when N is launched, so the
  scheduler counts its tokens as the sync loop would (blocks, positions, the seeded sampler's
  token index). Step N+1 takes that row's input id from N's sampled tokens on the device
  (`StepInput.decode_src`); N's postprocess swaps the placeholder for the real token.
- A request that ends at N by a length limit (max_tokens, context) is known to end whatever token
  it gets: N+1 leaves it out. One that ends at N on a stop token runs once more in N+1; that work
  is discarded (N+1's postprocess skips requests no longer live), and its blocks were freed by
  N's postprocess: later steps reuse them only after N+1 on the same stream (CPU: in order).
- A decode step that would preempt drains first (N is finished, then N+1 runs as a sync step
  would): a preempted request is recomputed from its tokens, which must all be known.
- Requests with penalties or logprobs sample on the host (their sampling reads the token
  history and values there): a step holding one is finished right after its launch, so the
  step in flight never holds one and their history is always real.
- Cancels and failures: a request cancelled while its step is in flight is released at once,
  and its in-flight token dropped (it is not live any more); a request that makes step N fail
  is found while N is launched (model/step_isolation.py) and dropped before N+1 is scheduled.

Only single-rank instances (tp = pp = 1) run it: TP peers would need the sampled tokens too.
The prefill role does not (its steps end in KV sends, not in a next decode step).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from engine.batching import Batch
from model.step_isolation import StepOutcome

PLACEHOLDER = -1        # an output token id whose value is still on the device


def async_scheduling_enabled(setting: bool | None, device: torch.device, tp: int, pp: int) -> bool:
    """`setting` (WorkerConfig.async_scheduling): True/False decide; None (auto) reads
    DISAGG_ASYNC_SCHEDULING (1/0) and is on for CUDA otherwise. On CPU the forward pass runs
    on the host thread, so async only delays each step's tokens by one step: off by default."""
    if tp * pp != 1:
        return False
    if setting is not None:
        return bool(setting)
    env = os.environ.get("DISAGG_ASYNC_SCHEDULING", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return device.type == "cuda"


def needs_host_history(req) -> bool:
    sp = req.sampling
    return sp.penalized or sp.logprobs is not None


@dataclass
class InFlight:
    """A launched step whose tokens the host has not read yet."""
    out: StepOutcome                        # what ran (failed requests removed already)
    tokens_dev: torch.Tensor | None         # one per out.batch.sampled, on the device
    t0: float
    host: torch.Tensor | None = None        # pinned copy of tokens_dev (CUDA)
    ready: object = None                    # CUDA event: the copy is done
    events: list = field(default_factory=list)      # failures found at launch
    ending: frozenset = frozenset()         # id() of requests that end here by length

    def tokens(self) -> list[int]:
        if self.tokens_dev is None or self.out.device_tokens is None:
            return self.out.tokens
        if self.ready is not None:
            self.ready.synchronize()
            return self.host.tolist()
        return self.tokens_dev.tolist()


class AsyncStepper:
    """Drives a StepLoop (model/instance.py) one step ahead. `step()` replaces the loop's
    sync step; `flush()` finishes the step in flight."""

    def __init__(self, loop):
        self.loop = loop
        self.inflight: InFlight | None = None
        self.num_overlapped = 0     # steps whose postprocess ran while the next step ran
        self.num_drains = 0         # steps finished before the next could be scheduled

    def step(self) -> bool:
        loop, prev = self.loop, self.inflight
        try:
            ending = prev.ending if prev is not None else frozenset()
            with loop._lock:
                ahead = prev is None or loop.can_run_ahead(ending)
                sched = loop.schedule(time.monotonic(), ending) if ahead else None
            if not ahead:
                self.num_drains += 1
                self.flush()
                prev = None
                with loop._lock:
                    sched = loop.schedule(time.monotonic(), frozenset())
            if sched is not None and any(r.output_token_ids and r.output_token_ids[-1] == PLACEHOLDER
                                         for r in sched.batch.preempted):
                raise RuntimeError("async scheduling preempted a request whose last token is not known yet")
            if sched is None:
                if prev is None:
                    return False
                self.flush()
                return True
            loop.emit(sched.events)
            cur = self._launch(sched, prev)
            if prev is not None:
                self.num_overlapped += 1
                self._finalize(prev)
            self.inflight = cur
            if any(needs_host_history(r) for r in cur.out.batch.sampled):
                self.flush()
            return True
        except BaseException:
            self.inflight = None        # the instance restarts or the step is reported failed
            raise

    def flush(self) -> None:
        """Finish the step in flight (its tokens into requests, events out)."""
        f, self.inflight = self.inflight, None
        if f is not None:
            self._finalize(f)

    # Launch ------------------------------------------------------------------------------
    def _launch(self, sched, prev: InFlight | None) -> InFlight:
        loop = self.loop
        batch: Batch = sched.batch
        feed = prev.tokens_dev if prev is not None else None
        src = {id(r): i for i, r in enumerate(prev.out.batch.sampled)} if prev is not None else {}
        attach_feed(sched.msg.step, batch.decode, src)
        loop.feed = (src, feed)         # a bisecting re-run of part of the batch needs it too
        t0 = time.monotonic()
        try:
            sample = loop.rt.sampler.sample_device if not any(map(needs_host_history, batch.sampled)) else None
            out = loop.isolation.run(batch, lambda: loop.rt.runner.execute(sched.msg.step, feed=feed), sample)
        finally:
            loop.feed = None
        dev = out.device_tokens
        if dev is None and out.batch.sampled:
            dev = torch.tensor(out.tokens, dtype=torch.int64, device=loop.rt.device)
        f = InFlight(out, dev, t0)
        if dev is not None and dev.device.type == "cuda":
            f.host = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
            f.host.copy_(dev, non_blocking=True)
            f.ready = torch.cuda.Event()
            f.ready.record()
        limit, ending = loop.rt.max_model_len, set()
        with loop._lock:
            f.events = [loop.drop_failed(req, why, t0) for req, why in out.failed]
            for c in out.batch.prefill:
                c.request.num_computed_tokens = c.start + c.num_tokens
            for r in out.batch.sampled:
                r.output_token_ids.append(PLACEHOLDER)
                if r.num_output_tokens >= r.sampling.max_tokens or r.num_tokens >= limit:
                    ending.add(id(r))
        f.ending = frozenset(ending)
        return f

    # Postprocess -------------------------------------------------------------------------
    def _finalize(self, f: InFlight) -> None:
        loop = self.loop
        tokens = f.tokens()
        logprobs = f.out.logprobs or [None] * len(tokens)
        t1 = time.monotonic()
        with loop._lock:
            live = {id(r) for r in f.out.batch.sampled
                    if loop.requests.get(r.request_id) is r and not r.state.terminal}
            by_req = {id(r): (t, lp) for r, t, lp in zip(f.out.batch.sampled, tokens, logprobs) if id(r) in live}
            batch = Batch(prefill=[c for c in f.out.batch.prefill if _live(c.request, loop)],
                          decode=[r for r in f.out.batch.decode if id(r) in live])
            tails = {}
            for r in batch.sampled:
                ids = r.output_token_ids
                k = _trailing_placeholders(ids)
                if k == 0:
                    raise RuntimeError(f"request {r.request_id}: no placeholder for the token of its step")
                tails[id(r)] = ids[len(ids) - k + 1:]       # placeholders of the step after this one
                del ids[len(ids) - k:]
            rows = [by_req[id(r)] for r in batch.sampled]
            events = f.events + loop.postprocess(batch, [t for t, _ in rows], [lp for _, lp in rows], f.t0, t1)
            for r in batch.sampled:
                if tails[id(r)] and loop.requests.get(r.request_id) is r and not r.state.terminal:
                    r.output_token_ids.extend(tails[id(r)])
            loop.num_steps += 1
        loop.emit(events)


def attach_feed(step, decode, src: dict) -> None:
    """Mark the decode rows whose input token is a placeholder: their ids come from the previous
    step's sampled tokens (index `src[id(request)]`)."""
    rows = [src.get(id(r), -1) if r.output_token_ids and r.output_token_ids[-1] == PLACEHOLDER else -1
            for r in decode]
    for r, s in zip(decode, rows):
        if s < 0 and r.output_token_ids and r.output_token_ids[-1] == PLACEHOLDER:
            raise RuntimeError(f"request {r.request_id}: its last token is not known, and not in the step before")
    step.decode_src = rows if any(s >= 0 for s in rows) else None


def _trailing_placeholders(ids: list[int]) -> int:
    k = 0
    while k < len(ids) and ids[-1 - k] == PLACEHOLDER:
        k += 1
    return k


def _live(req, loop) -> bool:
    return loop.requests.get(req.request_id) is req and not req.state.terminal

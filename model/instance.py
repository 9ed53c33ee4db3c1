"""One instance runtime, three roles. `StepLoop` is the step every role runs, nano-vllm's shape:

    schedule (policy, under the lock) -> run (broadcast to the TP peers, model, sampler)
        -> postprocess (tokens into requests, under the lock) -> events out

`ColocatedWorker` is the colocated role (prefill and decode on one instance, prefill-first or
chunked): the in-process `LLM` drives it directly, a Ray actor drives it for `disagg serve`.
The prefill role (prefill_worker/) adds what happens after a prefill (stream the KV out, hold
it until the decode side confirmed); the decode role (decode_worker/) adds what happens before
a decode (reserve blocks, receive the KV). The model, KV cache, runner and sampler of every role
come from one builder, `RankRuntime` (model/rank_runtime.py).

`execute` is the one place a batch's model step runs, on every rank.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.batching import Batch, ColocatedPolicy, finish
from engine.block_manager import BlockManager
from engine.errors import InvalidRequestError, OverloadedError
from engine.events import Load, LoadChanged, RequestFailed, StepTokens, WorkerEvent
from engine.request import FinishReason, Request
from engine.sampling_params import SamplingParams
from model.async_step import AsyncStepper, async_scheduling_enabled, attach_feed
from model.rank_runtime import RankRuntime, WorkerConfig
from model.runner import StepInput
from model.step_isolation import StepIsolation, StepOutcome


@dataclass
class RequestSpec:
    """One request for an instance. `output_token_ids` is non-empty when the request is
    recomputed after a failure: the prefill then covers prompt + those tokens."""
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    output_token_ids: list[int] = field(default_factory=list)
    arrival_s: float = 0.0
    attempt: int = 0                       # echoed in events, so stale ones are recognised

    def to_request(self) -> Request:
        req = Request(self.request_id, list(self.prompt_token_ids), self.sampling, arrival_s=self.arrival_s)
        req.output_token_ids = list(self.output_token_ids)
        return req


@dataclass
class StepMsg:
    """What rank 0 broadcasts to its tensor-parallel peers each step."""
    step: StepInput
    sends: list = field(default_factory=list)     # prefill role: (peer, epoch, seq, source block ids)


@dataclass
class Scheduled:
    """One step, as decided under the lock: the batch, the message for every rank, and events
    to send before it runs."""
    batch: Batch
    msg: StepMsg
    events: list = field(default_factory=list)


class StepLoop:
    """The rank-0 step of any role, and the follower loop of ranks > 0. Subclasses provide
    `schedule` and `postprocess`; neither runs the model."""

    role = "base"
    supports_async = False      # roles whose steps can run one ahead (model/async_step.py)

    def __init__(self, cfg: WorkerConfig, tp_group=None, ctrl_group=None,
                 emit: Callable[[list[WorkerEvent]], None] | None = None, rt: RankRuntime | None = None):
        self.cfg = cfg
        self.rt = rt or RankRuntime(cfg, tp_group, ctrl_group)
        self.emit = emit or (lambda events: None)
        self.requests: dict[str, Request] = {}
        self._lock = threading.Lock()
        self.wake = threading.Event()
        self.num_steps = 0
        # A request that makes the step fail fails alone. Re-running part of a batch needs every
        # rank to follow, so with tensor/pipeline parallelism only sampling failures are isolated.
        single = cfg.tp * cfg.pp == 1
        self.isolation = StepIsolation(self.rt.sample, self.rerun if single else None)
        self.feed = None            # async: (request id() -> index, tokens) of the step before
        on = self.supports_async and async_scheduling_enabled(cfg.async_scheduling, self.rt.device, cfg.tp, cfg.pp)
        self.async_steps = AsyncStepper(self) if on else None

    def step(self) -> bool:
        """One step. Returns False when there was nothing to do. With async scheduling the
        step's tokens are postprocessed during the next call (or by `flush`)."""
        if self.async_steps is not None:
            return self.async_steps.step()
        with self._lock:
            sched = self.schedule(time.monotonic())
        if sched is None:
            return False
        self.emit(sched.events)
        t0 = time.monotonic()
        out = self.run(sched)
        t1 = time.monotonic()
        with self._lock:
            events = [self.drop_failed(req, why, t1) for req, why in out.failed]
            events += self.postprocess(out.batch, out.tokens, out.logprobs, t0, t1)
            self.num_steps += 1
        self.emit(events)
        return True

    def run(self, sched: Scheduled) -> StepOutcome:
        """The batch's model step on rank 0: hand it to the TP peers, run the forward, sample
        one token per sampled request (with its logprobs entry, or None); a request that makes
        it fail is isolated (model/step_isolation.py): the outcome's batch leaves it out. The
        one place a scheduled batch runs; the profiler times exactly this."""
        self.rt.broadcast(sched.msg)
        return self.isolation.run(sched.batch, lambda: self.execute(sched.msg))

    def execute(self, msg: StepMsg):
        """Run one step's model forward on this rank; rank 0 gets the logits."""
        return self.rt.runner.execute(msg.step)

    def rerun(self, batch: Batch):
        """Run part of a failed step again on this (only) rank: no events, no KV sends."""
        step = StepInput.from_batch(batch)
        if self.feed is None:
            return self.rt.runner.execute(step)
        attach_feed(step, batch.decode, self.feed[0])
        return self.rt.runner.execute(step, feed=self.feed[1])

    def flush(self) -> None:
        """Finish a step still in flight (async scheduling): call before stopping the loop."""
        if self.async_steps is not None:
            self.async_steps.flush()

    def can_run_ahead(self, exclude: frozenset[int] = frozenset()) -> bool:
        """Whether the next step (leaving out `exclude`) may be scheduled before the one in
        flight is postprocessed (under the lock)."""
        return False

    def drop_failed(self, req: Request, why: str, now: float) -> RequestFailed:
        """A request that made the step fail (under the lock): drop it and free its blocks
        (never cached: they hold junk)."""
        self.requests.pop(req.request_id, None)
        self.policy.release(req)
        if not req.state.terminal:
            finish(req, FinishReason.ERROR, now)
        return RequestFailed(request_id=req.request_id, message=why, time=now)

    def schedule(self, now: float) -> Scheduled | None:
        raise NotImplementedError

    def postprocess(self, batch: Batch, tokens: list[int], logprobs: list, t0: float, t1: float) -> list[WorkerEvent]:
        """Tokens into their requests (under the lock); returns the events to send."""
        raise NotImplementedError

    def follow(self, stop: threading.Event) -> None:
        """Loop of a rank > 0: run every step rank 0 broadcasts, until it broadcasts None."""
        while not stop.is_set():
            msg = self.rt.broadcast(None)
            if msg is None:
                return
            self.execute(msg)

    def stop_followers(self) -> None:
        self.rt.broadcast(None)

    def close(self) -> None:
        """Release what the role holds beside the model (KV channels)."""

    def busy(self) -> str:
        """What this rank still holds for requests ("" when nothing): a role change waits for ""."""
        with self._lock:
            return f"{len(self.requests)} requests" if self.requests else ""

    def check_fits(self, req: Request, bm: BlockManager) -> None:
        if bm.blocks_for(req.num_tokens) > bm.num_blocks:
            raise InvalidRequestError("prompt", f"{req.num_tokens} tokens do not fit this instance's KV cache "
                                      f"({bm.num_blocks} blocks of {bm.block_size})")


class ColocatedWorker(StepLoop):
    """Prefill and decode on one instance, continuous batching. Every step's new tokens leave
    as one `tokens` event carrying the instance's load. Cancels of running requests apply
    between steps (their blocks may be in the batch that runs now)."""

    role = "colocated"
    supports_async = True

    def __init__(self, cfg: WorkerConfig, tp_group=None, ctrl_group=None,
                 emit: Callable[[list[WorkerEvent]], None] | None = None, enable_prefix_caching: bool | None = None,
                 rt: RankRuntime | None = None):
        super().__init__(cfg, tp_group, ctrl_group, emit, rt)
        caching = cfg.enable_prefix_caching if enable_prefix_caching is None else enable_prefix_caching
        self.bm = BlockManager(self.rt.num_blocks, cfg.block_size, caching)
        self.policy = ColocatedPolicy(self.bm, cfg.max_batch_tokens, cfg.max_batch_size, cfg.schedule,
                                      cfg.chunk_tokens)
        self._cancelled: set[str] = set()
        self.num_decoded_tokens = 0
        self.num_preemptions = 0

    def add(self, spec: RequestSpec) -> Request:
        """Queue a request (raises InvalidRequestError or OverloadedError, leaving nothing)."""
        return self.add_request(spec.to_request())

    def add_request(self, req: Request) -> Request:
        self.check_fits(req, self.bm)
        with self._lock:
            if req.request_id in self.requests:
                raise InvalidRequestError("request_id", f"{req.request_id!r} is already on this instance")
            if len(self.policy.prefill.waiting) >= self.cfg.max_queue:
                raise OverloadedError(f"instance {self.cfg.instance_id} has {self.cfg.max_queue} queued requests")
            self.requests[req.request_id] = req
            self.policy.add(req, time.monotonic())
        self.wake.set()
        return req

    def cancel(self, request_id: str) -> bool:
        """Drop a request: at the next step boundary (or at once when called between steps by
        the thread that steps, with `apply_cancels`)."""
        with self._lock:
            if request_id not in self.requests:
                return False
            self._cancelled.add(request_id)
        self.wake.set()
        return True

    def apply_cancels(self) -> None:
        with self._lock:
            self._apply_cancels(time.monotonic())

    def _apply_cancels(self, now: float) -> None:
        for rid in self._cancelled:
            req = self.requests.pop(rid, None)
            if req is not None:
                self.policy.release(req)
                if not req.state.terminal:
                    finish(req, FinishReason.CANCELLED, now)
        self._cancelled.clear()

    def can_run_ahead(self, exclude: frozenset[int] = frozenset()) -> bool:
        # No preemption: it recomputes a request from its tokens, which must all be known. The
        # blocks are counted for exactly the requests the schedule will take. (A step with
        # requests whose sampling reads the history is finished as soon as it is launched, so
        # the step in flight never holds one.)
        return self.policy.decode.blocks_needed(1, exclude) <= self.bm.num_free_blocks

    def schedule(self, now: float, exclude: frozenset[int] = frozenset()) -> Scheduled | None:
        """exclude: id() of running requests to leave out (async: they end in the step in flight)."""
        cancelled = bool(self._cancelled)
        if cancelled:
            self._apply_cancels(now)
        batch = self.policy.schedule(now, exclude)
        self.num_preemptions += len(batch.preempted)
        if batch.empty:
            if cancelled:       # blocks came free with no step to report them
                self.emit([LoadChanged(time=now, load=self.load())])
            return None
        return Scheduled(batch, StepMsg(StepInput.from_batch(batch)))

    def postprocess(self, batch: Batch, tokens: list[int], logprobs: list, t0: float, t1: float) -> list[WorkerEvent]:
        new, finished, done, lps = {}, {}, [], {}
        for req, tok, lp in zip(batch.sampled, tokens, logprobs):
            if req.request_id not in self.requests:       # cancelled during the step
                continue
            new[req.request_id] = [tok]
            if lp is not None:
                lps[req.request_id] = [lp]
            req.mark("first_token", t1)
            if req.append_token(tok, self.rt.model_config.eos_token_id, self.rt.max_model_len):
                done.append(req)
                finished[req.request_id] = req.finish_reason.value
        self.policy.complete(batch, done, t1)
        for req in done:
            finish(req, req.finish_reason, t1)
            del self.requests[req.request_id]
        self.num_decoded_tokens += len(new)
        cached = {c.request.request_id: c.request.num_cached_tokens for c in batch.prefill
                  if c.is_last and c.request.request_id in new}
        return [StepTokens(tokens=new, finished=finished, batch_size=len(batch.sampled), logprobs=lps, time=t1,
                           load=self.load(), num_cached_tokens=cached)]

    def load(self) -> Load:
        """What the router needs, sent with every event (call under the lock)."""
        return Load(self.bm.num_free_blocks, len(self.policy.decode.running), len(self.policy.prefill.waiting),
                    self.policy.prefill.num_waiting_tokens)

    def free_blocks(self) -> int:
        with self._lock:
            return self.bm.num_free_blocks

    def stats(self) -> dict:
        with self._lock:
            out = {"role": self.role, "instance_id": self.cfg.instance_id, **dataclasses.asdict(self.load()),
                   "used_blocks": self.bm.num_used_blocks, "num_blocks": self.bm.num_blocks,
                   "num_steps": self.num_steps, "num_decoded_tokens": self.num_decoded_tokens,
                   "num_preemptions": self.num_preemptions, "prefix_hit_tokens": self.bm.num_prefix_hit_tokens,
                   "async_scheduling": self.async_steps is not None}
            if self.async_steps is not None:
                out["num_overlapped_steps"] = self.async_steps.num_overlapped
        out.update(self.rt.stats())
        return out

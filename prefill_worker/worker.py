"""PrefillWorker: batches prompts FCFS under a token budget, runs prefill, sends the KV to the
decode instance chosen by the controller (layer by layer, while later layers still compute),
and returns the first token.

Rank 0 (the driver) owns the scheduler and block tables and hands each step to its
tensor-parallel peers; every rank sends its own shard of the KV. A request's blocks stay held
after its prefill until the controller calls `release` (the decode side confirmed, or the
transfer failed): a prefill instance whose KV waits stops admitting, which is the
back-pressure of DESIGN.md.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.batching import Batch, PrefillPolicy, finish
from engine.block_manager import BlockManager
from engine.errors import InvalidRequestError, OverloadedError
from engine.events import FirstToken, KVScheduled, Load, RequestFailed, WorkerEvent
from engine.request import FinishReason, RequestState
from kv_transfer.agent import KVSender
from model.instance import RequestSpec, Scheduled, StepLoop, StepMsg
from model.rank_runtime import LayerProgress, WorkerConfig
from model.runner import StepInput
from model.step_isolation import StepOutcome


@dataclass
class PrefillSpec(RequestSpec):
    """A request for a prefill instance: where its KV goes."""
    peer: str = ""                                          # decode instance that receives the KV
    dst_block_ids: list[int] = field(default_factory=list)  # blocks reserved there


class PrefillWorker(StepLoop):
    role = "prefill"

    def __init__(self, cfg: WorkerConfig, tp_group=None, ctrl_group=None,
                 emit: Callable[[list[WorkerEvent]], None] | None = None, rt=None):
        super().__init__(cfg, tp_group, ctrl_group, emit, rt)
        self.kv = KVSender(self.rt.kv_cache, self.rt.layout, cfg.rank, cfg.kv_timeout_s, cfg.kv_layer_groups)
        self.bm = BlockManager(self.rt.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.policy = PrefillPolicy(self.bm, cfg.max_batch_tokens, cfg.max_batch_size)
        self.specs: dict[str, PrefillSpec] = {}
        self.held: dict = {}                           # prefilled, KV held until release
        self._release_after_step: set[str] = set()     # released while their prefill ran
        self._seq: dict[tuple[str, int], int] = {}
        self.num_prefilled_tokens = 0

    # Driver API (rank 0) -----------------------------------------------------------------
    def add(self, spec: PrefillSpec) -> None:
        if spec.request_id in self.requests:
            raise InvalidRequestError("request_id", f"{spec.request_id!r} is already on this instance")
        req = spec.to_request()
        self.check_fits(req, self.bm)
        with self._lock:
            if len(self.policy.waiting) >= self.cfg.max_queue:
                raise OverloadedError(f"prefill instance {self.cfg.instance_id} has {self.cfg.max_queue} queued requests")
            self.specs[req.request_id] = spec
            self.requests[req.request_id] = req
            self.policy.add(req, time.monotonic())
        self.wake.set()

    def cancel(self, request_id: str) -> bool:
        """Drop a request that has not started prefill. One that has is released by the
        controller once its transfer ends (its KV may still be leaving)."""
        with self._lock:
            req = self.requests.get(request_id)
            if req is None or req.state is not RequestState.QUEUED:
                return False
            self.policy.remove(req)
            if req.block_ids:
                self.bm.free(req.block_ids)
            finish(req, FinishReason.CANCELLED, time.monotonic())
            self._forget(request_id)
            return True

    def release(self, request_id: str) -> bool:
        """The transfer ended (confirmed or failed): free the held blocks. A request whose
        prefill is still running is freed as soon as its step ends; one still queued is
        dropped now."""
        with self._lock:
            req = self.held.pop(request_id, None)
            if req is None:
                live = self.requests.get(request_id)
                if live is None:
                    return False
                if live.state is RequestState.PREFILLING:
                    self._release_after_step.add(request_id)
                    return True
            else:
                self.bm.free(req.block_ids)
                self._forget(request_id)
        if req is None:
            return self.cancel(request_id)
        self.wake.set()
        return True

    def _forget(self, request_id):
        self.specs.pop(request_id, None)
        self.requests.pop(request_id, None)

    def queued_tokens(self) -> int:
        with self._lock:
            return self.policy.num_waiting_tokens

    # The step (rank 0) ----------------------------------------------------------------
    def schedule(self, now: float) -> Scheduled | None:
        chunks = self.policy.schedule(now)
        if not chunks:
            return None
        sends, scheduled = [], []
        for c in chunks:
            req, spec = c.request, self.specs[c.request.request_id]
            epoch = self.kv.epochs.get(spec.peer, -1)
            seq = self._seq.get((spec.peer, epoch), 0)
            self._seq[(spec.peer, epoch)] = seq + 1
            n = self.bm.blocks_for(req.num_tokens)
            sends.append((spec.peer, epoch, seq, req.block_ids[:n]))
            # The controller tells the decode ranks to receive as soon as this arrives.
            scheduled.append(KVScheduled(request_id=req.request_id, peer=spec.peer, epoch=epoch, seq=seq,
                                         num_blocks=n, num_tokens=req.num_tokens,
                                         num_cached_tokens=req.num_cached_tokens, attempt=spec.attempt, time=now))
        batch = Batch(prefill=chunks)
        return Scheduled(batch, StepMsg(StepInput.from_batch(batch), sends), scheduled)

    def postprocess(self, batch: Batch, tokens: list[int], logprobs: list, t0: float, t1: float) -> list[WorkerEvent]:
        events = []
        self.policy.complete(batch.prefill)           # their KV is computed: prefix hits from now on
        for req, tok, lp in zip(batch.sampled, tokens, logprobs):
            done = req.append_token(tok, self.rt.model_config.eos_token_id, self.rt.max_model_len)
            req.transition(RequestState.TRANSFERRING)
            req.mark("prefill_end", t1)
            if req.request_id in self._release_after_step:
                self._release_after_step.discard(req.request_id)
                self.bm.free(req.block_ids)
                self._forget(req.request_id)
                continue
            self.held[req.request_id] = req
            events.append(FirstToken(request_id=req.request_id, token_id=tok, attempt=self.specs[req.request_id].attempt,
                                     finish_reason=req.finish_reason.value if done else None,
                                     prefill_queue_s=req.times["prefill_start"] - req.times["queued"],
                                     prefill_compute_s=t1 - t0, logprobs=lp, time=t1, load=self.load()))
        self.num_prefilled_tokens += batch.num_prefill_tokens
        return events

    def execute(self, msg: StepMsg):
        """The prefill, with this rank's KV leaving layer by layer as the layers finish."""
        progress = self._queue_sends(msg)
        try:
            return self.rt.runner.execute(msg.step, layer_hook=progress.mark)
        except Exception as e:
            progress.fail(repr(e))
            raise

    def run(self, sched: Scheduled) -> StepOutcome:
        """Rank 0. When the step fails, the sends wait while the batch is bisected (re-runs
        send nothing and mark no layer: a send must never read a layer that a later re-run has
        still to write), then go: a request that failed alone sends junk, which its decode side
        drains and frees."""
        self.rt.broadcast(sched.msg)
        progress = self._queue_sends(sched.msg)
        try:
            out = self.isolation.run(sched.batch,
                                     lambda: self.rt.runner.execute(sched.msg.step, layer_hook=progress.mark))
        except Exception as e:
            progress.fail(repr(e))
            raise
        first, end = self.kv.owner.layers
        progress.mark(end - first - 1)          # every layer is in the cache now
        return out

    def _queue_sends(self, msg: StepMsg) -> LayerProgress:
        progress = LayerProgress(self.kv.owner.layers[0], self.rt.device)
        for peer, epoch, seq, blocks in msg.sends:
            self.kv.send(peer, epoch, seq, blocks, progress.wait)
        return progress

    def drop_failed(self, req, why: str, now: float) -> RequestFailed:
        """A request that made the step fail: its blocks hold junk, so they are not cached; they
        are held like any prefilled request's until the controller releases them (its sends
        still go through the channel, in order)."""
        finish(req, FinishReason.ERROR, now)
        if req.request_id in self._release_after_step:
            self._release_after_step.discard(req.request_id)
            self.bm.free(req.block_ids)
            self._forget(req.request_id)
        else:
            self.held[req.request_id] = req
        spec = self.specs.get(req.request_id)
        return RequestFailed(request_id=req.request_id, message=why, attempt=spec.attempt if spec else -1, time=now)

    def load(self) -> Load:
        return Load(self.bm.num_free_blocks, 0, len(self.policy.waiting), self.policy.num_waiting_tokens)

    def close(self) -> None:
        self.kv.close()

    def busy(self) -> str:
        with self._lock:
            n = len(self.requests) + len(self.held)
            return f"{len(self.requests)} requests, {len(self.held)} holding KV" if n else ""

    def stats(self) -> dict:
        with self._lock:
            out = {"role": "prefill", "instance_id": self.cfg.instance_id,
                   "num_waiting": len(self.policy.waiting), "queued_tokens": self.policy.num_waiting_tokens,
                   "num_held": len(self.held), "free_blocks": self.bm.num_free_blocks,
                   "used_blocks": self.bm.num_used_blocks, "num_blocks": self.bm.num_blocks,
                   "num_steps": self.num_steps, "num_prefilled_tokens": self.num_prefilled_tokens,
                   "prefix_hit_tokens": self.bm.num_prefix_hit_tokens}
        out.update(self.kv.stats())
        out.update(self.rt.stats())
        return out

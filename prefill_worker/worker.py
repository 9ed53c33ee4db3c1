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

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.batching import Batch, PrefillPolicy, finish
from engine.block_manager import BlockManager
from engine.errors import InvalidRequestError, OverloadedError
from engine.request import FinishReason, Request, RequestState
from engine.sampling_params import SamplingParams
from kv_transfer.agent import KVSender
from model.rank_runtime import LayerProgress, RankRuntime, WorkerConfig
from model.runner import StepInput
from model.step_isolation import StepIsolation


@dataclass
class PrefillSpec:
    """One request for a prefill instance. `output_token_ids` is non-empty when the request is
    recomputed after a failure: the prefill then covers prompt + those tokens."""
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    peer: str                              # decode instance that receives the KV
    dst_block_ids: list[int]               # blocks reserved there
    output_token_ids: list[int] = field(default_factory=list)
    arrival_s: float = 0.0
    attempt: int = 0                       # echoed in events, so stale ones are recognised


@dataclass
class _StepMsg:
    step: StepInput
    sends: list[tuple[str, int, int, list[int]]]    # (peer, epoch, seq, source block ids)


class PrefillWorker:
    def __init__(self, cfg: WorkerConfig, tp_group=None, ctrl_group=None,
                 emit: Callable[[list[dict]], None] | None = None, max_queue: int = 1024):
        self.cfg = cfg
        self.rt = RankRuntime(cfg, tp_group, ctrl_group)
        self.kv = KVSender(self.rt.kv_cache, self.rt.layout, cfg.rank, cfg.kv_timeout_s, cfg.kv_layer_groups)
        self.emit = emit or (lambda events: None)
        self.max_queue = max_queue
        self.bm = BlockManager(self.rt.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.policy = PrefillPolicy(self.bm, cfg.max_batch_tokens, cfg.max_batch_size)
        self.specs: dict[str, PrefillSpec] = {}
        self.requests: dict[str, Request] = {}
        self.held: dict[str, Request] = {}             # prefilled, KV held until release
        self._release_after_step: set[str] = set()     # released while their prefill ran
        self._seq: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self.wake = threading.Event()
        self.num_prefilled_tokens = 0
        self.num_steps = 0
        # A request that makes the step fail fails alone (see model/step_isolation.py). A re-run
        # sends nothing and marks no layer: the first try's sends wait until it is over.
        world = cfg.tp * cfg.pp
        self._first: tuple[_StepMsg, LayerProgress] | None = None
        self.isolation = StepIsolation(lambda batch: self._execute(*self._first), self._sample,
                                       self._rerun if world == 1 else None)

    # Driver API (rank 0) -----------------------------------------------------------------
    def add(self, spec: PrefillSpec) -> None:
        if spec.request_id in self.requests:
            raise InvalidRequestError("request_id", f"{spec.request_id!r} is already on this instance")
        req = Request(spec.request_id, list(spec.prompt_token_ids), spec.sampling, arrival_s=spec.arrival_s)
        req.output_token_ids = list(spec.output_token_ids)
        if self.bm.blocks_for(req.num_tokens) > self.bm.num_blocks:
            raise InvalidRequestError("prompt", f"{req.num_tokens} tokens do not fit this instance's KV cache")
        with self._lock:
            if len(self.policy.waiting) >= self.max_queue:
                raise OverloadedError(f"prefill instance {self.cfg.instance_id} has {self.max_queue} queued requests")
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
    def step(self) -> bool:
        """One prefill batch. Returns False when there was nothing to run."""
        now = time.monotonic()
        with self._lock:
            chunks = self.policy.schedule(now)
            if not chunks:
                return False
            sends, scheduled = [], []
            for c in chunks:
                req, spec = c.request, self.specs[c.request.request_id]
                epoch = self.kv.epochs.get(spec.peer, -1)
                seq = self._seq.get((spec.peer, epoch), 0)
                self._seq[(spec.peer, epoch)] = seq + 1
                n = self.bm.blocks_for(req.num_tokens)
                sends.append((spec.peer, epoch, seq, req.block_ids[:n]))
                scheduled.append({"type": "scheduled", "request_id": req.request_id, "peer": spec.peer,
                                  "epoch": epoch, "seq": seq, "num_blocks": n, "num_tokens": req.num_tokens,
                                  "num_cached_tokens": req.num_cached_tokens, "attempt": spec.attempt,
                                  "time": now})
        self.emit(scheduled)          # the controller tells the decode ranks to receive now
        batch = Batch(prefill=chunks)
        msg = _StepMsg(StepInput.from_batch(batch), sends)
        self.rt.broadcast(msg)
        t0 = time.monotonic()
        progress = self._first_progress(msg)
        self._first = (msg, progress)
        try:
            out = self.isolation.run(batch)
        except Exception as e:
            progress.fail(repr(e))
            raise
        finally:
            self._first = None
        self._all_layers_done(progress)
        chunks, tokens, logprobs = out.batch.prefill, out.tokens, out.logprobs
        reqs = [c.request for c in chunks]
        t1 = time.monotonic()
        events = self._fail_requests(out.failed, t1)
        with self._lock:
            self.policy.complete(chunks)           # their KV is computed: prefix hits from now on
            for req, tok, lp in zip(reqs, tokens, logprobs):
                done = req.append_token(tok, self.rt.model_config.eos_token_id, self.rt.max_model_len)
                req.transition(RequestState.TRANSFERRING)
                req.mark("prefill_end", t1)
                if req.request_id in self._release_after_step:
                    self._release_after_step.discard(req.request_id)
                    self.bm.free(req.block_ids)
                    self._forget(req.request_id)
                    continue
                self.held[req.request_id] = req
                events.append({"type": "token", "request_id": req.request_id, "token_id": tok,
                               "attempt": self.specs[req.request_id].attempt,
                               "finish_reason": req.finish_reason.value if done else None,
                               "prefill_queue_s": req.times["prefill_start"] - req.times["queued"],
                               "prefill_compute_s": t1 - t0, "time": t1, "logprobs": lp})
            self.num_prefilled_tokens += sum(c.num_tokens for c in chunks)
            self.num_steps += 1
        self.emit(events)
        return True

    def _first_progress(self, msg: _StepMsg) -> LayerProgress:
        """Queue the step's KV sends, which go out layer by layer as the layers are computed."""
        progress = LayerProgress(self.kv.owner.layers[0], self.rt.device)
        for peer, epoch, seq, blocks in msg.sends:
            self.kv.send(peer, epoch, seq, blocks, progress.wait)
        return progress

    def _all_layers_done(self, progress: LayerProgress) -> None:
        """After a step (and any re-runs, which mark no layer): every layer is in the cache."""
        first, end = self.kv.owner.layers
        progress.mark(end - first - 1)

    def _execute(self, msg: _StepMsg, progress: LayerProgress):
        return self.rt.runner.execute(msg.step, layer_hook=progress.mark)

    def _rerun(self, batch: Batch):
        return self.rt.runner.execute(StepInput.from_batch(batch))

    def _sample(self, logits, reqs):
        return self.rt.sampler.sample_requests(logits, reqs)

    def _fail_requests(self, failed, now: float) -> list[dict]:
        """Requests that made the step fail: their blocks hold junk, so they are not cached, and
        are held like any prefilled request until the controller releases them (their sends
        still drain through the channel, in order)."""
        events = []
        with self._lock:
            for req, why in failed:
                finish(req, FinishReason.ERROR, now)
                if req.request_id in self._release_after_step:
                    self._release_after_step.discard(req.request_id)
                    self.bm.free(req.block_ids)
                    self._forget(req.request_id)
                else:
                    self.held[req.request_id] = req
                events.append({"type": "request_failed", "request_id": req.request_id, "message": why,
                               "attempt": self.specs[req.request_id].attempt if req.request_id in self.specs else -1,
                               "time": now})
        return events

    # Peer ranks ---------------------------------------------------------------------------
    def follow(self, stop: threading.Event) -> None:
        """Loop of a rank > 0: run every step rank 0 broadcasts, until it broadcasts None."""
        while not stop.is_set():
            msg = self.rt.broadcast(None)
            if msg is None:
                return
            progress = self._first_progress(msg)
            try:
                self._execute(msg, progress)
            except Exception as e:
                progress.fail(repr(e))
                raise
            self._all_layers_done(progress)

    def stop_followers(self) -> None:
        self.rt.broadcast(None)

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

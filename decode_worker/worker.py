"""DecodeWorker: reserves blocks for incoming KV, receives it, and decodes with continuous
batching, streaming every running request's new tokens as one event per step.

When blocks run out mid-decode, the newest requests are preempted and recomputed here from
prompt + tokens so far (the same ColocatedPolicy the in-process engine uses; its prefill queue
only ever holds such recomputes).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from engine.batching import ColocatedPolicy, finish
from engine.block_manager import BlockManager
from engine.errors import InvalidRequestError
from engine.request import FinishReason, Request, RequestState
from engine.sampling_params import SamplingParams
from kv_transfer.agent import KVReceiver
from model.rank_runtime import RankRuntime, WorkerConfig
from model.runner import StepInput
from model.step_isolation import StepIsolation


class DecodeWorker:
    def __init__(self, cfg: WorkerConfig, tp_group=None, ctrl_group=None,
                 emit: Callable[[list[dict]], None] | None = None):
        self.cfg = cfg
        self.rt = RankRuntime(cfg, tp_group, ctrl_group)
        self.kv = KVReceiver(self.rt.kv_cache, self.rt.layout, cfg.rank, cfg.kv_timeout_s, cfg.kv_layer_groups)
        self.emit = emit or (lambda events: None)
        self.bm = BlockManager(self.rt.num_blocks, cfg.block_size, enable_prefix_caching=False)
        self.policy = ColocatedPolicy(self.bm, cfg.max_batch_tokens, cfg.max_batch_size, "prefill_first")
        self.reservations: dict[str, list[int]] = {}
        self.requests: dict[str, Request] = {}
        self._cancelled: set[str] = set()        # applied between steps by the step thread
        self._lock = threading.Lock()
        self.wake = threading.Event()
        self.num_steps = 0
        self.num_decoded_tokens = 0
        self.num_preemptions = 0
        # A request that makes the step fail fails alone; re-running a sub-batch needs every
        # rank to follow it, so with tensor parallelism only sampling failures are isolated.
        world = cfg.tp * cfg.pp
        self.isolation = StepIsolation(self._execute, self._sample, self._execute if world == 1 else None)

    # Driver API (rank 0) -----------------------------------------------------------------
    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Blocks for `num_tokens` tokens (the prefilled tokens plus the first sampled one),
        or None when they are not free now."""
        with self._lock:
            if request_id in self.reservations or request_id in self.requests:
                raise InvalidRequestError("request_id", f"{request_id!r} already has blocks here")
            n = self.bm.blocks_for(num_tokens)
            if n > self.bm.num_free_blocks:
                return None
            self.reservations[request_id] = self.bm.allocate_blocks(n)
            return list(self.reservations[request_id])

    def free_blocks(self) -> int:
        with self._lock:
            return self.bm.num_free_blocks

    def start(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
              sampling: SamplingParams, arrival_s: float = 0.0) -> None:
        """The KV of every token but the last is in the reserved blocks: join the running batch."""
        with self._lock:
            blocks = self.reservations.pop(request_id)
            req = Request(request_id, list(prompt_token_ids), sampling, arrival_s=arrival_s)
            req.output_token_ids = list(output_token_ids)
            req.state = RequestState.TRANSFERRING
            req.block_ids = blocks
            req.num_computed_tokens = req.num_tokens - 1
            self.requests[request_id] = req
            self.policy.decode.add(req, time.monotonic())
        self.wake.set()

    def release(self, request_id: str) -> bool:
        """Give back a reservation whose request will not decode here (transfer failed, or the
        request ended at its first token or was cancelled)."""
        with self._lock:
            blocks = self.reservations.pop(request_id, None)
            if blocks is None:
                return False
            self.bm.free(blocks)
            return True

    def cancel(self, request_id: str) -> bool:
        """Drop a reservation now, or a running request at the next step boundary (its blocks
        may be in the batch that is running right now)."""
        with self._lock:
            if request_id in self.reservations:
                self.bm.free(self.reservations.pop(request_id))
                return True
            if request_id not in self.requests:
                return False
            self._cancelled.add(request_id)
        self.wake.set()
        return True

    def _apply_cancels(self, now: float) -> None:
        for rid in self._cancelled:
            req = self.requests.pop(rid, None)
            if req is not None:
                self.policy.release(req)
                if not req.state.terminal:
                    finish(req, FinishReason.CANCELLED, now)
        self._cancelled.clear()

    # All ranks: receive one request's KV (blocks until done) ------------------------------
    def receive(self, peer: str, epoch: int, seq: int, block_ids: list[int]) -> None:
        self.kv.receive(peer, epoch, seq, block_ids)

    # The step (rank 0) ----------------------------------------------------------------
    def step(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if self._cancelled:
                self._apply_cancels(now)
            batch = self.policy.schedule(now)
            self.num_preemptions += len(batch.preempted)
            if batch.empty:
                return False
        out = self.isolation.run(batch)
        batch, tokens, logprobs = out.batch, out.tokens, out.logprobs
        sampled = batch.sampled
        now = time.monotonic()
        new, finished, lps, failed = {}, {}, {}, {}
        with self._lock:
            for req, why in out.failed:
                failed[req.request_id] = why
                self.requests.pop(req.request_id, None)
                self.policy.release(req)
                if not req.state.terminal:
                    finish(req, FinishReason.ERROR, now)
            done = []
            for req, tok, lp in zip(sampled, tokens, logprobs):
                if req.request_id not in self.requests:       # cancelled during the step
                    continue
                new[req.request_id] = [tok]
                if lp is not None:
                    lps[req.request_id] = [lp]
                if req.append_token(tok, self.rt.model_config.eos_token_id, self.rt.max_model_len):
                    done.append(req)
                    finished[req.request_id] = req.finish_reason.value
            self.policy.complete(batch, done, now)
            for req in done:
                finish(req, req.finish_reason, now)
                del self.requests[req.request_id]
            self.num_steps += 1
            self.num_decoded_tokens += len(new)
            free = self.bm.num_free_blocks
        ev = {"type": "tokens", "tokens": new, "finished": finished, "free_blocks": free,
              "batch_size": len(sampled), "time": now}
        if lps:
            ev["logprobs"] = lps
        if failed:
            ev["failed"] = failed
        self.emit([ev])
        return True

    def _execute(self, batch):
        step = StepInput.from_batch(batch)
        self.rt.broadcast(step)
        return self.rt.runner.execute(step)

    def _sample(self, logits, requests):
        return self.rt.sampler.sample_requests(logits, requests)

    def follow(self, stop: threading.Event) -> None:
        while not stop.is_set():
            step = self.rt.broadcast(None)
            if step is None:
                return
            self.rt.runner.execute(step)

    def stop_followers(self) -> None:
        self.rt.broadcast(None)

    def stats(self) -> dict:
        with self._lock:
            out = {"role": "decode", "instance_id": self.cfg.instance_id,
                   "num_running": len(self.policy.decode.running), "num_waiting": len(self.policy.prefill.waiting),
                   "num_reserved": len(self.reservations), "free_blocks": self.bm.num_free_blocks,
                   "used_blocks": self.bm.num_used_blocks, "num_blocks": self.bm.num_blocks,
                   "num_steps": self.num_steps, "num_decoded_tokens": self.num_decoded_tokens,
                   "num_preemptions": self.num_preemptions}
        out.update(self.kv.stats())
        out.update(self.rt.stats())
        return out

"""DecodeWorker: the decode role of the one instance runtime. Before a request decodes here,
it reserves blocks for the incoming KV and receives it; then it joins the colocated step loop
(model/instance.py), which streams every running request's new tokens as one event per step.

When blocks run out mid-decode, the newest requests are preempted and recomputed here from
prompt + tokens so far (the colocated policy's prefill queue only ever holds such recomputes).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from engine.errors import InvalidRequestError
from engine.events import LoadChanged, WorkerEvent
from engine.request import Request, RequestState
from engine.sampling_params import SamplingParams
from kv_transfer.agent import KVReceiver
from model.instance import ColocatedWorker
from model.rank_runtime import WorkerConfig


class DecodeWorker(ColocatedWorker):
    role = "decode"

    def __init__(self, cfg: WorkerConfig, tp_group=None, ctrl_group=None,
                 emit: Callable[[list[WorkerEvent]], None] | None = None, rt=None):
        super().__init__(cfg, tp_group, ctrl_group, emit, enable_prefix_caching=False, rt=rt)
        self.kv = KVReceiver(self.rt.kv_cache, self.rt.layout, cfg.rank, cfg.kv_timeout_s, cfg.kv_layer_groups)
        self.reservations: dict[str, list[int]] = {}
        # Reservations cancelled before their start call arrived (the last few: a start comes
        # right after its receive, or never).
        self._cancelled_reservations: deque[str] = deque(maxlen=1024)

    # Before decoding (rank 0) ----------------------------------------------------------------
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

    def start(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
              sampling: SamplingParams, arrival_s: float = 0.0) -> None:
        """The KV of every token but the last is in the reserved blocks: join the running batch."""
        with self._lock:
            blocks = self.reservations.pop(request_id, None)
            if blocks is None:
                if request_id in self._cancelled_reservations:
                    # Cancelled while this call was on its way (the controller moves a request to
                    # DECODING before it calls start; a hand-over or a failure may cancel it then).
                    self._cancelled_reservations.remove(request_id)
                    return
                raise KeyError(f"{request_id!r} has no reservation on {self.cfg.instance_id}")
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
            self.emit([LoadChanged(time=time.monotonic(), load=self.load())])
            return True

    def cancel(self, request_id: str) -> bool:
        """Drop a reservation now, or a running request at the next step boundary."""
        with self._lock:
            if request_id in self.reservations:
                self.bm.free(self.reservations.pop(request_id))
                self._cancelled_reservations.append(request_id)
                self.emit([LoadChanged(time=time.monotonic(), load=self.load())])
                return True
        return super().cancel(request_id)

    # All ranks: receive one request's KV (blocks until done) ------------------------------
    def receive(self, peer: str, epoch: int, seq: int, block_ids: list[int]) -> None:
        self.kv.receive(peer, epoch, seq, block_ids)

    def close(self) -> None:
        self.kv.close()

    def busy(self) -> str:
        with self._lock:
            n = len(self.requests) + len(self.reservations)
            return f"{len(self.requests)} requests, {len(self.reservations)} reservations" if n else ""

    def stats(self) -> dict:
        out = super().stats()
        with self._lock:
            out["num_reserved"] = len(self.reservations)
        out.update(self.kv.stats())
        return out

"""The Ray actor that hosts one rank of an instance, in any role (colocated, prefill, decode).

The roles are plain classes (model/instance.py, prefill_worker/, decode_worker/); this wraps
one in a threaded actor: a loop thread runs the
worker's steps (rank 0) or follows rank 0's broadcasts (other ranks), Ray calls arrive on other
threads, and rank 0's events leave through one long-lived streaming call, a batch of events
per item (never one Ray message per token).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import queue
import sys
import threading
import time

import ray

from engine.events import StepFailed
from model.rank_runtime import WorkerConfig

log = logging.getLogger("disagg.actor")
_STOP = object()
ROLES = ("colocated", "prefill", "decode")


def role_class(role: str):
    """The worker class of a role (imported here, in the actor's process)."""
    if role == "prefill":
        from prefill_worker.worker import PrefillWorker
        return PrefillWorker
    if role == "decode":
        from decode_worker.worker import DecodeWorker
        return DecodeWorker
    from model.instance import ColocatedWorker
    return ColocatedWorker


STUCK_S = 300.0          # a step loop silent this long while it has work is declared stuck
# A worker process runs its step loop, KV channel threads and Ray's threads under one GIL. With
# Python's default 5 ms switch interval a KV thread waits up to 5 ms each time it needs the GIL
# back from the step loop, several times per transfer; measured on the H100 at 64 req/s, the
# KV hand-over queued for ~0.7 s. DISAGG_GIL_SWITCH_INTERVAL_S overrides.
GIL_SWITCH_INTERVAL_S = float(os.environ.get("DISAGG_GIL_SWITCH_INTERVAL_S", "0.0005"))


# KV receives block a thread each for as long as a transfer takes; they get a pool of their
# own so that pings, starts and cancels never queue behind them.
ACTOR_OPTIONS = {"max_concurrency": 64, "concurrency_groups": {"kv": 256}}


@functools.lru_cache(maxsize=None)
def remote_class(cls: type | None = None):
    """The Ray actor class of `cls` (RankActor, or a subclass such as the tests' fault
    injector), made once per class."""
    return ray.remote(**ACTOR_OPTIONS)(cls or RankActor)


class RankActor:
    """One rank of an instance, hosted by a Ray actor (see `remote_class`)."""

    def __init__(self, role: str, cfg: WorkerConfig):
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        self.role, self.cfg = role, cfg
        if GIL_SWITCH_INTERVAL_S > 0:
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.worker = None
        self._events: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = None
        self._tp_store = None
        self._beat = time.monotonic()
        # New work (add_request, reserve) passes this gate; a role change closes it, so the
        # check "nothing left here" and the loop's stop see the same worker state.
        self._gate = threading.Lock()
        self._paused = ""

    # Setup ----------------------------------------------------------------------------
    def open_tp(self) -> dict:
        """Rank 0: open the instance's rendezvous store; returns its address for the peers."""
        from kv_transfer.channel import local_ip, open_store
        host = local_ip()
        self._tp_store = open_store(host, self.cfg.tp * self.cfg.pp, 120)
        return {"host": host, "port": self._tp_store.port}

    def init(self, tp_address: dict | None) -> dict:
        """Build the worker (joins the tensor-parallel group first). Returns what the
        controller needs: block count, context length, where this rank's GPU is."""
        from model.rank_runtime import init_tp_group
        tp_group = ctrl = None
        if tp_address is not None:
            tp_group, ctrl = init_tp_group(self.cfg, tp_address["host"], tp_address["port"], self._tp_store)
        self.worker = role_class(self.role)(self.cfg, tp_group, ctrl, emit=self._emit)
        return {"num_blocks": self.worker.rt.num_blocks, "max_model_len": self.worker.rt.max_model_len,
                "node_id": ray.get_runtime_context().get_node_id(), "gpu_uuid": _gpu_uuid(self.worker.rt.device)}

    def start_loop(self) -> None:
        target = self._drive if self.cfg.rank == 0 else self._follow
        self._thread = threading.Thread(target=target, name=f"{self.role}-loop", daemon=True)
        self._thread.start()

    def _drive(self):
        w = self.worker
        while not self._stop.is_set():
            self._beat = time.monotonic()
            try:
                worked = w.step()
            except Exception as e:  # noqa: BLE001 - reported to the controller, loop goes on
                log.exception("%s step failed", self.cfg.instance_id)
                self._emit([StepFailed(message=f"{type(e).__name__}: {e}", time=time.monotonic())])
                worked = False
                time.sleep(0.05)
            if not worked:
                w.wake.wait(0.02)
                w.wake.clear()
        try:
            w.flush()       # a step still in flight (async scheduling): its tokens leave now
        except Exception:  # noqa: BLE001 - stopping anyway; the controller sees the requests
            log.exception("%s: finishing the last step failed", self.cfg.instance_id)
        if self.cfg.tp * self.cfg.pp > 1:
            try:
                w.stop_followers()      # from this thread: never two broadcasts at once
            except Exception:  # noqa: BLE001 - peers may be gone already
                pass

    def _follow(self):
        try:
            self.worker.follow(self._stop)
            # Rank 0 stopped the loop (shutdown, or a role change that rebuilds this rank's
            # worker next): an orderly stop, which ping must not report as a dead loop.
            self._stop.set()
        except Exception:  # noqa: BLE001
            log.exception("%s rank %d follower stopped", self.cfg.instance_id, self.cfg.rank)

    def _emit(self, events: list) -> None:
        if events:
            self._events.put(events)

    @ray.method(num_returns="streaming")
    def events(self):
        """Rank 0's events, as lists: everything that piled up since the last item."""
        while True:
            first = self._events.get()
            if first is _STOP:
                return
            batch = list(first)
            try:
                while True:
                    more = self._events.get_nowait()
                    if more is _STOP:
                        yield batch
                        return
                    batch.extend(more)
            except queue.Empty:
                pass
            yield batch

    # KV channels ------------------------------------------------------------------------
    def open_kv(self, peer: str, peer_layout, epoch: int, kind: str) -> dict:
        from kv_transfer.channel import local_ip
        return self.worker.kv.open(peer, peer_layout, epoch, kind, local_ip())

    def connect_kv_sender(self, peer: str) -> None:
        self.worker.kv.connect(peer)

    def connect_kv_receiver(self, peer: str, peer_layout, epoch: int, addresses: dict) -> None:
        self.worker.kv.connect(peer, peer_layout, epoch, addresses)

    @ray.method(concurrency_group="kv")
    def receive_kv(self, peer: str, epoch: int, seq: int, block_ids: list[int] | int) -> tuple[bool, str]:
        """Blocks until this rank has its part of one request's KV (an int: drain that many
        blocks' worth and drop it). Returns (ok, error message)."""
        try:
            self.worker.receive(peer, epoch, seq, block_ids)
            return True, ""
        except Exception as e:  # noqa: BLE001 - the controller retries the request
            return False, f"{type(e).__name__}: {e}"

    def drop_kv(self, peer: str) -> None:
        """Close the channels with `peer` (it changed role or is gone)."""
        kv = getattr(self.worker, "kv", None)
        if kv is not None:
            kv.close_peer(peer)

    # Role change ------------------------------------------------------------------------
    def pause(self) -> str:
        """Rank 0, first step of a role change: refuse new work from now on and stop the step
        loop (the followers' loops end with it), unless a request is still here. Returns ""
        when paused, else what is still held (the controller drains on and asks again)."""
        with self._gate:
            busy = self.worker.busy()
            if busy:
                return busy
            self._paused = "changing role"
        self._stop_loop()
        return ""

    def change_role(self, role: str, settings: dict | None = None) -> dict:
        """Every rank, after rank 0 paused: close the old role's KV channels and build `role`'s
        worker over the same RankRuntime (weights, KV cache tensor, runner, sampler untouched;
        a fresh block manager: the instance was drained), then start the loop again. `settings`
        overrides WorkerConfig fields that only the scheduler reads (schedule, chunk_tokens)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        t0 = time.monotonic()
        self._stop_loop()
        old = self.worker
        old.close()
        self.cfg = dataclasses.replace(self.cfg, **(settings or {}))
        self.worker = role_class(role)(self.cfg, emit=self._emit, rt=old.rt)
        self.role = role
        self._thread = None         # ping must not see the old, stopped thread with _stop cleared
        self._stop.clear()
        self.start_loop()
        with self._gate:
            self._paused = ""
        return {"seconds": time.monotonic() - t0, **self.worker.rt.fingerprint()}

    def fingerprint(self) -> dict:
        return self.worker.rt.fingerprint()

    def _stop_loop(self) -> None:
        self._stop.set()
        self.worker.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            if self._thread.is_alive():
                raise RuntimeError(f"{self.cfg.instance_id} rank {self.cfg.rank}: the step loop did not stop")

    # Requests (rank 0) --------------------------------------------------------------------
    def add_request(self, spec) -> None:
        with self._gate:
            if self._paused:
                # Not an overload: the controller parks the request and routes it elsewhere.
                raise RuntimeError(f"{self.cfg.instance_id} is {self._paused}")
            self.worker.add(spec)

    def cancel(self, request_id: str) -> bool:
        return self.worker.cancel(request_id)

    def release(self, request_id: str) -> bool:
        return self.worker.release(request_id)

    def reserve(self, request_id: str, num_tokens: int):
        with self._gate:
            if self._paused:
                return None         # no blocks here: the controller tries another decode instance
            return self.worker.reserve(request_id, num_tokens)

    def start_decode(self, request_id, prompt_token_ids, output_token_ids, sampling, arrival_s=0.0) -> None:
        self.worker.start(request_id, prompt_token_ids, output_token_ids, sampling, arrival_s)

    def free_blocks(self) -> int:
        return self.worker.free_blocks()

    def stats(self) -> dict:
        return self.worker.stats()

    def ping(self) -> bool:
        """Raises when this rank cannot serve: its loop thread died, or (rank 0) one step has
        run for longer than STUCK_S."""
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            raise RuntimeError(f"{self.cfg.instance_id} rank {self.cfg.rank}: step loop thread died")
        if self.cfg.rank == 0 and self._thread is not None and time.monotonic() - self._beat > STUCK_S:
            raise RuntimeError(f"{self.cfg.instance_id}: one step has run for over {STUCK_S:.0f} s")
        return True

    def shutdown(self) -> None:
        self._stop.set()
        if self.worker is not None:
            self.worker.wake.set()
            if self._thread is not None and self.cfg.rank == 0:
                self._thread.join(timeout=10)
            self.worker.close()
        self._events.put(_STOP)
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def _gpu_uuid(device) -> str | None:
    if device.type != "cuda":
        return None
    import torch
    return str(torch.cuda.get_device_properties(device).uuid)

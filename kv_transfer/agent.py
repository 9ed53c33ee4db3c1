"""Per-rank KV transfer agents: a prefill rank's `KVSender` and a decode rank's `KVReceiver`.

Each channel (one prefill rank, one decode rank) has one thread on each end working through
its jobs strictly in (epoch, seq, group) order. The prefill instance numbers its transfers to
each decode instance (seq), so every channel between the two carries the same order and no
two requests can deadlock. A failed or timed-out operation breaks its channel; the jobs after
it fail at once, and the controller rebuilds the channel under a new epoch.
"""
from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from engine.errors import TransferError
from kernels.kv_pack import pack_kv, packed_shape, unpack_kv
from kv_transfer.transports import get as get_transport
from kv_transfer.channel import Channel, ChannelMaster
from kv_transfer.shard_plan import Layout, Rect, split_layers, transfer_plan

IPC_COPY_BYTES = 256 << 20      # the largest staging buffer a CUDA IPC copy uses
def _host_ids(block_ids, device: torch.device) -> torch.Tensor:
    """Block ids in host memory, pinned when they are going to a GPU."""
    t = torch.tensor(block_ids, dtype=torch.int64)
    return t.pin_memory() if device.type == "cuda" else t


def _on_device(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`ids` on `device`, asynchronously on the current stream. A copy from pageable memory
    would make the channel's thread wait for the GPU: on a GPU shared by two processes, a time
    slice per copy, per request, in the channel's order."""
    if device.type != "cuda":
        return ids
    return (ids if ids.is_pinned() else ids.pin_memory()).to(device, non_blocking=True)


SLOW_JOB_S = 0.2                # transfer jobs slower than this are logged with where the time went
log = logging.getLogger("disagg.kv")


@dataclass(order=True)
class _Job:
    key: tuple                               # (epoch, seq, group)
    run: Callable[[Channel], None] = field(compare=False)
    num_groups: int = field(compare=False, default=1)     # groups of this request on this channel
    future: Future = field(compare=False, default_factory=Future)
    deferred: bool = field(compare=False, default=False)  # done once its GPU work is (Channel.record)


class _ChannelThread:
    """Runs the jobs of one channel in key order; a job whose key is not next waits."""

    def __init__(self, name: str, channel: Channel, epoch: int):
        self.channel, self.epoch = channel, epoch
        self._heap: list[_Job] = []
        self._cv = threading.Condition()
        self._next = (epoch, 0, 0)
        self._closed = False
        self._completer = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> Future:
        with self._cv:
            if self._closed or job.key[0] != self.epoch:
                job.future.set_exception(TransferError(f"channel epoch {self.epoch} does not take job {job.key}"))
            else:
                heapq.heappush(self._heap, job)
                self._cv.notify_all()
        return job.future

    def _advance(self, job: _Job):
        e, s, g = job.key
        self._next = (e, s, g + 1) if g + 1 < job.num_groups else (e, s + 1, 0)

    def _loop(self):
        while True:
            with self._cv:
                while not self._closed and not (self._heap and self._heap[0].key <= self._next):
                    self._cv.wait()
                if self._closed:
                    return
                job = heapq.heappop(self._heap)
                if job.key < self._next:     # a duplicate of a job already run
                    job.future.set_exception(TransferError(f"duplicate transfer job {job.key}"))
                    continue
                self._advance(job)
            try:
                job.run(self.channel)
                if job.deferred:
                    self._complete_later(job, self.channel.record())
                else:
                    job.future.set_result(None)
            except Exception as e:  # noqa: BLE001 - reported through the future
                job.future.set_exception(e if isinstance(e, TransferError) else TransferError(str(e)))

    def _complete_later(self, job: _Job, event) -> None:
        """Deferred jobs (CUDA IPC copies) complete in a second thread once their GPU work is
        done, so this thread goes on to the next job at once: on a GPU shared by two
        processes each wait costs a time slice, and the copies of requests ready together
        then finish together instead of one slice each."""
        if self._completer is None:
            self._done = queue.Queue()
            self._completer = threading.Thread(target=self._complete_loop, name=self._thread.name + "-done",
                                               daemon=True)
            self._completer.start()
        self._done.put((job, event))

    def _complete_loop(self):
        while True:
            item = self._done.get()
            if item is None:
                return
            job, event = item
            try:
                if event is not None:
                    event.synchronize()
                job.future.set_result(None)
            except Exception as e:  # noqa: BLE001 - reported through the future
                job.future.set_exception(TransferError(f"completing the copy failed: {e}"))

    def close(self):
        with self._cv:
            self._closed = True
            for job in self._heap:
                job.future.set_exception(TransferError("channel closed"))
            if self._completer is not None:
                self._done.put(None)        # after the copies already queued
            self._heap.clear()
            self._cv.notify_all()
        self.channel.close()


class _Agent:
    def __init__(self, kv_cache: torch.Tensor, layout: Layout, rank: int, timeout_s: float, num_groups: int):
        self.kv_cache = kv_cache
        self.layout, self.rank = layout, rank
        self.owner: Rect = layout.rect(rank)
        self.timeout_s = timeout_s
        self.num_groups = num_groups
        self.device = kv_cache.device
        self.threads: dict[tuple[str, int], _ChannelThread] = {}
        self.peer_layouts: dict[str, Layout] = {}
        self.epochs: dict[str, int] = {}
        self.faults: dict[str, float] = {}     # test hooks, e.g. {"send_delay_s": 5}
        self._lock = threading.Lock()

    def _groups(self, rect: Rect, thread: "_ChannelThread | None") -> list[Rect]:
        # Transports that are not layer-wise (cuda_ipc: see kv_transfer/transports.py) move a
        # request's rectangle in one piece.
        if thread is not None and not thread.channel.transport.layerwise:
            return [rect]
        return split_layers(rect, self.num_groups)

    def _packed(self, local: Rect, num_blocks: int) -> tuple[tuple[int, ...], int]:
        """Shape and bytes of `local` (this rank's coordinates) packed for `num_blocks` blocks."""
        shape = packed_shape(self.kv_cache, num_blocks, local.layers, local.heads)
        return shape, torch.Size(shape).numel() * self.kv_cache.element_size()

    def close_peer(self, peer: str) -> None:
        with self._lock:
            for key in [k for k in self.threads if k[0] == peer]:
                self.threads.pop(key).close()

    def close(self) -> None:
        for peer in {k[0] for k in self.threads}:
            self.close_peer(peer)

    def stats(self) -> dict:
        chans = [t.channel for t in self.threads.values()]
        return {"kv_bytes": sum(c.num_bytes for c in chans), "kv_messages": sum(c.num_messages for c in chans),
                "kv_seconds": sum(c.seconds for c in chans),
                "kv_pack_seconds": sum(c.pack_seconds for c in chans),
                "broken_channels": sum(1 for c in chans if c.broken)}


class KVSender(_Agent):
    """Prefill side. `open` + `connect` build channels; `send` queues a request's pieces."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._masters: dict[tuple[str, int], ChannelMaster] = {}
        self._next_epochs: dict[str, int] = {}

    def open(self, peer: str, peer_layout: Layout, epoch: int, kind: str, host: str) -> dict[int, dict]:
        """First phase of (re)building the channels to decode instance `peer`: close the old
        ones, open a store per peer rank that receives from this rank; returns addresses."""
        self.close_peer(peer)
        self.peer_layouts[peer] = peer_layout
        self._next_epochs[peer] = epoch        # published by connect, once its threads exist
        out = {}
        for p in transfer_plan(self.layout, peer_layout):
            if p.src_rank == self.rank:
                m = ChannelMaster(kind, self.device, host, self.timeout_s,
                                  self.kv_cache if get_transport(kind).moves_block_ids else None)
                self._masters[(peer, p.dst_rank)] = m
                out[p.dst_rank] = m.address
        return out

    def connect(self, peer: str) -> None:
        epoch = self._next_epochs[peer]
        for (pr, dst), m in list(self._masters.items()):
            if pr == peer:
                ch = Channel.connect_sender(m)
                with self._lock:
                    self.threads[(peer, dst)] = _ChannelThread(f"kv-send-{peer}-{dst}", ch, epoch)
                del self._masters[(pr, dst)]
        with self._lock:
            # A step numbering transfers under this epoch now finds its threads.
            self.epochs[peer] = epoch

    def send(self, peer: str, epoch: int, seq: int, block_ids: list[int],
             wait_layers: Callable[[int], None] | None = None) -> list[Future]:
        """Queue the pieces of one request for every peer rank. `wait_layers(n)` blocks until
        the first n global layers are in the cache (layer-wise transfer); None when the KV is
        complete already."""
        futures = []
        if peer not in self.peer_layouts:       # never connected: the receiver times out and retries
            f = Future()
            f.set_exception(TransferError(f"no channels to {peer}"))
            return [f]
        ids = None
        for p in transfer_plan(self.layout, self.peer_layouts[peer]):
            if p.src_rank != self.rank:
                continue
            thread = self.threads.get((peer, p.dst_rank))
            groups = self._groups(p.rect, thread)
            for g, rect in enumerate(groups):
                if thread is not None and thread.channel.transport.moves_block_ids:
                    run = self._ipc_send_job(rect, list(block_ids), wait_layers)
                else:
                    if ids is None:
                        ids = _host_ids(block_ids, self.device)     # moved on the channel's stream
                    run = self._send_job(rect, ids, wait_layers)
                job = _Job((epoch, seq, g), run, len(groups))
                if thread is None:
                    job.future.set_exception(TransferError(f"no channel to {peer} rank {p.dst_rank}"))
                    futures.append(job.future)
                else:
                    futures.append(thread.submit(job))
        return futures

    def _await_layers(self, rect: Rect, wait) -> None:
        """Block until the rectangle's layers are in the cache (and any injected send delay)."""
        if wait is not None:
            wait(rect.layers[1])
        delay = self.faults.pop("send_delay_s", 0.0)
        if delay:
            time.sleep(delay)

    def _send_job(self, rect: Rect, ids: torch.Tensor, wait):
        local = rect.local(self.owner)
        shape, nbytes = self._packed(local, len(ids))

        def run(ch: Channel):
            self._await_layers(rect, wait)
            ch.send(nbytes, lambda buf: pack_kv(self.kv_cache, _on_device(ids, self.device), local.layers, local.heads,
                                                out=buf.view(shape)), self.kv_cache.dtype)
        return run

    def _ipc_send_job(self, rect: Rect, block_ids: list[int], wait):
        """Over CUDA IPC the receiver copies from this rank's cache itself: once the layers are
        computed, send the block ids."""
        _, nbytes = self._packed(rect.local(self.owner), len(block_ids))
        queued = time.monotonic()

        def run(ch: Channel):
            started = time.monotonic()
            self._await_layers(rect, wait)
            ready = time.monotonic()
            ch.send_block_ids(block_ids, nbytes)
            if time.monotonic() - queued > SLOW_JOB_S:
                log.warning("slow KV send job: %.3f s in the channel's queue, %.3f s waiting for the layers, "
                            "%.3f s sending", started - queued, ready - started, time.monotonic() - ready)
        return run


class KVReceiver(_Agent):
    """Decode side. `connect` joins the sender's stores; `receive` waits for one request."""

    def connect(self, peer: str, peer_layout: Layout, epoch: int, addresses: dict[int, dict]) -> None:
        self.close_peer(peer)
        self.peer_layouts[peer], self.epochs[peer] = peer_layout, epoch
        for src, addr in addresses.items():
            ch = Channel.connect_receiver(addr, self.device, self.timeout_s)
            with self._lock:
                self.threads[(peer, int(src))] = _ChannelThread(f"kv-recv-{peer}-{src}", ch, epoch)

    def receive(self, peer: str, epoch: int, seq: int, block_ids: list[int] | int) -> None:
        """Block until every piece of this request that this rank owns has arrived and been
        unpacked into `block_ids`; raises TransferError on failure or timeout. An int instead
        of a list drains that many blocks' worth and drops it: a transfer nobody wants any more
        must still be received, or every later one on the channel would wait for it."""
        drain = isinstance(block_ids, int)
        # Host tensors: the jobs move them to the device on their channel's stream. Made on the
        # device here, in the caller's thread, the copy would queue on the default stream behind
        # the decode steps in flight (tens of ms each while a prefill shares the GPU), and every
        # later transfer on the channel would wait for it.
        ids = torch.zeros(block_ids, dtype=torch.int64) if drain else _host_ids(block_ids, self.device)
        futures = []
        if peer not in self.peer_layouts:
            raise TransferError(f"no channels from {peer}")
        for p in transfer_plan(self.peer_layouts[peer], self.layout):
            if p.dst_rank != self.rank:
                continue
            thread = self.threads.get((peer, p.src_rank))
            if thread is None:
                raise TransferError(f"no channel from {peer} rank {p.src_rank}")
            groups = self._groups(p.rect, thread)
            for g, rect in enumerate(groups):
                ipc = thread.channel.transport.moves_block_ids
                if ipc:
                    src_owner = self.peer_layouts[peer].rect(p.src_rank)
                    run = self._ipc_recv_job(rect, src_owner, ids, drain)
                else:
                    run = self._recv_job(rect, ids, drain)
                futures.append(thread.submit(_Job((epoch, seq, g), run, len(groups), deferred=ipc)))
        errors = []
        for f in futures:
            try:
                f.result(timeout=self.timeout_s * (len(futures) + 2))
            except Exception as e:  # noqa: BLE001 - collected and re-raised as one error
                errors.append(e)
        if errors:
            raise TransferError(f"receiving from {peer} failed: {errors[0]}")

    def _recv_job(self, rect: Rect, ids: torch.Tensor, drain: bool = False):
        local = rect.local(self.owner)
        shape, nbytes = self._packed(local, len(ids))

        def unpack(buf):
            if not drain:       # on the channel's stream (Channel.recv)
                unpack_kv(buf.view(shape), self.kv_cache, _on_device(ids, self.device), local.layers, local.heads)

        def run(ch: Channel):
            ch.recv(nbytes, unpack, self.kv_cache.dtype)
        return run

    def _ipc_recv_job(self, rect: Rect, src_owner: Rect, ids: torch.Tensor, drain: bool = False):
        """Copy the rectangle straight from the sender's cache (mapped over CUDA IPC) into ours,
        a few layers at a time so the staging buffer stays under IPC_COPY_BYTES."""
        local, src = rect.local(self.owner), rect.local(src_owner)
        shape, nbytes = self._packed(local, len(ids))
        per_layer = nbytes // shape[0]
        step = max(1, IPC_COPY_BYTES // max(per_layer, 1))

        def copy(src_ids: torch.Tensor, ch: Channel):      # on the channel's stream
            if len(src_ids) != len(ids):
                raise TransferError(f"the sender has {len(src_ids)} blocks for a request this rank "
                                    f"reserved {len(ids)} for")
            dst_ids = _on_device(ids, self.device)
            for l0 in range(0, shape[0], step):
                n = min(step, shape[0] - l0)
                buf = pack_kv(ch.peer_cache, src_ids, (src.layers[0] + l0, src.layers[0] + l0 + n), src.heads)
                unpack_kv(buf, self.kv_cache, dst_ids, (local.layers[0] + l0, local.layers[0] + l0 + n), local.heads)

        queued = time.monotonic()

        def run(ch: Channel):
            started = time.monotonic()
            ch.recv_block_ids(None if drain else (lambda src_ids: copy(src_ids, ch)), nbytes)
            if time.monotonic() - queued > SLOW_JOB_S:
                log.warning("slow KV receive job: %.3f s in the channel's queue, %.3f s receiving",
                            started - queued, time.monotonic() - started)
        return run

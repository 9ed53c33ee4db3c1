"""Point-to-point channels between one prefill rank (side 0, sends) and one decode rank
(side 1, receives), built as standalone two-rank process groups from a TCPStore, so instances
share no world and a channel can be torn down and rebuilt when a peer fails.

Transports (kv_transfer/transports.py: what each can do, and the registry):
  gloo      CPU tensors over TCP.
  nccl      GPU to GPU through NCCL (NCCL refuses two ranks on one GPU: use cuda_ipc there).
  cuda_ipc  (moves block ids) processes on one host, also sharing one GPU: the receiver maps the sender's whole
            KV cache through a CUDA IPC handle and copies a request's blocks straight into its
            own cache (`send_block_ids` / `recv_block_ids`); a gloo pair carries the block ids.
            The sender's GPU does no work for a transfer, and its blocks stay allocated until
            the controller has the receiver's confirmation. The receiver never waits for its
            copies in the channel's thread (`record` gives an event that another thread
            waits on): two processes sharing a GPU time-slice it, each wait costs a slice
            (~30-50 ms on the H100 while a long prefill runs), and one wait per request in
            the channel's order made transfers queue.
Every operation has a timeout. After any failure a channel is broken for good (a gloo pair
closes on timeout); the owner rebuilds it with a new store.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.errors import TransferError
from kv_transfer.transports import get as get_transport

SLOW_MESSAGE_S = 0.2        # messages slower than this are logged with where their time went
log = logging.getLogger("disagg.kv")


def local_ip() -> str:
    """The address peers reach this process on. Inside Ray it is Ray's node IP: 127.0.0.1 on
    the local cluster `disagg serve` starts (closed to the network), the node's IP when the
    cluster spans nodes. Outside Ray, the interface of the default route (loopback when alone)."""
    try:
        import ray
        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def open_store(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """A master TCPStore listening on `host` only. TCPStore itself binds every interface
    whatever host it is given, so the listening socket is made here and handed over."""
    sock = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=128)
    port = sock.getsockname()[1]
    fd = sock.detach()              # the store owns it from here
    try:
        return dist.TCPStore(host, port, world_size, True, timeout=_td(timeout_s), wait_for_workers=False,
                             master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def gloo_group(store, rank: int, world_size: int, host: str, timeout_s: float):
    """A gloo group whose pair sockets listen on `host` only (gloo's default device binds the
    address the hostname resolves to, which may face the network)."""
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = _td(timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(store, rank, world_size, opts)


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


class ChannelMaster:
    """Sender side, first phase: opens the store (and, for cuda_ipc, shares the sender's KV
    cache) and returns the address the receiver connects to."""

    def __init__(self, kind: str, device: torch.device, host: str, timeout_s: float,
                 kv_cache: torch.Tensor | None = None):
        self.transport = get_transport(kind)
        self.kind, self.device, self.timeout_s = kind, device, timeout_s
        self.host = host
        self.store = open_store(host, 2, timeout_s)
        self.address = {"kind": kind, "host": host, "port": self.store.port}
        if self.transport.moves_block_ids:
            from torch.multiprocessing.reductions import reduce_tensor
            if kv_cache is None or not kv_cache.is_cuda:
                raise ValueError("a cuda_ipc channel needs the sender's CUDA KV cache")
            self.address["cache"] = reduce_tensor(kv_cache)


class Channel:
    def __init__(self, side: int, kind: str, pg, device: torch.device, timeout_s: float, peer_cache=None,
                 store=None):
        self.side, self.kind, self.pg, self.device = side, kind, pg, device
        self.transport = get_transport(kind)
        self.timeout_s = timeout_s
        self.peer_cache = peer_cache  # cuda_ipc receiver: the sender's KV cache, mapped
        self._store = store           # keeps the master store alive as long as the channel
        self.broken: str | None = None
        # Packing and unpacking run on the channel's own stream, so they overlap the model's
        # kernels on the default stream instead of queueing behind them.
        # High priority: its small kernels get SMs as soon as a big GEMM's blocks retire.
        self.stream = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None
        self.num_bytes = 0
        self.num_messages = 0
        self.seconds = 0.0
        self.pack_seconds = 0.0        # filling or draining buffers, device work included

    # Construction ----------------------------------------------------------------------
    @classmethod
    def connect_sender(cls, master: ChannelMaster) -> "Channel":
        pg = cls._make_pg(master.kind, master.store, 0, master.device, master.timeout_s, master.host)
        return cls(0, master.kind, pg, master.device, master.timeout_s, None, master.store)

    @classmethod
    def connect_receiver(cls, address: dict, device: torch.device, timeout_s: float) -> "Channel":
        store = dist.TCPStore(address["host"], address["port"], 2, False, timeout=_td(timeout_s))
        peer_cache = None
        if get_transport(address["kind"]).moves_block_ids:
            rebuild, args = address["cache"]
            peer_cache = rebuild(*args)
        pg = cls._make_pg(address["kind"], store, 1, device, timeout_s, local_ip())
        return cls(1, address["kind"], pg, device, timeout_s, peer_cache, store)

    @staticmethod
    def _make_pg(kind: str, store, rank: int, device, timeout_s: float, host: str):
        if get_transport(kind).backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = _td(timeout_s)
            torch.cuda.set_device(device)
            return dist.ProcessGroupNCCL(store, rank, 2, opts)
        return gloo_group(store, rank, 2, host, timeout_s)

    # Data --------------------------------------------------------------------------------
    def _check(self):
        if self.broken:
            raise TransferError(f"{self.kind} channel is broken ({self.broken}); it must be rebuilt")

    def _fail(self, what: str, err: Exception):
        self.broken = f"{what}: {err}"
        raise TransferError(f"{self.kind} channel {what} failed: {err}") from None

    def _wait(self, work, what: str):
        try:
            if self.transport.polls_completion:
                deadline = time.monotonic() + self.timeout_s
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{what} did not complete in {self.timeout_s:.1f} s")
                    time.sleep(0.0002)
            else:
                work.wait(_td(self.timeout_s))
        except Exception as e:  # noqa: BLE001 - every failure breaks the channel
            self._fail(what, e)

    def _sync(self):
        if self.stream is not None:
            self.stream.synchronize()

    def _on_stream(self):
        import contextlib
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def send(self, nbytes: int, fill: Callable[[torch.Tensor], None], dtype: torch.dtype) -> None:
        """Send one message of `nbytes`: `fill(buf)` writes it into a buffer of that many bytes
        viewed as `dtype` (the pack kernel writes straight into it)."""
        self._check()
        if self.transport.moves_block_ids:
            raise TransferError(f"a {self.kind} channel moves blocks with send_block_ids, not messages")
        t0 = time.monotonic()
        with self._on_stream():
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device).view(dtype)
            fill(buf)
        self._sync()
        t1 = time.monotonic()
        self.pack_seconds += t1 - t0
        with self._on_stream():
            self._wait(self.pg.send([buf.view(torch.uint8)], 1, 0), "send")
        if time.monotonic() - t0 > SLOW_MESSAGE_S:
            log.warning("slow KV send of %d MB: pack %.3f s, send %.3f s", nbytes >> 20, t1 - t0,
                        time.monotonic() - t1)
        self.num_messages += 1
        self.num_bytes += nbytes
        self.seconds += time.monotonic() - t0

    def recv(self, nbytes: int, consume: Callable[[torch.Tensor], None], dtype: torch.dtype) -> None:
        """Receive one message and hand it to `consume(buf)` (which unpacks it into the cache)
        before the buffer is released."""
        self._check()
        if self.transport.moves_block_ids:
            raise TransferError(f"a {self.kind} channel moves blocks with recv_block_ids, not messages")
        t0 = time.monotonic()
        with self._on_stream():
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._wait(self.pg.recv([buf], 0, 0), "recv")
        t1 = time.monotonic()
        with self._on_stream():
            consume(buf.view(dtype))
        self._sync()
        self.pack_seconds += time.monotonic() - t1
        self.num_messages += 1
        self.num_bytes += nbytes
        self.seconds += time.monotonic() - t0

    # CUDA IPC: block ids out, the receiver copies, an acknowledgement back ------------------
    def send_block_ids(self, block_ids: list[int], nbytes: int) -> None:
        """cuda_ipc sender: tell the receiver which blocks of our cache hold the next request
        (their KV must be complete); it copies them. `nbytes` is counted."""
        self._check()
        t0 = time.monotonic()
        ids = torch.tensor([len(block_ids), *block_ids], dtype=torch.int64)
        self._wait(self.pg.send([ids[:1]], 1, 1), "send header")
        if block_ids:
            self._wait(self.pg.send([ids[1:]], 1, 3), "send block ids")
        self.num_messages += 1
        self.num_bytes += nbytes
        self.seconds += time.monotonic() - t0

    def recv_block_ids(self, copy: Callable[[torch.Tensor], None] | None, nbytes: int) -> None:
        """cuda_ipc receiver: take the sender's block ids for the next request and queue
        `copy(ids)` from `peer_cache` on this channel's stream (None: drop them). The copy is
        complete only once the stream reaches it (`record`)."""
        self._check()
        t0 = time.monotonic()
        hdr = torch.zeros(1, dtype=torch.int64)
        self._wait(self.pg.recv([hdr], 0, 1), "recv header")
        ids = torch.empty(int(hdr[0]), dtype=torch.int64)
        if len(ids):
            self._wait(self.pg.recv([ids], 0, 3), "recv block ids")
        if copy is not None and len(ids):
            with self._on_stream():     # pinned, so the copy is queued and this thread goes on
                copy(ids.pin_memory().to(self.device, non_blocking=True))
        self.num_messages += 1
        self.num_bytes += nbytes
        self.seconds += time.monotonic() - t0

    def record(self):
        """An event after the work queued on this channel's stream so far (None on CPU)."""
        if self.stream is None:
            return None
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def close(self) -> None:
        """Drop the process group. Peers blocked on it fail by their own timeout."""
        if self.broken is None:
            self.broken = "closed"
        if self.transport.backend == "nccl":
            try:
                self.pg.abort()
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass
        self.pg = None
        self.peer_cache = None
        self._store = None

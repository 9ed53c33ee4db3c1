"""Point-to-point channels between one prefill rank (side 0, sends) and one decode rank
(side 1, receives), built as standalone two-rank process groups from a TCPStore, so instances
share no world and a channel can be torn down and rebuilt when a peer fails.

Kinds (the transports of DESIGN.md):
  gloo      CPU tensors over TCP.
  nccl      GPU to GPU through NCCL (NCCL refuses two ranks on one GPU: use cuda_ipc there).
  cuda_ipc  processes on one host, also sharing one GPU: the sender packs into a staging pool
            that the receiver maps through a CUDA IPC handle; a gloo pair carries the small
            headers and acknowledgements.
Every operation has a timeout. After any failure a channel is broken for good (a gloo pair
closes on timeout); the owner rebuilds it with a new store.
"""
from __future__ import annotations

import datetime
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.errors import TransferError

KINDS = ("gloo", "nccl", "cuda_ipc")
IPC_SLOT_BYTES = 2**30      # one staging slot: a send waits for its ack before the next
IPC_NUM_SLOTS = 1


def local_ip() -> str:
    """An address peers on other nodes can reach (loopback when alone)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


class ChannelMaster:
    """Sender side, first phase: opens the store (and, for cuda_ipc, the staging pool) and
    returns the address the receiver connects to."""

    def __init__(self, kind: str, device: torch.device, host: str, timeout_s: float):
        if kind not in KINDS:
            raise ValueError(f"unknown channel kind {kind!r}; known: {KINDS}")
        self.kind, self.device, self.timeout_s = kind, device, timeout_s
        self.store = dist.TCPStore(host, 0, 2, True, timeout=_td(timeout_s), wait_for_workers=False)
        self.pool = None
        self.address = {"kind": kind, "host": host, "port": self.store.port}
        if kind == "cuda_ipc":
            from torch.multiprocessing.reductions import reduce_tensor
            self.pool = torch.empty(IPC_NUM_SLOTS * IPC_SLOT_BYTES, dtype=torch.uint8, device=device)
            self.address["pool"] = reduce_tensor(self.pool)


class Channel:
    def __init__(self, side: int, kind: str, pg, device: torch.device, timeout_s: float, pool=None, store=None):
        self.side, self.kind, self.pg, self.device = side, kind, pg, device
        self.timeout_s = timeout_s
        self.pool = pool
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
        pg = cls._make_pg(master.kind, master.store, 0, master.device, master.timeout_s)
        return cls(0, master.kind, pg, master.device, master.timeout_s, master.pool, master.store)

    @classmethod
    def connect_receiver(cls, address: dict, device: torch.device, timeout_s: float) -> "Channel":
        store = dist.TCPStore(address["host"], address["port"], 2, False, timeout=_td(timeout_s))
        pool = None
        if address["kind"] == "cuda_ipc":
            rebuild, args = address["pool"]
            pool = rebuild(*args)
        pg = cls._make_pg(address["kind"], store, 1, device, timeout_s)
        return cls(1, address["kind"], pg, device, timeout_s, pool, store)

    @staticmethod
    def _make_pg(kind: str, store, rank: int, device, timeout_s: float):
        if kind == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = _td(timeout_s)
            torch.cuda.set_device(device)
            return dist.ProcessGroupNCCL(store, rank, 2, opts)
        return dist.ProcessGroupGloo(store, rank, 2, _td(timeout_s))

    # Data --------------------------------------------------------------------------------
    def _check(self):
        if self.broken:
            raise TransferError(f"{self.kind} channel is broken ({self.broken}); it must be rebuilt")

    def _fail(self, what: str, err: Exception):
        self.broken = f"{what}: {err}"
        raise TransferError(f"{self.kind} channel {what} failed: {err}") from None

    def _wait(self, work, what: str):
        try:
            if self.kind == "nccl":
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
        t0 = time.monotonic()
        if self.kind == "cuda_ipc" and nbytes <= IPC_SLOT_BYTES:
            slot = self.num_messages % IPC_NUM_SLOTS
            buf = self.pool[slot * IPC_SLOT_BYTES: slot * IPC_SLOT_BYTES + nbytes].view(dtype)
            with self._on_stream():
                fill(buf)
            self._sync()
            self.pack_seconds += time.monotonic() - t0
            self._ipc_control("send", slot, nbytes)
        else:
            with self._on_stream():
                buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device).view(dtype)
                fill(buf)
            if self.kind == "cuda_ipc":
                self._ipc_chunked_send(buf)
            else:
                self._sync()
                with self._on_stream():
                    self._wait(self.pg.send([buf.view(torch.uint8)], 1, 0), "send")
        self.num_messages += 1
        self.num_bytes += nbytes
        self.seconds += time.monotonic() - t0

    def recv(self, nbytes: int, consume: Callable[[torch.Tensor], None], dtype: torch.dtype) -> None:
        """Receive one message and hand it to `consume(buf)` (which unpacks it into the cache)
        before the buffer is released."""
        self._check()
        t0 = time.monotonic()
        if self.kind == "cuda_ipc" and nbytes <= IPC_SLOT_BYTES:
            slot = self.num_messages % IPC_NUM_SLOTS
            self._ipc_control("recv_header", slot, nbytes)
            t1 = time.monotonic()
            with self._on_stream():
                consume(self.pool[slot * IPC_SLOT_BYTES: slot * IPC_SLOT_BYTES + nbytes].view(dtype))
            self._sync()
            self.pack_seconds += time.monotonic() - t1
            self._ipc_control("ack", slot, nbytes)
        else:
            with self._on_stream():
                buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            if self.kind == "cuda_ipc":
                self._ipc_chunked_recv(buf)
            else:
                with self._on_stream():
                    self._wait(self.pg.recv([buf], 0, 0), "recv")
            with self._on_stream():
                consume(buf.view(dtype))
            self._sync()
        self.num_messages += 1
        self.num_bytes += nbytes
        self.seconds += time.monotonic() - t0

    # CUDA IPC control: [slot, nbytes] headers and acks on the gloo pair ------------------
    def _ipc_control(self, op: str, slot: int, nbytes: int) -> None:
        hdr = torch.tensor([slot, nbytes], dtype=torch.int64)
        if op == "send":
            self._wait(self.pg.send([hdr], 1, 1), "send header")
            self._wait(self.pg.recv([hdr], 1, 2), "wait for ack")
        elif op == "recv_header":
            self._wait(self.pg.recv([hdr], 0, 1), "recv header")
            if hdr.tolist() != [slot, nbytes]:
                self._fail("recv header", RuntimeError(f"expected {[slot, nbytes]}, got {hdr.tolist()}"))
        else:
            self._wait(self.pg.send([hdr], 0, 2), "send ack")

    def _ipc_chunked_send(self, buf: torch.Tensor) -> None:
        flat = buf.view(torch.uint8)
        for off in range(0, flat.numel(), IPC_SLOT_BYTES):
            n = min(IPC_SLOT_BYTES, flat.numel() - off)
            with self._on_stream():
                self.pool[:n].copy_(flat[off:off + n])
            self._sync()
            self._ipc_control("send", 0, n)

    def _ipc_chunked_recv(self, buf: torch.Tensor) -> None:
        for off in range(0, buf.numel(), IPC_SLOT_BYTES):
            n = min(IPC_SLOT_BYTES, buf.numel() - off)
            self._ipc_control("recv_header", 0, n)
            with self._on_stream():
                buf[off:off + n].copy_(self.pool[:n])
            self._sync()
            self._ipc_control("ack", 0, n)

    def close(self) -> None:
        """Drop the process group. Peers blocked on it fail by their own timeout."""
        if self.broken is None:
            self.broken = "closed"
        if self.kind == "nccl":
            try:
                self.pg.abort()
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass
        self.pg = None
        self.pool = None
        self._store = None

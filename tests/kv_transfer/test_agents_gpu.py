"""KV over CUDA IPC between two processes on one GPU: the receiver copies straight from the
sender's cache. A tensor-parallel-2 sender feeds a TP-1 receiver (rectangles of layers x heads
at offsets on both sides), a drained transfer keeps the channel in order, and the sender's
blocks are untouched."""
import queue

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu

L, H, D, BS, NB = 4, 4, 16, 16, 32
SRC_BLOCKS = [[3, 7, 1], [5], [0, 2, 9, 11]]
DST_BLOCKS = [[10, 4, 5], [6], [8, 0, 30, 31]]


def _src_cache(layout, rank):
    r = layout.rect(rank)
    g = torch.Generator().manual_seed(rank + 1)
    return torch.randn(r.num_layers, 2, NB, BS, r.num_heads, D, generator=g, dtype=torch.float32)


def _sender(q_out, q_in):
    import threading
    from kv_transfer.agent import KVSender
    from kv_transfer.shard_plan import Layout
    src, dst = Layout(2, 1, L, H), Layout(1, 1, L, H)
    caches = [_src_cache(src, r).cuda() for r in range(2)]
    before = [c.clone() for c in caches]
    senders = [KVSender(c, src, r, 20.0, 4) for r, c in enumerate(caches)]
    q_out.put([s.open("D", dst, 0, "cuda_ipc", "127.0.0.1") for s in senders])
    threads = [threading.Thread(target=s.connect, args=("D",)) for s in senders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seq, blocks in enumerate(SRC_BLOCKS):
        futs = [f for s in senders for f in s.send("D", 0, seq, blocks)]
        for f in futs:
            f.result(timeout=30)
    q_in.get(timeout=60)                    # the receiver has checked everything
    q_out.put(all(torch.equal(c, b) for c, b in zip(caches, before)))


def _receiver(q_in, q_out):
    from kv_transfer.agent import KVReceiver
    from kv_transfer.shard_plan import Layout
    src, dst = Layout(2, 1, L, H), Layout(1, 1, L, H)
    addrs = q_in.get(timeout=60)
    cache = torch.zeros(L, 2, NB, BS, H, D, device="cuda")
    r = KVReceiver(cache, dst, 0, 20.0, 4)
    r.connect("P", src, 0, {s: a[0] for s, a in enumerate(addrs)})
    full = torch.zeros(L, 2, NB, BS, H, D)
    for rank in range(2):
        rect = src.rect(rank)
        full[rect.layers[0]:rect.layers[1], :, :, :, rect.heads[0]:rect.heads[1]] = _src_cache(src, rank)
    ok = []
    for seq, (s_blocks, d_blocks) in enumerate(zip(SRC_BLOCKS, DST_BLOCKS)):
        if seq == 1:
            r.receive("P", 0, seq, len(d_blocks))      # drained: nothing written
            ok.append(bool((cache[:, :, d_blocks] == 0).all()))
            continue
        r.receive("P", 0, seq, d_blocks)
        ok.append(torch.equal(cache[:, :, d_blocks].cpu(), full[:, :, s_blocks]))
    stats = r.stats()
    q_out.put((ok, stats["kv_messages"], stats["broken_channels"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tp2_sender_to_tp1_receiver_over_cuda_ipc():
    ctx = mp.get_context("spawn")
    to_recv, from_send, to_send, from_recv = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    ps = ctx.Process(target=_sender, args=(from_send, to_send))
    ps.start()
    try:
        addrs = from_send.get(timeout=120)
        pr = ctx.Process(target=_receiver, args=(to_recv, from_recv))
        pr.start()
        to_recv.put(addrs)
        ok, messages, broken = from_recv.get(timeout=120)
        to_send.put("done")
        untouched = from_send.get(timeout=60)
        pr.join(30)
        ps.join(30)
    except queue.Empty:
        pytest.fail("a transfer process did not answer in time")
    finally:
        for p in (ps,) + ((pr,) if "pr" in locals() else ()):
            if p.is_alive():
                p.kill()
    assert ok == [True, True, True]
    assert messages == 2 * len(SRC_BLOCKS) and broken == 0      # one per sender rank and request
    assert untouched

"""KV senders and receivers over real gloo channels, in one process (threads)."""
import threading
import time

import pytest
import torch

from engine.errors import TransferError
from kv_transfer.agent import KVReceiver, KVSender
from kv_transfer.shard_plan import Layout

L, H, D, BS, NB = 4, 4, 8, 4, 16


def _cache(layout, rank, fill=True):
    r = layout.rect(rank)
    t = torch.zeros(r.num_layers, 2, NB, BS, r.num_heads, D)
    if fill:
        t.normal_()
    return t


def _full(caches, layout):
    """Reassemble the global [L, 2, NB, BS, H, D] view from per-rank caches."""
    out = torch.zeros(L, 2, NB, BS, H, D)
    for rank, c in enumerate(caches):
        r = layout.rect(rank)
        out[r.layers[0]:r.layers[1], :, :, :, r.heads[0]:r.heads[1]] = c
    return out


def _connect(senders, receivers, src, dst, epoch=0, timeout_s=5.0, kind="gloo"):
    addrs = [s.open("D", dst, epoch, kind, "127.0.0.1") for s in senders]
    per_dst = {d: {} for d in range(dst.num_ranks)}
    for s_rank, a in enumerate(addrs):
        for d, addr in a.items():
            per_dst[d][s_rank] = addr
    threads = [threading.Thread(target=s.connect, args=("D",)) for s in senders]
    threads += [threading.Thread(target=r.connect, args=("P", src, epoch, per_dst[i])) for i, r in enumerate(receivers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.parametrize("src_tp,dst_tp,groups", [(1, 1, 1), (2, 1, 2), (1, 2, 4), (2, 2, 1)])
def test_any_tp_feeds_any_tp(src_tp, dst_tp, groups):
    src, dst = Layout(src_tp, 1, L, H), Layout(dst_tp, 1, L, H)
    s_caches = [_cache(src, r) for r in range(src.num_ranks)]
    d_caches = [_cache(dst, r, fill=False) for r in range(dst.num_ranks)]
    senders = [KVSender(c, src, r, 5.0, groups) for r, c in enumerate(s_caches)]
    receivers = [KVReceiver(c, dst, r, 5.0, groups) for r, c in enumerate(d_caches)]
    _connect(senders, receivers, src, dst)
    src_blocks, dst_blocks = [[3, 7, 1], [0, 2]], [[10, 4, 5], [9, 8]]
    for seq in range(2):
        futs = [f for s in senders for f in s.send("D", 0, seq, src_blocks[seq])]
        errs = []

        def recv(r, seq=seq):
            try:
                r.receive("P", 0, seq, dst_blocks[seq])
            except Exception as e:  # noqa: BLE001
                errs.append(e)
        ts = [threading.Thread(target=recv, args=(r,)) for r in receivers]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errs
        for f in futs:
            f.result(timeout=5)
    a, b = _full(s_caches, src), _full(d_caches, dst)
    for seq in range(2):
        assert torch.equal(b[:, :, dst_blocks[seq]], a[:, :, src_blocks[seq]])
    from kv_transfer.shard_plan import split_layers, transfer_plan
    expected = sum(len(split_layers(p.rect, groups)) for p in transfer_plan(src, dst)) * 2
    assert sum(s.stats()["kv_messages"] for s in senders) == expected
    assert sum(r.stats()["kv_messages"] for r in receivers) == expected
    for x in senders + receivers:
        x.close()


def test_timeout_breaks_channel_and_rebuild_recovers():
    lay = Layout(1, 1, L, H)
    sc, dc = _cache(lay, 0), _cache(lay, 0, fill=False)
    s, r = KVSender(sc, lay, 0, 1.0, 1), KVReceiver(dc, lay, 0, 1.0, 1)
    _connect([s], [r], lay, lay, epoch=0)
    t0 = time.monotonic()
    with pytest.raises(TransferError):
        r.receive("P", 0, 0, [1])               # nothing is sent: times out
    assert time.monotonic() - t0 < 5
    _connect([s], [r], lay, lay, epoch=1)      # rebuild under a new epoch
    futs = s.send("D", 1, 0, [2, 3])
    r.receive("P", 1, 0, [5, 6])
    futs[0].result(timeout=5)
    assert torch.equal(dc[:, :, [5, 6]], sc[:, :, [2, 3]])
    stale = s.send("D", 0, 1, [2])             # a job from the old epoch is refused
    with pytest.raises(TransferError):
        stale[0].result(timeout=5)
    s.close()
    r.close()


def test_drained_transfer_keeps_the_channel_in_order():
    lay = Layout(1, 1, L, H)
    sc, dc = _cache(lay, 0), _cache(lay, 0, fill=False)
    s, r = KVSender(sc, lay, 0, 5.0, 2), KVReceiver(dc, lay, 0, 5.0, 2)
    _connect([s], [r], lay, lay)
    s.send("D", 0, 0, [1, 2])
    s.send("D", 0, 1, [3])
    before = dc.clone()
    r.receive("P", 0, 0, 2)                  # nobody wants seq 0 any more: drained
    assert torch.equal(dc, before)
    r.receive("P", 0, 1, [7])                # seq 1 still lands where it should
    assert torch.equal(dc[:, :, 7], sc[:, :, 3])
    s.close()
    r.close()

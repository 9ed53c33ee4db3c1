"""Batching policies with a hand-driven clock (no model)."""
from engine.batching import ColocatedPolicy, DecodePolicy, PrefillPolicy
from engine.block_manager import BlockManager
from engine.request import Request, RequestState
from engine.sampling_params import SamplingParams


def _req(i, n, max_tokens=8):
    return Request(f"r{i}", list(range(i * 1000, i * 1000 + n)), SamplingParams(max_tokens=max_tokens))


def test_prefill_is_fcfs_under_token_budget():
    p = PrefillPolicy(BlockManager(100, 16), max_batch_tokens=100)
    for i, n in enumerate([40, 50, 30, 5]):
        p.add(_req(i, n), now_s=0.0)
    first = p.schedule(now_s=1.0)
    assert [c.request.request_id for c in first] == ["r0", "r1"]    # r2 would exceed 100
    assert all(c.request.state is RequestState.PREFILLING and c.request.times["prefill_start"] == 1.0 for c in first)
    assert [c.request.request_id for c in p.schedule(2.0)] == ["r2", "r3"]


def test_long_prompt_runs_alone_and_head_waits_for_blocks():
    bm = BlockManager(4, 16)
    p = PrefillPolicy(bm, max_batch_tokens=32)
    p.add(_req(0, 60), 0.0)                # 4 blocks, longer than the budget: runs alone
    p.add(_req(1, 5), 0.0)
    assert [c.num_tokens for c in p.schedule(0.0)] == [60]
    assert p.schedule(0.0) == []          # no free block: r1 waits (back-pressure)


def test_decode_preempts_newest_when_blocks_run_out():
    bm = BlockManager(3, 4)
    d = DecodePolicy(bm)
    reqs = []
    for i in range(3):
        r = _req(i, 4)
        r.transition(RequestState.PREFILLING)
        r.block_ids, _ = bm.allocate(r.all_token_ids)
        r.append_token(1)
        d.add(r, 0.0)
        reqs.append(r)
    batch, preempted = d.schedule(1.0)      # each needs a 2nd block; only 0 free
    assert preempted == [reqs[2], reqs[1]] and batch == [reqs[0]]
    assert reqs[2].state is RequestState.QUEUED and reqs[2].block_ids == [] and reqs[2].output_token_ids == [1]


def test_chunked_mode_mixes_decodes_and_prefill_chunks():
    bm = BlockManager(64, 16)
    pol = ColocatedPolicy(bm, mode="chunked", chunk_tokens=32)
    pol.add(_req(0, 50), 0.0)
    b1 = pol.schedule(0.0)
    assert [(c.start, c.num_tokens, c.is_last) for c in b1.prefill] == [(0, 32, False)]
    pol.complete(b1, [], 0.1)
    b2 = pol.schedule(0.1)
    assert [(c.start, c.num_tokens, c.is_last) for c in b2.prefill] == [(32, 18, True)]
    b2.prefill[0].request.append_token(5)
    pol.complete(b2, [], 0.2)
    pol.add(_req(1, 40), 0.2)
    b3 = pol.schedule(0.3)
    assert len(b3.decode) == 1 and b3.num_prefill_tokens == 31    # 32 - one decode token


def test_routing_rules():
    from engine.routing import pick_decode, pick_prefill
    assert pick_prefill([30, 10, 10]) == 1
    assert pick_prefill([0, 0, 0], [5, 2, 2]) == 1            # ties: the least used
    assert pick_decode([4, 9, 9], 3) == 1                     # most free blocks, lowest index
    assert pick_decode([4, 2], 5) is None                     # nobody can take it


def test_a_request_cancelled_during_its_recompute_does_not_decode():
    from engine.batching import finish
    from engine.request import FinishReason
    bm = BlockManager(16, 16)
    pol = ColocatedPolicy(bm)
    r = _req(0, 20)
    pol.add(r, 0.0)
    batch = pol.schedule(0.0)
    finish(r, FinishReason.CANCELLED, 0.1)        # cancelled while the batch ran
    pol.complete(batch, [], 0.2)
    assert pol.decode.running == []

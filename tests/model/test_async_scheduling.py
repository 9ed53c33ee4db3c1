"""Async scheduling (model/async_step.py) on CPU: the in-process engine gives the same tokens
with and without it — greedy and seeded sampling, stop tokens and max_tokens (no extra token
after a finish), chunked mixed batches, penalties and logprobs (which drain), preemption
(which drains), step isolation, and cancellation mid-stream — and every KV block is free at
the end. On CPU the overlap itself gains little; these check that it is exact."""
import pytest

from engine.sampling_params import SamplingParams
from model.async_step import PLACEHOLDER, async_scheduling_enabled
from model.llm import LLM
from tests.model.test_step_isolation import MARKER, _inject

MODEL = "tiny-llama"
PROMPTS = [[(7 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate([40, 5, 23, 61, 12, 30, 9, 44])]


def _run(prompts, sp, on: bool, **kw):
    llm = LLM(MODEL, async_scheduling=on, **kw)
    outs = llm.generate(prompts, sp)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    assert all(PLACEHOLDER not in o.token_ids for o in outs)
    return llm, outs


def _same(prompts, sp, **kw):
    """Tokens and finish reasons with async scheduling equal those without."""
    _, off = _run(prompts, sp, False, **kw)
    llm, on = _run(prompts, sp, True, **kw)
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert [o.finish_reason for o in on] == [o.finish_reason for o in off]
    return llm, on, off


@pytest.mark.parametrize("mode", ["prefill_first", "chunked"])
def test_greedy_tokens_unchanged_and_steps_overlap(mode):
    sp = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (1, 2, 9, 16, 3, 12, 7, 16)]
    llm, on, _ = _same(PROMPTS, sp, mode=mode, chunk_tokens=32)
    assert [len(o.token_ids) for o in on] == [1, 2, 9, 16, 3, 12, 7, 16]    # max_tokens exact
    assert llm.core.async_steps.num_overlapped > 10
    if mode == "chunked":
        assert llm.runner.num_mixed_steps > 0


def test_seeded_sampling_unchanged():
    sp = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=100 + i, ignore_eos=True)
          for i in range(len(PROMPTS))]
    _same(PROMPTS, sp, mode="chunked", chunk_tokens=32)


def test_stop_token_ends_without_an_extra_token():
    free = [o.token_ids for o in _run(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True), False)[1]]
    # Each request stops on the token it would produce 4th (a different step for each).
    sp = [SamplingParams(max_tokens=16, stop_token_ids=[t[3]], ignore_eos=True) for t in free]
    _, on, _ = _same(PROMPTS, sp)
    for o, t in zip(on, free):
        assert o.finish_reason == "stop" and o.token_ids == t[:t.index(t[3]) + 1]


def test_penalties_and_logprobs_match():
    sp = [SamplingParams(max_tokens=6, ignore_eos=True, **kw) for kw in
          ({"repetition_penalty": 1.3}, {"logprobs": 2}, {}, {"presence_penalty": 0.5, "temperature": 0.7, "seed": 3},
           {}, {}, {"frequency_penalty": 0.4}, {})]
    llm, on, off = _same(PROMPTS, sp)
    assert [o.logprobs for o in on] == [o.logprobs for o in off]
    # Once they are done, the plain requests overlap again.
    mixed = [SamplingParams(max_tokens=3, ignore_eos=True, logprobs=1)] + [SamplingParams(max_tokens=10, ignore_eos=True)] * 3
    llm, _, _ = _same(PROMPTS[:4], mixed)
    assert llm.core.async_steps.num_overlapped > 0


def test_preemption_drains_and_tokens_match():
    # A batch limit below the running count: requests that end by length leave the next batch,
    # and the ones behind them that join it are counted before any block is taken.
    sp = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (16, 3, 16, 5, 12)]
    llm, _, _ = _same(PROMPTS[:5], sp, num_kv_blocks=20, block_size=4, max_batch_size=3)
    assert llm.core.num_preemptions > 0 and llm.core.async_steps.num_drains > 0


def test_step_isolation_with_async():
    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    want = [o.token_ids for o in _run(PROMPTS, sp, False)[1]]
    llm = LLM(MODEL, async_scheduling=True)
    fired = _inject(llm)
    outs = llm.generate(PROMPTS[:3] + [MARKER + [9, 9]] + PROMPTS[3:], sp)
    assert fired and outs[3].finish_reason == "error" and "injected fault" in outs[3].error
    assert [o.token_ids for o in outs[:3] + outs[4:]] == want
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_cancel_mid_stream():
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in _run(PROMPTS, sp, False)[1]]
    llm = LLM(MODEL, async_scheduling=True)
    ids = [llm.add_request(p, sp) for p in PROMPTS]
    streamed = {i: [] for i in ids}
    steps = 0
    while llm.has_unfinished:
        for d in llm.step():
            streamed[d.request_id] += d.token_ids
        steps += 1
        if steps == 6:
            llm.abort(ids[2])
            llm.abort(ids[5])
    outs = [llm.take_result(i) for i in ids]
    for k, (o, w) in enumerate(zip(outs, want)):
        assert streamed[ids[k]] == o.token_ids
        if k in (2, 5):
            assert o.finish_reason == "cancelled" and 0 < len(o.token_ids) < 12 and o.token_ids == w[:len(o.token_ids)]
        else:
            assert o.token_ids == w and o.finish_reason == "length"
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_switch(monkeypatch):
    import torch
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("DISAGG_ASYNC_SCHEDULING", raising=False)
    assert not async_scheduling_enabled(None, cpu, 1, 1) and async_scheduling_enabled(None, cuda, 1, 1)
    assert not async_scheduling_enabled(None, cuda, 2, 1)           # TP peers would need the tokens
    monkeypatch.setenv("DISAGG_ASYNC_SCHEDULING", "0")
    assert not async_scheduling_enabled(None, cuda, 1, 1) and async_scheduling_enabled(True, cpu, 1, 1)
    monkeypatch.setenv("DISAGG_ASYNC_SCHEDULING", "1")
    assert async_scheduling_enabled(None, cpu, 1, 1) and not async_scheduling_enabled(False, cuda, 1, 1)
    assert LLM(MODEL).core.async_steps is not None


@pytest.mark.gpu
def test_async_on_cuda_gives_the_sync_tokens(tmp_path):
    """On the GPU the overlap is real (graphs replayed while the host postprocesses): greedy and
    seeded tokens, prefill-first and chunked, equal the sync loop's, and steps did overlap."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tests.model.hf_checkpoints import make_checkpoint
    make_checkpoint("llama", tmp_path)
    sp = [SamplingParams(max_tokens=m, ignore_eos=True, **kw) for m, kw in
          zip((1, 9, 16, 5, 12, 16, 7, 3), ({}, {"temperature": 0.8, "seed": 7}, {}, {"top_p": 0.9, "temperature": 1.0, "seed": 1},
                                             {}, {}, {"temperature": 0.5, "seed": 2}, {}))]
    for mode in ("prefill_first", "chunked"):
        outs = {}
        for on in (False, True):
            llm = LLM(str(tmp_path), device="cuda", dtype="float32", num_kv_blocks=128, mode=mode,
                      chunk_tokens=40, async_scheduling=on)
            outs[on] = [o.token_ids for o in llm.generate(PROMPTS, sp)]
            if on:
                assert llm.core.async_steps.num_overlapped > 5
        assert outs[True] == outs[False], mode

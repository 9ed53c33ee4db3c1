"""Paged KV cache against a contiguous reference, scattered block tables, and preemption."""
import random

import torch

from engine.sampling_params import SamplingParams
from model.llm import LLM

PROMPTS = [[(7 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate([5, 16, 17, 40, 33, 2, 64, 20])]


def _contiguous_reference(llm: LLM, prompt: list[int], n: int) -> list[int]:
    """No paging and no cache reuse: every step recomputes the whole sequence into blocks
    0..k-1 (a contiguous slab) and takes the argmax at the last position."""
    from engine.batching import Batch, PrefillChunk
    from engine.request import Request
    from model.runner import StepInput
    tokens = list(prompt)
    for _ in range(n):
        r = Request("ref", tokens)
        r.block_ids = list(range(-(-len(tokens) // llm.block_manager.block_size)))
        logits = llm.runner.execute(StepInput.from_batch(Batch(prefill=[PrefillChunk(r, 0, len(tokens))])))
        tokens.append(int(logits[0].argmax()))
    return tokens[len(prompt):]


def test_paged_matches_contiguous_with_scattered_blocks(tmp_path):
    llm = LLM("tiny-llama", block_size=16, num_kv_blocks=96, enable_prefix_caching=False)
    want = [_contiguous_reference(llm, p, 10) for p in PROMPTS]
    # Scatter the free list so block tables are not contiguous.
    free = list(llm.block_manager._free)
    random.Random(0).shuffle(free)
    llm.block_manager._free.clear()
    llm.block_manager._free.update((b, None) for b in free)
    got = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True))]
    assert got == want


def test_preemption_by_recompute_is_token_identical():
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    roomy = LLM("tiny-llama", num_kv_blocks=256)
    want = [o.token_ids for o in roomy.generate(PROMPTS, sp)]
    tight = LLM("tiny-llama", num_kv_blocks=24)          # 8 prompts x up to 7 blocks do not fit
    outs = tight.generate(PROMPTS, sp)
    assert [o.token_ids for o in outs] == want
    assert tight.block_manager.num_free_blocks == 24


def test_preemption_actually_happens():
    tight = LLM("tiny-llama", num_kv_blocks=24)
    ids = [tight.add_request(p, SamplingParams(max_tokens=40, ignore_eos=True)) for p in PROMPTS]
    reqs = [tight.requests[i] for i in ids]
    while tight.has_unfinished:
        tight.step()
    assert sum(r.num_preemptions for r in reqs) > 0


def test_prefix_cache_hits_are_token_identical():
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    shared = list(range(3, 3 + 48))
    prompts = [shared + [100 + i] * (i + 1) for i in range(4)]
    cold = [o.token_ids for o in LLM("tiny-llama", enable_prefix_caching=False).generate(prompts, sp)]
    warm_llm = LLM("tiny-llama")
    warm_llm.generate(prompts[:1], sp)
    outs = warm_llm.generate(prompts, sp)
    assert [o.token_ids for o in outs] == cold
    assert all(o.num_cached_tokens == 48 for o in outs)


def test_seeded_sampling_is_reproducible_and_independent_of_batching():
    sp = SamplingParams(max_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=42, ignore_eos=True)
    a = LLM("tiny-llama").generate(PROMPTS[:1], sp)[0].token_ids
    b = LLM("tiny-llama").generate(PROMPTS, sp)[0].token_ids
    assert a == b
    other = LLM("tiny-llama").generate(PROMPTS[:1], SamplingParams(max_tokens=12, temperature=0.8, seed=43, ignore_eos=True))
    assert other[0].token_ids != a


def test_stop_strings_cut_text_and_finish():
    llm = LLM("embedded")
    free_run = llm.generate(["Hello there"], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    assert len(free_run.text) > 4
    stop = free_run.text[3:5]
    out = llm.generate(["Hello there"], SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == free_run.text[:free_run.text.find(stop)]
    assert torch.tensor(out.token_ids).numel() < 24

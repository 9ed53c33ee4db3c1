"""Greedy generation through our loader and engine is token-identical to HF transformers."""
import random

import pytest
import torch

from engine.sampling_params import SamplingParams
from model.llm import LLM
from tests.model.hf_checkpoints import make_checkpoint

NUM_PROMPTS = 8
MAX_TOKENS = 12


def _prompts(seed=0, vocab=300):
    rng = random.Random(seed)
    # Lengths cross the 16-token block boundary in several ways.
    lengths = [3, 15, 16, 17, 31, 33, 47, 64][:NUM_PROMPTS]
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def _hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2", "mistral"])
def test_greedy_matches_hf(tmp_path, arch):
    hf = make_checkpoint(arch, tmp_path, max_shard_size="60KB" if arch == "llama" else None)
    if arch == "llama":
        assert (tmp_path / "model.safetensors.index.json").exists(), "the llama case must load sharded files"
    prompts = _prompts()
    llm = LLM(str(tmp_path), block_size=16, num_kv_blocks=128)
    sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    ours = [o.token_ids for o in llm.generate(prompts, sp)]
    want = [_hf_greedy(hf, p, MAX_TOKENS) for p in prompts]
    assert ours == want


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_last_position_logits_close_to_hf(tmp_path, arch):
    """fp32 on CPU: our last-position logits agree with HF's to 1e-4 absolute."""
    hf = make_checkpoint(arch, tmp_path)
    prompts = _prompts(seed=1)
    llm = LLM(str(tmp_path), block_size=16, num_kv_blocks=64)
    from engine.batching import Batch, PrefillChunk
    from model.runner import StepInput
    reqs = [llm.inputs.build(p) for p in prompts]
    for r in reqs:
        r.block_ids, _ = llm.block_manager.allocate(r.all_token_ids)
    ours = llm.runner.execute(StepInput.from_batch(Batch(prefill=[PrefillChunk(r, 0, r.num_tokens) for r in reqs])))
    with torch.no_grad():
        ref = torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in prompts])
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=1e-4)

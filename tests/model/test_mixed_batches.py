"""Chunked prefill's mixed steps: prefill chunks and decode tokens in one forward pass.

On CPU: the packed metadata says what the list form says; one mixed pass gives the logits of
the prefill pass plus the decode pass it replaces; the in-process engine in chunked mode gives
the greedy tokens of prefill-first. On the GPU (`-m gpu`): chunked mode on CUDA gives the CPU
path's tokens, and mixed steps really ran.
"""
import pytest
import torch

from engine.sampling_params import SamplingParams
from model.attention_metadata import AttentionMetadata, mixed_metadata, pack_mixed
from model.llm import LLM
from model.runner import ModelRunner, StepInput
from tests.model.test_cuda_graphs import BS, _decode_seqs, _tiny

PROMPTS = [[(11 * i + j) % 290 + 3 for j in range(n)] for i, n in enumerate([70, 5, 33, 120, 17, 48])]


def test_pack_mixed_layout():
    chunks = [([7, 8, 9], 16, [4, 2], True), ([5] * 20, 0, [9, 3], False)]
    seqs = [(11, 40, [1, 6, 8]), (12, 0, [5])]
    packed, at = pack_mixed(chunks, seqs, BS)
    ids, pos, meta, want = mixed_metadata(torch.from_numpy(packed).long(), at)
    assert ids.tolist() == [7, 8, 9] + [5] * 20 + [11, 12]
    assert pos.tolist() == [16, 17, 18] + list(range(20)) + [40, 0]
    slots = [2 * BS + p for p in range(3)] + [(9 if p < BS else 3) * BS + p % BS for p in range(20)]
    assert meta.slot_mapping.tolist() == slots + [8 * BS + 8, 5 * BS]
    assert meta.kind == "mixed" and meta.num_prefill_tokens == 23 and meta.max_prefix_len == 16
    assert meta.cu_seqlens.tolist() == [0, 3, 23] and meta.prefix_lens.tolist() == [16, 0]
    assert meta.block_tables.tolist() == [[4, 2, 0], [9, 3, 0]]
    assert meta.decode_block_tables.tolist() == [[1, 6, 8], [5, 0, 0]]
    assert meta.context_lens.tolist() == [41, 1]
    assert want.tolist() == [2, 23, 24]
    assert packed.dtype.name == "int32" and all(off % 4 == 0 for k, (off, _) in
                                                ((k, v) for k, v in at.items() if isinstance(v, tuple)))
    with pytest.raises(ValueError, match="mixed"):
        AttentionMetadata(kind="mixed", slot_mapping=meta.slot_mapping, block_tables=meta.block_tables)


def test_one_mixed_pass_equals_prefill_then_decode():
    model, kv = _tiny("cpu")
    separate = ModelRunner(model, kv, BS, mixed_batches=False)
    mixed = ModelRunner(model, kv, BS)
    seqs = _decode_seqs(3, context=40, seed=1)
    # A later chunk over a cached prefix, and a new sequence (blocks apart from the decodes').
    used = {b for s in seqs for b in s[2]}
    free = [b for b in range(1, kv.shape[2]) if b not in used]
    chunks = [(list(range(3, 3 + 21)), 32, free[:4], True), (list(range(40, 49)), 0, free[4:5], True)]
    separate.prefill([(list(range(60, 92)), 0, free[:4], False)])      # the first chunk's KV
    step = StepInput(prefill=chunks, decode=seqs)
    want = separate.execute(step).clone()
    assert mixed._use_mixed(step, None) and not separate._use_mixed(step, None)
    got = mixed.execute(step)
    assert got.shape == want.shape == (5, model.cfg.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_chunked_mode_tokens_equal_prefill_first():
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    first = LLM("tiny-llama", num_kv_blocks=128, mode="prefill_first")
    want = [o.token_ids for o in first.generate(PROMPTS, sp)]
    chunked = LLM("tiny-llama", num_kv_blocks=128, mode="chunked", chunk_tokens=40)
    calls = []
    run_mixed = chunked.runner.mixed
    chunked.runner.mixed = lambda c, s, *a: calls.append(len(s)) or run_mixed(c, s, *a)
    assert [o.token_ids for o in chunked.generate(PROMPTS, sp)] == want
    assert len(calls) >= 3 and max(calls) >= 2          # several steps carried decodes with chunks


@pytest.mark.gpu
def test_chunked_mode_on_cuda_matches_cpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tests.model.hf_checkpoints import make_checkpoint
    make_checkpoint("llama", tmp_path)
    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    tokens = {}
    for name, device, mode in (("cpu", "cpu", "prefill_first"), ("cuda", "cuda", "chunked")):
        llm = LLM(str(tmp_path), device=device, dtype="float32", block_size=BS, num_kv_blocks=128,
                  mode=mode, chunk_tokens=40)
        tokens[name] = [o.token_ids for o in llm.generate(PROMPTS, sp)]
    assert tokens["cuda"] == tokens["cpu"]

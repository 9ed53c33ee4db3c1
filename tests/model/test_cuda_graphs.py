"""Decode and prefill CUDA graphs and the packed step inputs behind them.

On CPU: the packed prefill metadata equals the lists the oracle path builds, and decode and
prefill steps run from the graphs' padded input buffers (without a graph) give the eager steps'
logits and write nothing for their padding rows. On the GPU (`-m gpu`): graph decode and prefill
give the same greedy tokens as eager CUDA and as the CPU path, prefill's layer hook still runs
(once after a replay, per layer when eager), and the decode step makes no host synchronisation.
"""
import numpy as np
import pytest
import torch

from engine.sampling_params import SamplingParams
from model.cuda_graph import DecodeInputs, PrefillInputs, graph_batch_sizes, pack_prefill, prefill_graph_sizes
from model.kv_cache import allocate_kv_cache
from model.loader import build_model
from model.runner import ModelRunner, StepInput

PROMPTS = [[(5 * i + j) % 290 + 3 for j in range(n)] for i, n in enumerate([3, 16, 17, 40, 64, 1])]
BS = 16


def test_graph_batch_sizes_ladder():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    sizes = graph_batch_sizes(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-1] == 256 and sizes == sorted(set(sizes))
    with pytest.raises(ValueError):
        graph_batch_sizes(0)


def test_prefill_graph_sizes_ladder():
    assert prefill_graph_sizes(1) == [1]
    assert prefill_graph_sizes(100) == [16, 32, 48, 64, 96, 100]
    sizes = prefill_graph_sizes(1024)
    assert sizes[:8] == [16, 32, 48, 64, 96, 128, 192, 256] and sizes[-1] == 1024
    assert sizes == sorted(set(sizes)) and all(b - a <= max(a, 128) for a, b in zip(sizes, sizes[1:]))
    with pytest.raises(ValueError):
        prefill_graph_sizes(0)


def test_prefill_inputs_layout_and_errors():
    inp = PrefillInputs(64, max_seqs=3, block_size=BS, device="cpu")
    chunks = [([7, 8, 9], 0, [3], True), (list(range(20)), 0, [9, 2], False), ([4], 0, [6], True)]
    assert inp.fill(chunks, 32) == 2
    inp.upload(32)
    ids, pos, meta = inp.views(32)
    assert ids.tolist() == [7, 8, 9] + list(range(20)) + [4] + [0] * 8
    assert pos.tolist() == [0, 1, 2] + list(range(20)) + [0] + [0] * 8
    slots = [3 * BS + p for p in range(3)] + [(9 if p < BS else 2) * BS + p % BS for p in range(20)]
    assert meta.slot_mapping.tolist() == slots + [6 * BS] + [-1] * 8
    # real sequences, the padding sequence up to 32, then an empty one (max_seqs + 1 in all)
    assert meta.cu_seqlens.tolist() == [0, 3, 23, 24, 32]
    assert inp.want(32, 2).tolist() == [2, 23]
    assert all(t.data_ptr() % 16 == 0 for t in (ids, pos, meta.slot_mapping, meta.cu_seqlens))
    inp.fill(chunks[:1], 16)                # a smaller size: its own layout, fully rewritten
    inp.upload(16)
    assert inp.views(16)[2].cu_seqlens.tolist() == [0, 3, 16, 16, 16]
    with pytest.raises(ValueError, match="sequences"):
        inp.fill(chunks + chunks, 64)
    with pytest.raises(ValueError, match="do not fit"):
        inp.fill(chunks, 16)


@torch.inference_mode()
def test_padded_prefill_inputs_match_eager_on_cpu():
    model, kv = _tiny("cpu")
    chunks = [(PROMPTS[i], 0, [3 * i, 3 * i + 1, 3 * i + 2, 40 + 3 * i], i != 2) for i in range(5)]
    kv_eager = kv.clone()
    want = ModelRunner(model, kv_eager, BS).prefill(chunks)
    inp = PrefillInputs(256, max_seqs=8, block_size=BS, device="cpu")
    n = inp.fill(chunks, 192)
    inp.upload(192)
    ids, pos, meta = inp.views(192)
    kv_padded = kv.clone()
    hidden = model(ids, pos, kv_padded, meta)
    got = model.compute_logits(hidden.index_select(0, inp.want(192, n).long()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The padding tokens wrote nothing: both caches hold the same KV everywhere.
    torch.testing.assert_close(kv_padded, kv_eager, rtol=1e-6, atol=1e-6)


def test_pack_prefill_matches_list_metadata():
    chunks = [([7, 8, 9], 0, [3], True), (list(range(20)), 5, [9, 2], False), ([4], 31, [1, 6], True)]
    packed, at = pack_prefill(chunks, BS)

    def field(name):
        off, n = at[name]
        return packed[off:off + n].tolist()
    assert field("ids") == [7, 8, 9] + list(range(20)) + [4]
    assert field("positions") == [0, 1, 2] + list(range(5, 25)) + [31]
    want_slots = [3 * BS + p for p in range(3)]
    want_slots += [(9 if p < BS else 2) * BS + p % BS for p in range(5, 25)]
    want_slots += [6 * BS + 31 % BS]
    assert field("slots") == want_slots
    assert field("cu_seqlens") == [0, 3, 23, 24] and field("prefix_lens") == [0, 5, 31]
    assert at["width"] == 2 and field("block_tables") == [3, 0, 9, 2, 1, 6]
    assert field("want") == [2, 23]


def test_decode_inputs_rewrite_only_what_changed():
    inp = DecodeInputs(8, width=4, block_size=BS, device="cpu")
    table = [5, 6]
    inp.fill([(1, 20, table), (2, 3, [7])], 4)
    bt = inp.host_np[16:32].reshape(4, 4)
    assert bt[0, :2].tolist() == [5, 6] and bt[1, 0] == 7 and bt[2:, 0].tolist() == [0, 0]
    assert inp.host_np[8:12].tolist() == [6 * BS + 4, 7 * BS + 3, -1, -1]       # slots
    assert inp.host_np[12:16].tolist() == [21, 4, 1, 1]                           # context lens
    table.append(9)                 # the caller grows its list: the next fill must see the tail
    inp.fill([(1, 33, table), (3, 0, [2, 4])], 4)   # row 1 is another sequence now
    assert bt[0, :3].tolist() == [5, 6, 9] and bt[1, :2].tolist() == [2, 4]
    inp.fill([(3, 0, [8])], 2)      # another graph size: another layout
    assert inp.host_np[8:16].reshape(2, 4)[:, 0].tolist() == [8, 0]


def _tiny(device, dtype=torch.float32, num_blocks=64):
    """tiny-llama with its dummy weights and a random KV cache drawn on CPU, then moved, so that
    every device runs the same model (CUDA generators draw other numbers)."""
    model = build_model("tiny-llama", device="cpu", dtype="float32")
    cos_sin = model.cos_sin
    model = model.to(device=device, dtype=dtype)
    model.cos_sin = cos_sin.to(device)      # the rotary table stays fp32
    cfg = model.cfg
    kv = allocate_kv_cache(cfg.num_layers, num_blocks, BS, cfg.num_kv_heads, cfg.head_dim, dtype, "cpu")
    kv.normal_(generator=torch.Generator().manual_seed(1))
    return model, kv.to(device)


def _decode_seqs(num_seqs, context=40, seed=0):
    g = np.random.default_rng(seed)
    blocks = g.permutation(60)[:num_seqs * 3].reshape(num_seqs, 3).tolist()
    return [(int(g.integers(3, 250)), context - 1 - i, blocks[i]) for i in range(num_seqs)]


@torch.inference_mode()
def test_padded_decode_inputs_match_eager_on_cpu():
    model, kv = _tiny("cpu")
    seqs = _decode_seqs(3)
    kv_eager = kv.clone()
    want = ModelRunner(model, kv_eager, BS).decode(seqs)
    inp = DecodeInputs(8, width=5, block_size=BS, device="cpu")
    inp.fill(seqs, 8)
    inp.upload(8)
    ids, pos, meta = inp.views(8)
    kv_padded = kv.clone()
    got = model.compute_logits(model(ids, pos, kv_padded, meta)[:3])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The padding rows wrote nothing: both caches hold the same KV everywhere.
    torch.testing.assert_close(kv_padded, kv_eager, rtol=1e-6, atol=1e-6)


# GPU ------------------------------------------------------------------------------------------
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_graph_decode_tokens_match_eager_and_cpu(tmp_path, monkeypatch, arch):
    _needs_cuda()
    from model.llm import LLM
    from tests.model.hf_checkpoints import make_checkpoint
    make_checkpoint(arch, tmp_path)
    # Different lengths: the batch shrinks as requests finish, so several graph sizes replay.
    params = [SamplingParams(max_tokens=6 + 3 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    tokens, llms = {}, {}
    for name, device, eager in (("cpu", "cpu", "0"), ("eager", "cuda", "1"), ("graph", "cuda", "0")):
        monkeypatch.setenv("DISAGG_ENFORCE_EAGER", eager)
        # fp32 everywhere: the kernels then use exact fp32 products, so argmaxes agree
        llm = LLM(str(tmp_path), device=device, dtype="float32", block_size=BS, num_kv_blocks=64)
        tokens[name] = [o.token_ids for o in llm.generate(PROMPTS, params)]
        llms[name] = llm
    assert llms["eager"].runner.graphs is None
    assert llms["graph"].runner.graphs is not None and llms["graph"].runner.graphs.num_replays > 10
    assert llms["graph"].runner.prefill_graphs.num_replays >= 1       # the prompts' prefill
    assert tokens["graph"] == tokens["eager"] == tokens["cpu"]


@pytest.mark.gpu
def test_graph_decode_bf16_close_to_eager_without_host_sync():
    _needs_cuda()
    model, kv = _tiny("cuda", torch.bfloat16)
    graph_runner = ModelRunner(model, kv, BS, max_batch_size=16)
    eager_runner = ModelRunner(model, kv, BS, enforce_eager=True)
    for n in (1, 3, 9, 16, 17):     # 17 is past the largest graph: it runs eagerly
        seqs = _decode_seqs(min(n, 20), seed=n)
        want = eager_runner.execute(StepInput(decode=seqs)).clone()
        replays = graph_runner.graphs.num_replays
        torch.cuda.synchronize()
        # A graph step must not synchronise: "error" raises on any synchronising CUDA call.
        torch.cuda.set_sync_debug_mode("error" if n <= 16 else "default")
        try:
            got = graph_runner.execute(StepInput(decode=seqs))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert graph_runner.graphs.num_replays == replays + (n <= 16)
        err = (got - want).norm() / want.norm()
        assert got.shape == want.shape and err < 2e-2, (n, float(err))


@pytest.mark.gpu
def test_prefill_layer_hook_runs_with_graphs():
    _needs_cuda()
    model, kv = _tiny("cuda")
    runner = ModelRunner(model, kv, BS, max_prefill_graph_tokens=32)
    assert runner.graphs is not None and runner.prefill_graphs is not None
    ref_model, ref_kv = _tiny("cpu")
    ref_runner = ModelRunner(ref_model, ref_kv, BS)
    last = model.cfg.num_layers - 1
    # 40 tokens: past the largest prefill graph, so eager, and the hook runs after every layer;
    # 17 tokens: a replay, after which the hook runs once for the last layer (all are queued).
    for prompt, table, hooks in ((PROMPTS[3], [4, 5, 6], list(range(last + 1))), (PROMPTS[2], [7, 8], [last])):
        seen, replays = [], runner.prefill_graphs.num_replays
        logits = runner.execute(StepInput(prefill=[(prompt, 0, table, True)]), layer_hook=seen.append)
        assert seen == hooks and logits.shape == (1, model.cfg.vocab_size)
        assert runner.prefill_graphs.num_replays == replays + (len(hooks) == 1)
        ref = ref_runner.execute(StepInput(prefill=[(prompt, 0, table, True)]))
        assert int(logits.argmax()) == int(ref.argmax())


@pytest.mark.gpu
def test_graph_prefill_bf16_close_to_eager():
    _needs_cuda()
    model, kv = _tiny("cuda", torch.bfloat16)
    graph_runner = ModelRunner(model, kv, BS, max_prefill_graph_tokens=128)
    eager_runner = ModelRunner(model, kv, BS, enforce_eager=True)
    kv_graph = graph_runner.kv_cache
    cases = [  # (chunks, replayed?)
        ([(PROMPTS[5], 0, [1], True)], True),                               # one token
        ([(PROMPTS[i], 0, [2 * i + 1, 2 * i + 2, 30 + i, 40 + i], True) for i in (0, 1, 2, 3, 5)], True),
        ([(PROMPTS[3], 0, [9, 10, 11], False), (PROMPTS[4], 0, [12, 13, 14, 15], True)], True),
        ([(PROMPTS[1], 16, [20, 21], True)], False),                        # a cached prefix: eager
        ([(PROMPTS[4] * 3, 0, list(range(50, 63)), True)], False),          # 192 tokens > 128
    ]
    for chunks, replayed in cases:
        kv_before = kv.clone()
        want = eager_runner.execute(StepInput(prefill=chunks)).clone()
        kv_want = kv.clone()
        kv.copy_(kv_before)
        replays = graph_runner.prefill_graphs.num_replays
        got = graph_runner.execute(StepInput(prefill=chunks))
        assert graph_runner.prefill_graphs.num_replays == replays + replayed
        err = (got - want).norm() / want.norm()
        assert got.shape == want.shape and err < 2e-2, (chunks, float(err))
        # the same KV written (GEMMs over padded rows may round differently), nothing elsewhere
        assert float((kv_graph.float() - kv_want.float()).norm() / kv_want.float().norm()) < 1e-2
        untouched = kv_want == kv_before
        assert torch.equal(kv_graph[untouched], kv_before[untouched])

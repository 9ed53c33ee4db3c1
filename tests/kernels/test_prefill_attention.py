"""Causal varlen prefill attention with GQA and a paged prefix, against the reference."""
import pytest
import torch

from kernels import prefill_attention as mod
from kernels import prefill_attention_v2 as v2
from tests.kernels.helpers import assert_close, block_tables, cu_seqlens

# (q heads, kv heads, head dim, block size, new lengths, prefix lengths or None). Lengths are
# ragged, include 0 and 1, and cross the interpreter's 32-row and the GPU's 128-row tiles.
CASES = [
    pytest.param(2, 2, 64, 16, [1, 17, 70], None, id="gqa1-d64-bs16"),
    pytest.param(8, 2, 128, 32, [33, 0, 5, 130], [20, 7, 64, 1], id="gqa4-d128-bs32-prefix"),
    pytest.param(8, 1, 64, 16, [40, 3], [0, 50], id="gqa8-d64-bs16-prefix"),
    pytest.param(4, 1, 128, 16, [65, 2], None, id="gqa4-d128-bs16"),
    pytest.param(2, 1, 80, 16, [19, 33], [16, 5], id="gqa2-d80-prefix"),
    pytest.param(4, 2, 16, 16, [9, 40], [3, 0], id="gqa2-d16-prefix"),
    # a prefill graph's padded batch: the real sequences, a padding sequence, then empty ones
    pytest.param(4, 1, 64, 16, [5, 30, 13, 0, 0, 0], None, id="gqa4-d64-graph-padding"),
]
LONG = [  # GPU only: many tiles per sequence, long prefixes
    pytest.param(32, 8, 128, 16, [700, 129, 1000], [300, 0, 1200], id="gqa4-d128-long",
                 marks=pytest.mark.gpu),
]


def _inputs(target, gen, hq, hk, d, bs, lens, prefix):
    T = sum(lens)
    q, k, v = (target.randn(T, h, d, gen=gen) for h in (hq, hk, hk))
    kw = {}
    if prefix is not None:
        max_blocks = -(-max(prefix) // bs) + 1
        nb = len(lens) * max_blocks + 3
        kw = dict(k_cache=target.randn(nb, bs, hk, d, gen=gen),
                  v_cache=target.randn(nb, bs, hk, d, gen=gen),
                  block_tables=block_tables(len(lens), max_blocks, nb, gen, target.device),
                  prefix_lens=torch.tensor(prefix, dtype=torch.int32, device=target.device))
    return q, k, v, cu_seqlens(lens, target.device), kw


@pytest.mark.parametrize("hq,hk,d,bs,lens,prefix", CASES + LONG)
def test_prefill_matches_reference(target, gen, hq, hk, d, bs, lens, prefix):
    if target.device == "cpu" and max(lens) > 200:
        pytest.skip("long case is GPU only")
    q, k, v, cu, kw = _inputs(target, gen, hq, hk, d, bs, lens, prefix)
    out = mod.prefill_attention(q, k, v, cu, d ** -0.5, impl="triton", **kw)
    assert_close(out, mod.prefill_attention_ref(q, k, v, cu, d ** -0.5, **kw), target)


@pytest.mark.gpu
@pytest.mark.parametrize("lens,prefix", [([700, 129, 1000], [300, 0, 1200]), ([1, 64, 65, 3], None)])
def test_tma_path_matches_reference(gen, lens, prefix):
    # The bulk-copy (TMA) variant only exists compiled on Hopper; force it whatever the default.
    from tests.kernels.helpers import Target
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a Hopper GPU")
    target = Target("cuda", torch.bfloat16)
    q, k, v, cu, kw = _inputs(target, gen, 16, 4, 128, 16, lens, prefix)
    args = (q, k, v, cu, 0.088, kw.get("k_cache"), kw.get("v_cache"), kw.get("block_tables"),
            kw.get("prefix_lens"))
    for cfg in (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=True),
                dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, TMA=True)):
        assert_close(mod._launch(*args, config=cfg), mod.prefill_attention_ref(*args), target)


def test_prefill_fp16_on_interpreter(gen):
    from tests.kernels.helpers import Target
    target = Target("cpu", torch.float16)
    q, k, v, cu, kw = _inputs(target, gen, 4, 1, 64, 16, [20, 37], [5, 16])
    out = mod.prefill_attention(q, k, v, cu, 0.125, impl="triton", **kw)
    assert_close(out, mod.prefill_attention_ref(q, k, v, cu, 0.125, **kw), target)


def test_zero_prefix_lengths_equal_no_prefix(target, gen):
    q, k, v, cu, kw = _inputs(target, gen, 4, 2, 64, 16, [30, 12], [0, 0])
    with_prefix = mod.prefill_attention(q, k, v, cu, 0.125, impl="triton", **kw)
    without = mod.prefill_attention(q, k, v, cu, 0.125, impl="triton")
    assert_close(with_prefix, without, target)


def test_strided_qkv_views(target, gen):
    T, hq, hk, d = 45, 4, 2, 64
    qkv = target.randn(T, (hq + 2 * hk) * d, gen=gen)
    q = qkv[:, :hq * d].view(T, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(T, hk, d)
    v = qkv[:, (hq + hk) * d:].view(T, hk, d)
    cu = cu_seqlens([12, 33], target.device)
    out = mod.prefill_attention(q, k, v, cu, 0.125, impl="triton")
    assert_close(out, mod.prefill_attention_ref(q, k, v, cu, 0.125), target)


def test_launcher_errors():
    q, k, v = torch.randn(10, 4, 64), torch.randn(10, 2, 64), torch.randn(10, 2, 64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    call = lambda **over: mod.prefill_attention(**{**dict(q=q, k=k, v=v, cu_seqlens=cu, scale=0.1),
                                                   **over}, impl="triton")
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(cu_seqlens=cu.long())
    with pytest.raises(ValueError, match="multiple of KV heads"):
        call(k=torch.randn(10, 3, 64), v=torch.randn(10, 3, 64))
    with pytest.raises(ValueError, match="k must be one of"):
        call(k=k.half())
    with pytest.raises(ValueError, match="v must have shape"):
        call(v=torch.randn(10, 2, 32))
    with pytest.raises(ValueError, match="needs k_cache"):
        call(prefix_lens=torch.zeros(2, dtype=torch.int32))
    cache = torch.randn(4, 16, 2, 64)
    bt = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_tables"):
        call(k_cache=cache, v_cache=cache, block_tables=bt.long(), prefix_lens=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="prefix_lens must have shape"):
        call(k_cache=cache, v_cache=cache, block_tables=bt, prefix_lens=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="k_cache must have shape"):
        call(k_cache=torch.randn(4, 16, 4, 64), v_cache=cache, block_tables=bt,
             prefix_lens=torch.zeros(2, dtype=torch.int32))


def test_dispatch(target, gen, monkeypatch):
    calls = []
    monkeypatch.setattr(mod, "_launch", lambda *a, **kw: calls.append(1) or a[0])
    q, k, v, cu, _ = _inputs(target, gen, 2, 1, 64, 16, [3], None)
    mod.prefill_attention(q, k, v, cu, 0.1)
    mod.prefill_attention(q, k, v, cu, 0.1, impl="torch")
    assert len(calls) == (1 if target.device == "cuda" else 0)


# The v2 kernel (tensor descriptors, optional persistent / warp-specialised loops).
# Small tiles on the interpreter; the descriptors are made on the host or in the kernel.
V2_CPU_MODES = {
    "host": dict(),
    "single": dict(SINGLE_LOOP=True),
    "persist-dev-ws-single": dict(PERSISTENT=True, DEVICE_DESC=True, WS=True, SINGLE_LOOP=True),
}


@pytest.mark.parametrize("mode", list(V2_CPU_MODES))
@pytest.mark.parametrize("hq,hk,d,bs,lens,prefix", [c for c in CASES if c.id != "gqa2-d80-prefix"])
def test_v2_matches_reference(gen, mode, hq, hk, d, bs, lens, prefix, monkeypatch):
    # CPU (interpreter) only: the GPU tiles run in test_v2_gpu_variants_match_reference
    from tests.kernels.helpers import Target
    target = Target("cpu", torch.float32)
    calls = []
    monkeypatch.setattr(v2, "launch_v2", lambda *a, _f=v2.launch_v2: calls.append(1) or _f(*a))
    q, k, v, cu, kw = _inputs(target, gen, hq, hk, d, bs, lens, prefix)
    tiles = dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1)
    args = (q, k, v, cu, d ** -0.5, kw.get("k_cache"), kw.get("v_cache"), kw.get("block_tables"),
            kw.get("prefix_lens"))
    out = mod._launch(*args, config=dict(VARIANT="v2", **tiles, **V2_CPU_MODES[mode]))
    assert calls, "the v2 kernel did not run"
    assert_close(out, mod.prefill_attention_ref(*args), target)


def test_v2_falls_back_to_v1_for_odd_head_dims(gen, monkeypatch):
    calls = []
    monkeypatch.setattr(v2, "launch_v2", lambda *a: calls.append(1))
    from tests.kernels.helpers import Target
    target = Target("cpu", torch.float32)
    q, k, v, cu, _ = _inputs(target, gen, 2, 1, 80, 16, [19, 33], None)
    out = mod._launch(q, k, v, cu, 0.1, None, None, None, None, config=dict(VARIANT="v2"))
    assert not calls
    assert_close(out, mod.prefill_attention_ref(q, k, v, cu, 0.1), target)


def _is_unsupported(e: Exception) -> bool:
    """A variant this Triton cannot compile on this GPU (e.g. warp specialisation on Hopper)."""
    return type(e).__name__ in ("CompilationError", "MLIRError", "OutOfResources") \
        or "PassManager" in str(e) or "warp_specialize" in str(e)


# each loop structure once with a cached prefix (a compile per variant and prefix flag costs)
V2_PREFIX_GPU = ["v2-host-128x64-w8-s3", "v2-persist-128x64-w8-s3", "v2-ws-single-dev-128x128-w4-s2"]


@pytest.mark.gpu
@pytest.mark.parametrize("name,lens,prefix", [
    *[pytest.param(n, [1, 64, 65, 3, 2048], None, id=f"{n}-ragged") for n in v2.V2_CONFIGS],
    *[pytest.param(n, [700, 129, 1000], [300, 0, 1200], id=f"{n}-prefix") for n in V2_PREFIX_GPU]])
def test_v2_gpu_variants_match_reference(gen, name, lens, prefix):
    # Every variant the benchmark measures, compiled for the GPU with its real tiles, in bf16.
    from tests.kernels.helpers import Target
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a Hopper GPU")
    target = Target("cuda", torch.bfloat16)
    q, k, v, cu, kw = _inputs(target, gen, 32, 8, 128, 16, lens, prefix)
    args = (q, k, v, cu, 128 ** -0.5, kw.get("k_cache"), kw.get("v_cache"), kw.get("block_tables"),
            kw.get("prefix_lens"))
    try:
        out = mod._launch(*args, config=v2.V2_CONFIGS[name])
    except Exception as e:  # noqa: BLE001 - an unsupported variant is reported, a wrong one fails
        if _is_unsupported(e):
            pytest.skip(f"{name} does not compile here: {type(e).__name__}: {str(e)[:200]}")
        raise
    assert_close(out, mod.prefill_attention_ref(*args), target)

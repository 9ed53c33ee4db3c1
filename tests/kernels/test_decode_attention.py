"""Paged decode attention (split-K on and off) against the reference."""
import pytest
import torch

from kernels import decode_attention as mod
from tests.kernels.helpers import assert_close, block_tables

# (q heads, kv heads, head dim, block size, context lengths). Lengths are ragged: 1, exact block
# multiples, and ones crossing the 16/64-token tiles.
CASES = [
    pytest.param(4, 4, 64, 16, [1, 70, 33], id="gqa1-d64-bs16"),
    pytest.param(8, 2, 128, 32, [64, 5, 97], id="gqa4-d128-bs32"),
    pytest.param(8, 1, 64, 16, [48, 130], id="gqa8-d64-bs16"),
    pytest.param(8, 1, 128, 32, [17, 1], id="gqa8-d128-bs32"),
    pytest.param(4, 2, 80, 16, [40, 9], id="gqa2-d80"),
]
LONG = [pytest.param(32, 8, 128, 16, [4000, 1, 2500, 777], id="gqa4-d128-long", marks=pytest.mark.gpu)]
SPLITS = [pytest.param(1, id="split-off"), pytest.param(3, id="split3"), pytest.param(None, id="split-auto")]


def _inputs(target, gen, hq, hk, d, bs, ctx):
    max_blocks = -(-max(ctx) // bs) + 1  # one spare column: tables are wider than contexts
    nb = len(ctx) * max_blocks + 2
    q = target.randn(len(ctx), hq, d, gen=gen)
    kc, vc = target.randn(nb, bs, hk, d, gen=gen), target.randn(nb, bs, hk, d, gen=gen)
    bt = block_tables(len(ctx), max_blocks, nb, gen, target.device)
    return q, kc, vc, bt, torch.tensor(ctx, dtype=torch.int32, device=target.device)


@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("hq,hk,d,bs,ctx", CASES + LONG)
def test_decode_matches_reference(target, gen, hq, hk, d, bs, ctx, splits):
    if target.device == "cpu" and max(ctx) > 200:
        pytest.skip("long case is GPU only")
    q, kc, vc, bt, lens = _inputs(target, gen, hq, hk, d, bs, ctx)
    out = mod.paged_decode_attention(q, kc, vc, bt, lens, d ** -0.5, num_splits=splits, impl="triton")
    assert_close(out, mod.paged_decode_attention_ref(q, kc, vc, bt, lens, d ** -0.5), target)


def test_more_splits_than_tiles_and_empty_context(target, gen):
    # Splits with no tokens must contribute nothing; a zero-length context (a padded batch slot)
    # gives zeros, as the reference does.
    q, kc, vc, bt, lens = _inputs(target, gen, 4, 1, 64, 16, [3, 0, 20])
    out = mod.paged_decode_attention(q, kc, vc, bt, lens, 0.125, num_splits=8, impl="triton")
    assert_close(out, mod.paged_decode_attention_ref(q, kc, vc, bt, lens, 0.125), target)
    assert torch.count_nonzero(out[1]) == 0


@pytest.mark.parametrize("splits", [2, 3, 8])
def test_combining_split_matches_reference(target, gen, splits):
    # The last split of each (sequence, KV head) combines the partials instead of a reduce
    # kernel; its counters must be left at zero, so a second launch is right too. Includes an
    # empty context and more splits than tiles (splits with nothing to attend).
    q, kc, vc, bt, lens = _inputs(target, gen, 8, 2, 64, 16, [50, 0, 7, 33])
    want = mod.paged_decode_attention_ref(q, kc, vc, bt, lens, 0.125)
    for _ in range(2):
        out = mod.paged_decode_attention(q, kc, vc, bt, lens, 0.125, num_splits=splits, impl="triton", combine=True)
        assert_close(out, want, target)
    assert torch.count_nonzero(mod._COUNTERS[str(q.device)]) == 0


def test_decode_fp16_on_interpreter(gen):
    from tests.kernels.helpers import Target
    target = Target("cpu", torch.float16)
    q, kc, vc, bt, lens = _inputs(target, gen, 8, 2, 64, 16, [50, 7])
    out = mod.paged_decode_attention(q, kc, vc, bt, lens, 0.125, num_splits=2, impl="triton")
    assert_close(out, mod.paged_decode_attention_ref(q, kc, vc, bt, lens, 0.125), target)


def test_auto_num_splits():
    assert mod.auto_num_splits(64, 8, 4096, 132) == 1           # enough programs already
    assert mod.auto_num_splits(1, 8, 32768, 132) == 64          # long context, few programs
    assert mod.auto_num_splits(4, 8, 256, 132) == 1             # short contexts stay unsplit
    assert mod.auto_num_splits(16, 8, 16384, 132) == 4          # 512 programs, not 640
    assert mod.auto_num_splits(4, 8, 4096, 132) == 16           # capped at 256 tokens a split


def test_launcher_errors():
    q, kc = torch.randn(2, 4, 64), torch.randn(8, 16, 2, 64)
    bt, lens = torch.zeros(2, 3, dtype=torch.int32), torch.tensor([5, 9], dtype=torch.int32)
    call = lambda **over: mod.paged_decode_attention(
        **{**dict(q=q, k_cache=kc, v_cache=kc, block_tables=bt, context_lens=lens, scale=0.1), **over},
        impl="triton")
    with pytest.raises(ValueError, match="block_tables"):
        call(block_tables=bt.long())
    with pytest.raises(ValueError, match="context_lens"):
        call(context_lens=lens[:1])
    with pytest.raises(ValueError, match="k_cache must have shape"):
        call(k_cache=torch.randn(8, 16, 2, 32))
    with pytest.raises(ValueError, match="v_cache"):
        call(v_cache=torch.randn(8, 16, 2, 64).half())
    with pytest.raises(ValueError, match="multiple of KV heads"):
        call(k_cache=torch.randn(8, 16, 3, 64), v_cache=torch.randn(8, 16, 3, 64))
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        call(k_cache=torch.randn(16, 8, 2, 64).transpose(0, 1))
    with pytest.raises(ValueError, match="num_splits"):
        call(num_splits=0)


def test_dispatch(target, gen, monkeypatch):
    calls = []
    monkeypatch.setattr(mod, "_launch", lambda *a, **kw: calls.append(1) or a[0])
    q, kc, vc, bt, lens = _inputs(target, gen, 2, 1, 64, 16, [5])
    mod.paged_decode_attention(q, kc, vc, bt, lens, 0.1)
    mod.paged_decode_attention(q, kc, vc, bt, lens, 0.1, impl="torch")
    assert len(calls) == (1 if target.device == "cuda" else 0)

"""The fused decode GEMV (kernels/fused_gemv.py) in each prologue/epilogue mode, with and without
split-K, against its unfused torch reference."""
import pytest
import torch

from kernels import fused_gemv as FG
from tests.kernels.helpers import assert_close

CONFIGS = [(16, 32, 4, 2, 1), (16, 32, 4, 2, 2), (32, 16, 4, 1, 3)]


def _norm(target, gen, m, k):
    x = target.randn(m, k, gen=gen)
    g = target.randn(k, gen=gen, scale=0.2) + 1
    return x, (x.float().pow(2).sum(-1), g, 1e-5)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("rows,k,bias,with_norm", [(1, 64, False, True), (3, 96, True, False), (8, 64, False, True)])
def test_store_and_norm_match_reference(target, gen, config, rows, k, bias, with_norm):
    n = 64
    x, norm = _norm(target, gen, rows, k)
    w = target.randn(n, k, gen=gen, scale=0.1)
    b = target.randn(n, gen=gen) if bias else None
    norm = norm if with_norm else None
    ref = FG.fused_gemv_ref(x, w, b, norm=norm)
    for _ in range(2):      # the second launch proves the split-K workspace was left clean
        out = FG.fused_gemv(x, w, b, norm=norm, config=config, impl="triton")
        assert_close(out, ref, target, f"fused_gemv {config}")


@pytest.mark.parametrize("config", CONFIGS[:2])
def test_residual_epilogue_adds_in_place_and_sums_squares(target, gen, config):
    rows, n, k = 5, 64, 64
    x = target.randn(rows, k, gen=gen)
    w = target.randn(n, k, gen=gen, scale=0.1)
    res = target.randn(rows, n, gen=gen)
    ssq0 = torch.rand(rows, generator=gen).to(target.device)
    want_res, want_ssq = res.clone(), ssq0.clone()
    FG.fused_gemv_ref(x, w, residual=(want_res, want_ssq))
    ssq = ssq0.clone()
    out = FG.fused_gemv(x, w, residual=(res, ssq), config=config, impl="triton")
    assert out.data_ptr() == res.data_ptr()
    assert_close(res, want_res, target, "residual")
    assert_close(ssq, want_ssq, target, "ssq")


@pytest.mark.parametrize("config", CONFIGS[:2])
def test_silu_epilogue(target, gen, config):
    rows, inter, k = 4, 32, 64
    x, norm = _norm(target, gen, rows, k)
    w = target.randn(2 * inter, k, gen=gen, scale=0.2)
    ref = FG.fused_gemv_ref(x, w, norm=norm, silu=True)
    out = FG.fused_gemv(x, w, norm=norm, silu=True, config=config, impl="triton")
    assert out.shape == (rows, inter)
    assert_close(out, ref, target, "silu")


def _table(max_pos, d, device):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    f = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat([f.cos(), f.sin()], -1).to(device)


@pytest.mark.parametrize("config", CONFIGS[:2])
@pytest.mark.parametrize("bias", [False, True])
def test_rope_kv_epilogue(target, gen, config, bias):
    rows, hq, hk, d, k, nb, bs = 3, 4, 2, 32, 64, 6, 4
    n = (hq + 2 * hk) * d
    x, norm = _norm(target, gen, rows, k)
    w = target.randn(n, k, gen=gen, scale=0.2)
    b = target.randn(n, gen=gen) if bias else None
    pos = torch.tensor([5, 0, 17], dtype=torch.int32, device=target.device)
    slots = torch.tensor([3, -1, 13], dtype=torch.int64, device=target.device)   # row 1 is padding
    table = _table(32, d, target.device)
    caches = [target.randn(nb, bs, hk, d, gen=gen) for _ in range(2)]
    want_caches = [c.clone() for c in caches]
    ref = FG.fused_gemv_ref(x, w, b, norm=norm, rope_kv=(pos, table, *want_caches, slots, hq, hk))
    out = FG.fused_gemv(x, w, b, norm=norm, rope_kv=(pos, table, *caches, slots, hq, hk), config=config,
                        impl="triton")
    assert_close(out, ref, target, "qkv rows")
    assert_close(caches[0], want_caches[0], target, "k cache")
    assert_close(caches[1], want_caches[1], target, "v cache")


def test_fused_gemv_checks_inputs(target, gen):
    x = target.randn(2, 64, gen=gen)
    w = target.randn(64, 64, gen=gen)
    with pytest.raises(ValueError, match="at most 16 rows"):
        FG.fused_gemv(target.randn(17, 64, gen=gen), w, impl="triton")
    with pytest.raises(ValueError, match="pairs of tiles"):
        FG.fused_gemv(x, target.randn(48, 64, gen=gen), config=(16, 32, 4, 2, 1), impl="triton")
    with pytest.raises(ValueError, match="at most one of"):
        FG.fused_gemv(x, w, residual=(x, x[:, 0]), silu=True, impl="triton")
    with pytest.raises(ValueError, match="need"):
        t = _table(8, 32, target.device)
        c = target.randn(2, 4, 1, 32, gen=gen)
        FG.fused_gemv(x, w, rope_kv=(x[:, 0].long(), t, c, c, x[:, 0].long(), 4, 1), impl="triton")


def test_tuned_config_is_used_only_where_its_tiles_fit():
    from kernels import fused_tune as FT
    w = torch.empty(256, 64)
    FT.reset()
    try:
        assert FT.config_for(w) == FG.DEFAULT_CONFIG                # untuned
        FT._CHOICE[FT._key(w, False, 0, "rope")] = (32, 256, 4, 4, 1)
        assert FT.config_for(w, mode="rope") == (32, 256, 4, 4, 1)
        assert FT.config_for(w, off=16, mode="rope") == FG.DEFAULT_CONFIG     # RoPE halves of 16 < 32 rows
        assert FT.config_for(w, pdl=True, mode="rope") == FG.DEFAULT_CONFIG   # tuned per launch flags
        assert FT.config_for(w, mode="norm+rope") == FG.DEFAULT_CONFIG        # and per mode
    finally:
        FT.reset()

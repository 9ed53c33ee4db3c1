"""The v3 prefill attention kernel (kernels/prefill_attention_v3.py) against the reference: on
CPU in Triton's interpreter with small tiles (fp32), and, marked gpu, every V3_CONFIGS variant
compiled with its real tiles in bf16 on a Hopper GPU."""
import pytest
import torch

from kernels import prefill_attention as mod
from kernels import prefill_attention_v3 as v3
from tests.kernels.helpers import Target, assert_close
from tests.kernels.test_prefill_attention import CASES, _inputs, _is_unsupported

CPU_TILES = dict(VARIANT="v3", BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1)


def _args(q, k, v, cu, scale, kw):
    return (q, k, v, cu, scale, kw.get("k_cache"), kw.get("v_cache"), kw.get("block_tables"),
            kw.get("prefix_lens"))


def _run_v3(args, config, out=None):
    q, k, v, cu, scale, kc, vc, bt, pl = args
    return v3.prefill_attention_v3(q, k, v, cu, scale, k_cache=kc, v_cache=vc, block_tables=bt,
                                   prefix_lens=pl, config=config, out=out)


@pytest.mark.parametrize("lazy", [0.0, 8.0], ids=["eager-rescale", "lazy-rescale"])
@pytest.mark.parametrize("hq,hk,d,bs,lens,prefix", [c for c in CASES if c.id != "gqa2-d80-prefix"])
def test_v3_matches_reference(gen, lazy, hq, hk, d, bs, lens, prefix, monkeypatch):
    # CPU (interpreter) only: the GPU tiles run in test_v3_gpu_variants_match_reference
    target = Target("cpu", torch.float32)
    calls = []
    monkeypatch.setattr(v3, "launch_v3", lambda *a, _f=v3.launch_v3: calls.append(1) or _f(*a))
    q, k, v, cu, kw = _inputs(target, gen, hq, hk, d, bs, lens, prefix)
    args = _args(q, k, v, cu, d ** -0.5, kw)
    out = _run_v3(args, dict(CPU_TILES, LAZY_TAU=lazy))
    assert calls, "the v3 kernel did not run"
    assert_close(out, mod.prefill_attention_ref(*args), target)


@pytest.mark.parametrize("lazy", [0.0, 1.0, 8.0])
def test_v3_lazy_rescale_with_growing_scores(gen, lazy):
    # Scores whose row max jumps by far more than LAZY_TAU partway through the keys (and by
    # less than it elsewhere), so both the skipped and the taken rescale branch run; the
    # result must match the reference either way.
    target = Target("cpu", torch.float32)
    T, hq, hk, d = 100, 2, 1, 32
    q, k, v, cu, _ = _inputs(target, gen, hq, hk, d, 16, [T], None)
    ramp = torch.ones(T)
    ramp[40:] = 6.0   # keys 40.. give scores ~6x larger: the max moves by >> 8 (log2 units)
    ramp[70:] = 6.5   # then by less than 8
    k = k * ramp[:, None, None]
    q = q * 3.0
    args = (q, k, v, cu, d ** -0.5, None, None, None, None)
    out = _run_v3(args, dict(CPU_TILES, LAZY_TAU=lazy))
    assert_close(out, mod.prefill_attention_ref(*args), target)


def test_v3_falls_back_to_v1_for_odd_head_dims(gen, monkeypatch):
    calls = []
    monkeypatch.setattr(v3, "launch_v3", lambda *a: calls.append(1))
    target = Target("cpu", torch.float32)
    q, k, v, cu, _ = _inputs(target, gen, 2, 1, 80, 16, [19, 33], None)
    out = v3.prefill_attention_v3(q, k, v, cu, 0.1, config=CPU_TILES)
    assert not calls
    assert_close(out, mod.prefill_attention_ref(q, k, v, cu, 0.1), target)


def test_v3_empty_batch_and_out_argument(gen):
    target = Target("cpu", torch.float32)
    q, k, v, cu, _ = _inputs(target, gen, 2, 1, 32, 16, [0, 0], None)
    assert v3.prefill_attention_v3(q, k, v, cu, 0.1, config=CPU_TILES).shape == (0, 2, 32)
    q, k, v, cu, _ = _inputs(target, gen, 2, 1, 32, 16, [7, 30], None)
    out = torch.full_like(q, float("nan"))
    got = v3.prefill_attention_v3(q, k, v, cu, 0.1, config=CPU_TILES, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_close(out, mod.prefill_attention_ref(q, k, v, cu, 0.1), target)


def test_v3_configs_are_well_formed():
    for name, cfg in v3.V3_CONFIGS.items():
        assert name.startswith("v3-") and cfg["VARIANT"] == "v3", name
        assert cfg["BLOCK_M"] % cfg["BLOCK_N"] == 0, name  # the diagonal loop covers the tile
        assert ("lazy" in name) == (cfg["LAZY_TAU"] > 0), name
        assert ("-r" in name.split("-s")[-1]) == ("maxnreg" in cfg), name


@pytest.mark.gpu
@pytest.mark.parametrize("name,lens,prefix", [
    *[pytest.param(n, [1, 64, 65, 3, 2048], None, id=f"{n}-ragged") for n in v3.V3_CONFIGS],
    *[pytest.param(n, [700, 129, 1000], [300, 0, 1200], id=f"{n}-prefix")
      for n in ("v3-lazy-128x64-w8-s2-r128", "v3-128x32-w4-s3", "v3-64x64-w4-s3", "v3-128x128-w8-s3")]])
def test_v3_gpu_variants_match_reference(gen, name, lens, prefix):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a Hopper GPU")
    target = Target("cuda", torch.bfloat16)
    q, k, v, cu, kw = _inputs(target, gen, 32, 8, 128, 16, lens, prefix)
    args = _args(q, k, v, cu, 128 ** -0.5, kw)
    out = torch.full_like(q, float("nan"))  # every row must be written
    try:
        _run_v3(args, name, out=out)
    except Exception as e:  # noqa: BLE001 - an unsupported variant is reported, a wrong one fails
        if _is_unsupported(e):
            pytest.skip(f"{name} does not compile here: {type(e).__name__}: {str(e)[:200]}")
        raise
    assert_close(out, mod.prefill_attention_ref(*args), target)


def test_the_default_rules_name_real_configs_in_increasing_order():
    from kernels import prefill_attention_v2 as v2
    for d, rules in v2.DEFAULT_V2_BY_TOKENS.items():
        starts = [t for t, _ in rules]
        assert starts == sorted(starts), d
        for t, name in rules:
            if name:
                assert v2.default_variant(t, d) is v2.named_config(name)
                assert v2.named_config(name)["VARIANT"] in ("v2", "v3")
    assert v2.default_variant(1, 128) is None  # short prefills keep v1


def test_the_launcher_routes_a_v3_config_to_the_v3_kernel(gen, monkeypatch):
    # prefill_attention._launch runs launch_v3 for VARIANT="v3" (what DEFAULT_V2_BY_TOKENS picks)
    calls = []
    real = v3.launch_v3
    monkeypatch.setattr(v3, "launch_v3", lambda *a: (calls.append(1), real(*a)))
    target = Target("cpu", torch.float32)
    q, k, v, cu, kw = _inputs(target, gen, 4, 2, 32, 16, [40, 17], [16, 0])
    args = _args(q, k, v, cu, 32 ** -0.5, kw)
    out = mod._launch(*args, config=CPU_TILES)
    assert calls, "the v3 kernel did not run"
    assert_close(out, mod.prefill_attention_ref(*args), target)


@pytest.mark.gpu
@pytest.mark.parametrize("lens,prefix", [([2048], None), ([1500, 600], [0, 512]), ([4096], None),
                                         ([3000, 2000, 9], [1024, 0, 16])],
                         ids=["2k", "2k-prefix", "4k", "5k-prefix"])
def test_the_default_dispatch_on_gpu_matches_reference(gen, lens, prefix):
    # what the model's prefill runs at >= 2k tokens (the DEFAULT_V2_BY_TOKENS rules), in bf16
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a Hopper GPU")
    target = Target("cuda", torch.bfloat16)
    q, k, v, cu, kw = _inputs(target, gen, 32, 8, 128, 16, lens, prefix)
    args = _args(q, k, v, cu, 128 ** -0.5, kw)
    out = torch.full_like(q, float("nan"))
    mod.prefill_attention(*args, out=out)
    assert_close(out, mod.prefill_attention_ref(*args), target)

"""Fused residual add + RMSNorm against the HF-numerics reference."""
import pytest
import torch

from kernels import rmsnorm as mod
from tests.kernels.helpers import assert_close


@pytest.mark.fp16
@pytest.mark.parametrize("shape", [(1, 64), (7, 100), (3, 5, 256)])
def test_rmsnorm_matches_reference(target, gen, shape):
    x = target.randn(*shape, gen=gen, scale=3.0)
    w = target.randn(shape[-1], gen=gen)
    out = mod.rmsnorm(x, w, 1e-6, impl="triton")
    assert_close(out, mod.rmsnorm_ref(x, w, 1e-6), target)
    assert x.data_ptr() != out.data_ptr()


@pytest.mark.fp16
@pytest.mark.parametrize("shape", [(5, 128), (2, 3, 96)])
def test_fused_add_rmsnorm_matches_reference(target, gen, shape):
    x = target.randn(*shape, gen=gen)
    r = target.randn(*shape, gen=gen)
    w = target.randn(shape[-1], gen=gen)
    x0, r0 = x.clone(), r.clone()
    out, res = mod.fused_add_rmsnorm(x, r, w, 1e-5, impl="triton")
    want_out, want_res = mod.fused_add_rmsnorm_ref(x, r, w, 1e-5)
    assert_close(res, want_res, target, "residual")
    assert_close(out, want_out, target)
    assert torch.equal(x, x0) and torch.equal(r, r0), "inputs must not be modified"


def test_fp32_weight_promotes_like_reference(target, gen):
    # HF keeps an fp32 weight with bf16 activations in some checkpoints: the product is fp32.
    x = target.randn(4, 64, gen=gen)
    w = torch.randn(64, generator=gen).to(target.device)
    out = mod.rmsnorm(x, w, 1e-6, impl="triton")
    assert out.dtype == torch.float32
    assert_close(out, mod.rmsnorm_ref(x, w, 1e-6), target)


def test_non_contiguous_rows(target, gen):
    x = target.randn(6, 2, 64, gen=gen)[:, 1]
    w = target.randn(64, gen=gen)
    assert_close(mod.rmsnorm(x, w, 1e-6, impl="triton"), mod.rmsnorm_ref(x, w, 1e-6), target)


def test_launcher_errors():
    x, w = torch.randn(4, 64), torch.randn(64)
    with pytest.raises(ValueError, match="weight"):
        mod.rmsnorm(x, torch.randn(32), 1e-6, impl="triton")
    with pytest.raises(ValueError, match="residual"):
        mod.fused_add_rmsnorm(x, torch.randn(4, 32), w, 1e-6, impl="triton")
    with pytest.raises(ValueError, match="residual"):
        mod.fused_add_rmsnorm(x, x.half(), w, 1e-6, impl="triton")
    with pytest.raises(ValueError, match="x must be one of"):
        mod.rmsnorm(x.int(), w, 1e-6, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        mod.rmsnorm(x, w, 1e-6, impl="cuda")


def test_dispatch(target, gen, monkeypatch):
    calls = []
    monkeypatch.setattr(mod, "_launch", lambda *a: calls.append(a) or a[1])
    x, w = target.randn(2, 64, gen=gen), target.randn(64, gen=gen)
    mod.rmsnorm(x, w, 1e-6)
    assert len(calls) == (1 if target.device == "cuda" else 0), "impl=None: Triton on CUDA only"
    mod.rmsnorm(x, w, 1e-6, impl="torch")
    assert len(calls) == (1 if target.device == "cuda" else 0)
    mod.rmsnorm(x, w, 1e-6, impl="triton")
    assert len(calls) == (2 if target.device == "cuda" else 1)

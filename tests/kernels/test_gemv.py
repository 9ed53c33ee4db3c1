"""The GEMV-shaped skinny matmul against F.linear, and the table that routes decode matmuls."""
import pytest
import torch

from kernels import gemv as G
from tests.kernels.helpers import assert_close


@pytest.mark.parametrize("rows,n,k,bias", [(1, 48, 64, False), (3, 40, 96, True), (8, 64, 200, False)])
def test_gemv_matches_linear(target, gen, rows, n, k, bias):
    x = target.randn(rows, k, gen=gen)
    w = target.randn(n, k, gen=gen, scale=0.1)
    b = target.randn(n, gen=gen) if bias else None
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double()).to(x.dtype)
    for cfg in ((16, 32, 4, 2), (32, 64, 4, 2)):
        out = G.gemv(x, w, b, cfg, impl="triton")
        assert_close(out, ref, target, f"gemv {cfg}")


def test_gemv_checks_inputs(target, gen):
    x = target.randn(2, 32, gen=gen)
    with pytest.raises(ValueError, match="w must have shape"):
        G.gemv(x, target.randn(16, 48, gen=gen), impl="triton")
    with pytest.raises(ValueError, match="at most 16 rows"):
        G.gemv(target.randn(17, 32, gen=gen), target.randn(16, 32, gen=gen), impl="triton")


def test_skinny_linear_routes_by_table(target, gen):
    layer = torch.nn.Linear(64, 48, bias=True).to(device=target.device, dtype=target.dtype)
    x = target.randn(2, 64, gen=gen)
    G.reset()
    try:
        torch.testing.assert_close(G.skinny_linear(x, layer), layer(x))       # untuned: F.linear
        if target.device == "cuda":
            report = G.tune_skinny([layer, layer], rows=(2,))
            assert len(report) == 1 and report[0]["rows"] == 2 and report[0]["cublas_us"] > 0
            assert_close(G.skinny_linear(x, layer), layer(x), target)
    finally:
        G.reset()

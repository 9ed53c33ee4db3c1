"""Fused silu(gate) * up against the torch reference."""
import pytest
import torch

from kernels import silu_and_mul as mod
from tests.kernels.helpers import assert_close


@pytest.mark.fp16
@pytest.mark.parametrize("shape", [(1, 64), (7, 2 * 1100), (3, 5, 256)])
def test_silu_and_mul_matches_reference(target, gen, shape):
    x = target.randn(*shape, gen=gen, scale=3.0)
    assert_close(mod.silu_and_mul(x, impl="triton"), mod.silu_and_mul_ref(x), target)


def test_strided_rows(target, gen):
    x = target.randn(6, 2, 128, gen=gen)[:, 1]
    assert_close(mod.silu_and_mul(x, impl="triton"), mod.silu_and_mul_ref(x), target)


def test_launcher_errors():
    with pytest.raises(ValueError, match="even last dim"):
        mod.silu_and_mul(torch.randn(4, 63), impl="triton")
    with pytest.raises(ValueError, match="x must be one of"):
        mod.silu_and_mul(torch.ones(4, 64, dtype=torch.int32), impl="triton")

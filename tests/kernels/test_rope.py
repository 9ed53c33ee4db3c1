"""RoPE in place on q and k against the reference."""
import math

import pytest
import torch

from kernels import rope as mod
from tests.kernels.helpers import assert_close


def _table(max_pos: int, head_dim: int, device: str) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    f = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat([f.cos(), f.sin()], -1).to(device)


@pytest.mark.fp16
@pytest.mark.parametrize("n,hq,hk,d", [(5, 4, 4, 64), (9, 8, 2, 128), (3, 8, 1, 64), (4, 3, 1, 80)])
def test_rope_matches_reference(target, gen, n, hq, hk, d):
    q, k = target.randn(n, hq, d, gen=gen), target.randn(n, hk, d, gen=gen)
    pos = torch.randint(0, 200, (n,), generator=gen).to(target.device)
    table = _table(200, d, target.device)
    want_q, want_k = mod.apply_rope_ref(q.clone(), k.clone(), pos, table)
    q_ptr = q.data_ptr()
    out_q, out_k = mod.apply_rope(q, k, pos, table, impl="triton")
    assert out_q.data_ptr() == q_ptr, "q must be rotated in place"
    assert_close(q, want_q, target, "q")
    assert_close(k, want_k, target, "k")


def test_rope_on_views_of_a_fused_projection(target, gen):
    # q and k as strided views of one qkv tensor, int32 positions, a table in the activation dtype.
    n, hq, hk, d = 6, 4, 2, 64
    qkv = target.randn(n, (hq + 2 * hk) * d, gen=gen)
    q = qkv[:, :hq * d].view(n, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(n, hk, d)
    pos = torch.arange(n, dtype=torch.int32, device=target.device) * 7
    table = _table(64, d, target.device).to(target.dtype)
    want_q, want_k = mod.apply_rope_ref(q.clone(), k.clone(), pos, table)
    mod.apply_rope(q, k, pos, table, impl="triton")
    assert_close(q, want_q, target, "q")
    assert_close(k, want_k, target, "k")


def test_rope_position_zero_is_identity(target, gen):
    q, k = target.randn(3, 2, 64, gen=gen), target.randn(3, 1, 64, gen=gen)
    q0, k0 = q.clone(), k.clone()
    mod.apply_rope(q, k, torch.zeros(3, dtype=torch.long, device=target.device),
                   _table(8, 64, target.device), impl="triton")
    assert torch.equal(q, q0) and torch.equal(k, k0)
    assert math.isclose(float(_table(8, 64, "cpu")[0, 0]), 1.0)


def test_launcher_errors():
    q, k, pos, table = torch.randn(4, 2, 64), torch.randn(4, 1, 64), torch.arange(4), _table(8, 64, "cpu")
    with pytest.raises(ValueError, match="k must have shape"):
        mod.apply_rope(q, torch.randn(4, 1, 32), pos, table, impl="triton")
    with pytest.raises(ValueError, match="positions"):
        mod.apply_rope(q, k, pos.float(), table, impl="triton")
    with pytest.raises(ValueError, match="positions"):
        mod.apply_rope(q, k, torch.arange(3), table, impl="triton")
    with pytest.raises(ValueError, match="cos_sin"):
        mod.apply_rope(q, k, pos, _table(8, 32, "cpu"), impl="triton")
    with pytest.raises(ValueError, match="stride 1"):
        mod.apply_rope(torch.randn(4, 64, 2).transpose(1, 2), k, pos, table, impl="triton")
    with pytest.raises(ValueError, match="even"):
        mod.apply_rope(torch.randn(4, 2, 63), torch.randn(4, 1, 63), pos, torch.randn(8, 63), impl="triton")

"""Packing a rectangle layers x heads of a request's blocks, and unpacking it back."""
import pytest
import torch

from kernels import kv_pack as mod

CASES = [  # layers, heads, block_size, head_dim, layer range, head range
    (3, 4, 16, 64, (0, 3), (0, 4)),
    (4, 8, 32, 128, (1, 3), (2, 6)),
    (2, 2, 16, 80, (1, 2), (1, 2)),
]


@pytest.mark.fp16
@pytest.mark.parametrize("layers,hk,bs,d,lr,hr", CASES)
def test_pack_matches_reference(target, gen, layers, hk, bs, d, lr, hr):
    kv = target.randn(layers, 2, 10, bs, hk, d, gen=gen)
    ids = torch.tensor([7, 2, 5, 9])  # on the host, as the transfer metadata holds them
    want = mod.pack_kv_ref(kv, ids.to(target.device), lr, hr)
    out = mod.pack_kv(kv, ids, lr, hr, impl="triton")
    assert out.shape == mod.packed_shape(kv, 4, lr, hr) and out.is_contiguous()
    assert torch.equal(out, want)
    buf = torch.full((want.numel(),), float("nan"), dtype=target.dtype, device=target.device)
    assert mod.pack_kv(kv, ids, lr, hr, out=buf, impl="triton") is buf
    assert torch.equal(buf.view(want.shape), want), "every element of out must be written"


@pytest.mark.fp16
@pytest.mark.parametrize("layers,hk,bs,d,lr,hr", CASES)
def test_unpack_matches_reference(target, gen, layers, hk, bs, d, lr, hr):
    kv = target.randn(layers, 2, 10, bs, hk, d, gen=gen)
    ids = torch.tensor([4, 0, 8], device=target.device)
    buf = target.randn(*mod.packed_shape(kv, 3, lr, hr), gen=gen)
    want = kv.clone()
    mod.unpack_kv_ref(buf, want, ids, lr, hr)
    mod.unpack_kv(buf, kv, ids, lr, hr, impl="triton")
    assert torch.equal(kv, want), "the rectangle must land in place and nothing else may change"


def test_pack_unpack_round_trip(target, gen):
    src = target.randn(2, 2, 12, 16, 4, 64, gen=gen)
    dst = target.randn(2, 2, 12, 16, 4, 64, gen=gen)
    src_ids, dst_ids = torch.tensor([3, 11, 0]), torch.tensor([5, 6, 1])
    buf = mod.pack_kv(src, src_ids, (0, 2), (0, 4), impl="triton")
    mod.unpack_kv(buf, dst, dst_ids, (0, 2), (0, 4), impl="triton")
    assert torch.equal(dst[:, :, dst_ids], src[:, :, src_ids])


def test_empty_block_list(target, gen):
    kv = target.randn(1, 2, 4, 16, 2, 64, gen=gen)
    out = mod.pack_kv(kv, torch.tensor([], dtype=torch.long), (0, 1), (0, 2), impl="triton")
    assert out.shape == (1, 2, 0, 16, 2, 64)


def test_launcher_errors():
    kv, ids = torch.randn(2, 2, 4, 16, 2, 64), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="layers"):
        mod.pack_kv(kv, ids, (1, 3), (0, 2), impl="triton")
    with pytest.raises(ValueError, match="heads"):
        mod.pack_kv(kv, ids, (0, 1), (1, 1), impl="triton")
    with pytest.raises(ValueError, match="out must hold"):
        mod.pack_kv(kv, ids, (0, 1), (0, 2), out=torch.empty(10), impl="triton")
    with pytest.raises(ValueError, match="block_ids"):
        mod.pack_kv(kv, ids.float(), (0, 1), (0, 2), impl="triton")
    with pytest.raises(ValueError, match="kv_cache"):
        mod.pack_kv(kv[:, :1], ids, (0, 1), (0, 2), impl="triton")
    with pytest.raises(ValueError, match="buf must hold"):
        mod.unpack_kv(torch.empty(7), kv, ids, (0, 1), (0, 2), impl="triton")

"""Scattering new K/V rows into paged slots against the reference."""
import pytest
import torch

from kernels import kv_cache_write as mod


@pytest.mark.fp16
@pytest.mark.parametrize("n,hk,d,bs", [(9, 2, 64, 16), (20, 8, 128, 32), (5, 1, 80, 16)])
def test_write_matches_reference(target, gen, n, hk, d, bs):
    nb = 6
    k, v = target.randn(n, hk, d, gen=gen), target.randn(n, hk, d, gen=gen)
    kc, vc = target.randn(nb, bs, hk, d, gen=gen), target.randn(nb, bs, hk, d, gen=gen)
    slots = torch.randperm(nb * bs, generator=gen)[:n]
    slots[::4] = -1  # padding tokens
    slots = slots.to(target.device)
    want_k, want_v = kc.clone(), vc.clone()
    mod.write_kv_cache_ref(k, v, want_k, want_v, slots)
    mod.write_kv_cache(k, v, kc, vc, slots, impl="triton")
    # exact: a copy, and every slot outside slot_mapping must keep its old contents
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_write_strided_inputs_into_one_layer_of_a_worker_cache(target, gen):
    layers, nb, bs, hk, d, n = 2, 4, 16, 2, 64, 7
    kv = target.randn(layers, 2, nb, bs, hk, d, gen=gen)
    qkv = target.randn(n, 3 * hk * d, gen=gen)
    k, v = qkv[:, hk * d:2 * hk * d].view(n, hk, d), qkv[:, 2 * hk * d:].view(n, hk, d)
    slots = torch.tensor([3, 17, 18, 40, -1, 63, 0], device=target.device)
    want = kv.clone()
    mod.write_kv_cache_ref(k, v, want[1, 0], want[1, 1], slots)
    mod.write_kv_cache(k, v, kv[1, 0], kv[1, 1], slots, impl="triton")
    assert torch.equal(kv, want)


def test_launcher_errors():
    k, v = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    kc, vc = torch.randn(4, 16, 2, 64), torch.randn(4, 16, 2, 64)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="slot_mapping"):
        mod.write_kv_cache(k, v, kc, vc, slots.float(), impl="triton")
    with pytest.raises(ValueError, match="slot_mapping"):
        mod.write_kv_cache(k, v, kc, vc, slots[:2], impl="triton")
    with pytest.raises(ValueError, match="k_cache"):
        mod.write_kv_cache(k, v, torch.randn(4, 16, 4, 64), vc, slots, impl="triton")
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        mod.write_kv_cache(k, v, torch.randn(16, 4, 2, 64).transpose(0, 1), vc, slots, impl="triton")
    with pytest.raises(ValueError, match="v must have shape"):
        mod.write_kv_cache(k, torch.randn(3, 1, 64), kc, vc, slots, impl="triton")

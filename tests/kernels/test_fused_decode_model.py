"""The fused decode forward (model/fused_decode.py) against the unfused one on the same model,
KV cache and batch: same hidden states, same KV written, same greedy tokens. On CPU the fused
kernels run in the Triton interpreter; on CUDA in bf16, also with programmatic dependent launch."""
import pytest
import torch

from engine.model_config import ModelConfig
from kernels import fused_gemv as FG
from model.attention_metadata import AttentionMetadata
from model.fused_decode import FusedDecode, unsupported
from model.kv_cache import allocate_kv_cache
from model.llama import LlamaModel
from model.loader import init_dummy_weights
from model.rope import cos_sin_table
from tests.kernels.helpers import assert_close

BS = 4


def _model(target, bias=False, head_dim=32):
    cfg = ModelConfig(arch="qwen2" if bias else "llama", vocab_size=96, hidden_size=64, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=head_dim, max_position_embeddings=64,
                      attention_bias=bias, dtype="float32")
    with torch.device("meta"):
        model = LlamaModel(cfg).to(target.dtype)
    model = model.to_empty(device=target.device)
    init_dummy_weights(model, seed=3)
    model.cos_sin = cos_sin_table(cfg, 64, device=target.device)
    return model.eval()


def _step(target, gen, model, batch):
    cfg = model.cfg
    kv = allocate_kv_cache(cfg.num_layers, 16, BS, cfg.num_kv_heads, cfg.head_dim, target.dtype, target.device)
    kv.copy_(torch.randn(kv.shape, generator=gen))
    ctx = torch.randint(1, 3 * BS, (batch,), generator=gen)
    tables = torch.randperm(15, generator=gen)[:3 * batch].view(batch, 3) + 1
    pos = ctx - 1
    slots = tables[torch.arange(batch), pos // BS] * BS + pos % BS
    if batch > 1:
        slots[-1] = -1          # a padding row, as in a graph larger than the batch
    dev = target.device
    meta = AttentionMetadata(kind="decode", slot_mapping=slots.to(dev), block_tables=tables.int().to(dev),
                             context_lens=ctx.int().to(dev))
    ids = torch.randint(0, cfg.vocab_size, (batch,), generator=gen).to(dev)
    return ids, pos.int().to(dev), kv, meta


@pytest.mark.parametrize("bias,batch", [(False, 1), (True, 3)])
def test_fused_decode_matches_unfused(target, gen, bias, batch):
    model = _model(target, bias)
    assert unsupported(model) is None
    ids, pos, kv, meta = _step(target, gen, model, batch)
    kv_fused = kv.clone()
    with torch.inference_mode():
        model.fused_decode = None
        want = model(ids, pos, kv, meta)
        variants = [FusedDecode(impl="triton")]
        impl = "triton" if target.device == "cpu" else None
        variants += [FusedDecode(impl=impl, combine=True),
                     FusedDecode(impl=impl, plan=(("qkv", "apart"), ("gate_up", "apart"))),
                     FusedDecode(impl=impl, plan=(("qkv", "unfused"), ("gate_up", "unfused")))]
        if target.device == "cuda" and FG.pdl_available:
            variants += [FusedDecode(pdl=True), FusedDecode(pdl=True, prefetch=256, combine=True)]
        for fused in variants:
            model.fused_decode = fused
            kv_fused.copy_(kv)      # the fused pass must write the same KV rows the unfused one did
            got = model(ids, pos, kv_fused, meta)
            assert_close(got, want, target, f"hidden states, {fused}")
            assert_close(kv_fused, kv, target, f"KV cache, {fused}")
            if target.dtype == torch.float32:   # bf16 rounding may flip near-ties: hidden states suffice
                logits_want, logits_got = model.compute_logits(want), model.compute_logits(got)
                assert (logits_got.argmax(-1) == logits_want.argmax(-1)).all(), fused


def test_plan_from_env_and_self_check(target, gen):
    from model.fused_plan import parse_plan, self_check
    assert parse_plan("auto") is None
    assert parse_plan("fused") == (("qkv", "fused"), ("gate_up", "fused"))
    assert parse_plan("qkv=apart, gate_up=unfused") == (("qkv", "apart"), ("gate_up", "unfused"))
    with pytest.raises(ValueError, match="DISAGG_FUSED_PLAN"):
        parse_plan("qkv=sideways")
    model = _model(target)
    impl = "triton" if target.device == "cpu" else None
    assert self_check(model, FusedDecode(impl=impl)) is None
    assert self_check(model, FusedDecode(impl=impl, plan=(("qkv", "apart"), ("gate_up", "unfused")))) is None


def test_fused_decode_declines_what_it_cannot_run(target):
    model = _model(target, head_dim=16)     # RoPE halves of 8 columns: under the 16-row tile
    assert "qkv projection" in unsupported(model)


def test_plan_keeps_untimed_shapes_fused(target):
    # Test-sized weights are never tuned: the plan must not let a timed unfused path win alone.
    from kernels import fused_tune, gemv
    from model.fused_plan import choose_plan
    model = _model(target)
    w = model.layers[0].mlp.gate_up_proj.weight
    gemv.reset()
    fused_tune.reset()
    try:
        gemv._TIMES[gemv._key(w, w.shape[0], w.shape[1], 1)] = {"best_us": 0.001}
        assert choose_plan(model, FusedDecode()) == (("qkv", "fused"), ("gate_up", "fused"))
        fused_tune._TIMES[fused_tune._key(w, False, 0, "norm+silu")] = 50.0
        fused_tune._TIMES[fused_tune._key(w, False, 0, "silu")] = 40.0
        assert dict(choose_plan(model, FusedDecode()))["gate_up"] == "unfused"
        gemv.reset()
        assert dict(choose_plan(model, FusedDecode()))["gate_up"] == "apart"     # 40 + 2.2 < 50
    finally:
        gemv.reset()
        fused_tune.reset()

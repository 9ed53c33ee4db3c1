"""The model on CUDA (Triton kernels) gives the same greedy tokens as on CPU (torch references),
through the unfused decode kernels (head_dim 16 is too narrow for the fused path) and through
the fused decode path (model/fused_decode.py; head_dim 32), with and without PDL."""
import pytest
import torch

PROMPTS = [[(5 * i + j) % 290 + 3 for j in range(n)] for i, n in enumerate([3, 16, 17, 40, 64, 1])]


@pytest.mark.gpu
@pytest.mark.parametrize("arch,head_dim,pdl", [("llama", 16, "0"), ("qwen2", 16, "0"), ("llama", 32, "0"),
                                               ("qwen2", 32, "1")])
def test_gpu_greedy_tokens_match_cpu(tmp_path, monkeypatch, arch, head_dim, pdl):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from engine.sampling_params import SamplingParams
    from model.llm import LLM
    from tests.model.hf_checkpoints import make_checkpoint
    monkeypatch.setenv("DISAGG_PDL", pdl)
    make_checkpoint(arch, tmp_path, head_dim=head_dim)
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    tokens = {}
    for device in ("cpu", "cuda"):
        # fp32 on both: the Triton kernels then use exact fp32 products, so argmaxes agree
        llm = LLM(str(tmp_path), device=device, dtype="float32", block_size=16, num_kv_blocks=64, max_batch_size=8)
        if device == "cuda":    # the fused path serves decode exactly when its tiles fit the model
            assert (llm.model.fused_decode is not None) == (head_dim == 32), llm.model.fused_decode
            assert llm.model.fused_decode is None or llm.model.fused_decode.pdl == (pdl == "1")
        tokens[device] = [o.token_ids for o in llm.generate(PROMPTS, sp)]
    assert tokens["cuda"] == tokens["cpu"]

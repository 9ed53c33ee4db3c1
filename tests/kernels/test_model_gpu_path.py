"""The model on CUDA (Triton kernels) gives the same greedy tokens as on CPU (torch references)."""
import pytest
import torch

PROMPTS = [[(5 * i + j) % 290 + 3 for j in range(n)] for i, n in enumerate([3, 16, 17, 40, 64, 1])]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gpu_greedy_tokens_match_cpu(tmp_path, arch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from engine.sampling_params import SamplingParams
    from model.llm import LLM
    from tests.model.hf_checkpoints import make_checkpoint
    make_checkpoint(arch, tmp_path)
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    tokens = {}
    for device in ("cpu", "cuda"):
        # fp32 on both: the Triton kernels then use exact fp32 products, so argmaxes agree
        llm = LLM(str(tmp_path), device=device, dtype="float32", block_size=16, num_kv_blocks=64)
        tokens[device] = [o.token_ids for o in llm.generate(PROMPTS, sp)]
    assert tokens["cuda"] == tokens["cpu"]

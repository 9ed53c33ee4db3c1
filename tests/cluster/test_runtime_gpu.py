"""On one GPU: a prefill and a decode actor share it (num_gpus 0.5 each) and move KV over CUDA
IPC; greedy outputs match the in-process engine on the same GPU."""
import random

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ray_gpu():
    import ray
    if not ray.is_initialized():
        ray.init(address="local", num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layerwise", [True, False])
def test_cuda_ipc_equivalence(ray_gpu, layerwise):
    from cluster.api import Cluster
    from engine.plan import Plan
    from engine.sampling_params import SamplingParams
    from model.llm import LLM
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.choice([1, 5, 16, 17, 40, 64, 100]))] for _ in range(16)]
    params = [SamplingParams(max_tokens=rng.randint(1, 24), ignore_eos=True) for _ in prompts]
    ref = LLM("tiny-llama", device="cuda", dtype="float32", gpu_memory_utilization=0.2)
    want = [o.token_ids for o in ref.generate(prompts, params)]
    del ref
    torch.cuda.empty_cache()
    phase = {"device": "cuda", "num_gpus_per_rank": 0.5, "gpu_memory_utilization": 0.3}
    plan = Plan.from_dict({"model": "tiny-llama", "dtype": "float32", "prefill": phase, "decode": phase,
                           "layerwise_transfer": layerwise})
    with Cluster.start(plan) as c:
        got = [o.token_ids for o in c.generate(prompts, params, timeout=300)]
        stats = c.stats()
    assert stats["transports"] == {"prefill-0->decode-0": "cuda_ipc"}
    assert got == want
    for name, w in stats["workers"].items():
        assert w["free_blocks"] == w["num_blocks"], name
        assert w["kv_bytes"] > 0 and w["broken_channels"] == 0

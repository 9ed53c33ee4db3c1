"""Each kernel test takes a `target` (device, dtype): fp32/fp16 on CPU, where the Triton kernels
run in the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py), and bf16 on CUDA, marked
`gpu` so that only `pytest -m gpu` on the GPU host runs the compiled kernels."""
import zlib

import pytest
import torch

from tests.kernels.helpers import Target

CPU_FP32 = pytest.param(Target("cpu", torch.float32), id="cpu-fp32")
CPU_FP16 = pytest.param(Target("cpu", torch.float16), id="cpu-fp16")
CUDA_BF16 = pytest.param(Target("cuda", torch.bfloat16), id="cuda-bf16", marks=pytest.mark.gpu)


def pytest_generate_tests(metafunc):
    # Tests opt into fp16 on CPU with @pytest.mark.fp16 (kept to the cheap kernels for speed).
    if "target" in metafunc.fixturenames:
        params = [CPU_FP32, CUDA_BF16]
        if metafunc.definition.get_closest_marker("fp16"):
            params.insert(1, CPU_FP16)
        metafunc.parametrize("target", params)


def pytest_configure(config):
    config.addinivalue_line("markers", "fp16: also run on CPU with fp16 inputs")


@pytest.fixture(autouse=True)
def _needs_cuda(request):
    if "target" in request.fixturenames and request.getfixturevalue("target").device == "cuda" \
            and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture
def gen(request):
    """A seeded generator per test, so every test draws fresh but reproducible inputs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))

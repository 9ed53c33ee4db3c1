"""An LLM lets go of its model and KV cache when it is deleted or closed: nothing keeps them in
a reference cycle (on a GPU a second LLM in the same process would otherwise find the memory of
the first still allocated: tests/cluster/test_runtime_gpu.py builds one per parameter)."""
import gc
import weakref

import pytest

from engine.sampling_params import SamplingParams
from model.llm import LLM


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_del_frees_the_model_without_the_garbage_collector(async_scheduling):
    llm = LLM("embedded", async_scheduling=async_scheduling)
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4
    assert (llm.core.async_steps is not None) == async_scheduling
    model, core, cache = weakref.ref(llm.model), weakref.ref(llm.core), weakref.ref(llm.core.rt)
    gc.disable()
    try:
        del llm, out
        assert model() is None and core() is None and cache() is None
    finally:
        gc.enable()


def test_a_closed_llm_refuses_requests():
    with LLM("embedded") as llm:
        llm.generate("hi", SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate("hi", SamplingParams(max_tokens=2))

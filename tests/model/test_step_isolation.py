"""Step isolation in the in-process engine: a request that makes the model step raise (a
fault injected into the runner for requests starting with a marker) fails alone with a
one-line reason; every other request in its batches gets the tokens of a run without it, and
every KV block is free at the end. A device fault is raised, not isolated."""
import pytest
import torch

from engine.sampling_params import SamplingParams
from model.llm import LLM
from model.step_isolation import is_device_fault

MODEL = "tiny-llama"
MARKER = [251, 251, 251]


def _inject(llm, marker=MARKER, error=RuntimeError("injected fault")):
    """Make llm's model step raise while a request whose prompt starts with `marker` is in it."""
    execute, fired = llm.runner.execute, []

    def hooked(step, *a, **kw):
        reqs = {tuple(r.block_ids): r for r in llm.requests.values()}
        pre = any(s == 0 and list(toks[:3]) == marker for toks, s, _, _ in step.prefill)
        dec = any(reqs.get(tuple(t)) is not None and reqs[tuple(t)].prompt_token_ids[:3] == marker
                  for _, _, t in step.decode)
        if pre or dec:
            fired.append(1)
            raise error
        return execute(step, *a, **kw)
    llm.runner.execute = hooked
    return fired


def _prompts():
    return [[5 + i, 17, 3 + i, 40, 2 * i + 1] * (i + 1) for i in range(8)]


def test_poison_fails_alone_others_unchanged():
    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    want = [o.token_ids for o in LLM(MODEL).generate(_prompts(), sp)]
    llm = LLM(MODEL)
    fired = _inject(llm)
    prompts = _prompts()
    mixed = prompts[:3] + [MARKER + [9, 9]] + prompts[3:] + [MARKER + [7] * 20]
    outs = llm.generate(mixed, sp)
    assert fired, "the injected fault never fired"
    poisoned = [outs[3], outs[-1]]
    assert all(o.finish_reason == "error" and "injected fault" in o.error and "\n" not in o.error for o in poisoned)
    rest = outs[:3] + outs[4:-1]
    assert [o.token_ids for o in rest] == want and all(o.finish_reason == "length" for o in rest)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    assert llm.core.isolation.num_isolated == 2 and llm.core.isolation.num_reruns > 0


def test_a_device_fault_is_raised_not_isolated():
    llm = LLM(MODEL)
    _inject(llm, error=RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="CUDA error"):
        llm.generate([[1, 2, 3], MARKER + [4]], SamplingParams(max_tokens=3))
    assert is_device_fault(RuntimeError("NCCL error: unhandled system error"))
    assert not is_device_fault(ValueError("probability tensor contains inf"))
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None:
        assert is_device_fault(accel.__new__(accel))


def test_tiny_temperature_samples_greedily():
    prompts = _prompts()[:4]
    greedy = [o.token_ids for o in LLM(MODEL).generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))]
    tiny = LLM(MODEL).generate(prompts, SamplingParams(max_tokens=6, temperature=1e-40, ignore_eos=True))
    assert [o.token_ids for o in tiny] == greedy and all(o.finish_reason == "length" for o in tiny)

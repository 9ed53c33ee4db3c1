import pytest

from engine.request import FinishReason, InvalidTransition, Request, RequestState
from engine.sampling_params import SamplingParams


def test_state_machine_allows_the_documented_paths():
    r = Request("a", [1, 2, 3])
    for s in (RequestState.PREFILLING, RequestState.TRANSFERRING, RequestState.DECODING, RequestState.FINISHED):
        r.transition(s)
    assert r.state.terminal
    with pytest.raises(InvalidTransition):
        r.transition(RequestState.DECODING)


def test_recompute_keeps_generated_tokens():
    r = Request("a", [1, 2, 3], SamplingParams(max_tokens=5))
    r.transition(RequestState.PREFILLING)
    r.transition(RequestState.DECODING)
    r.append_token(9)
    r.block_ids = [4]
    r.reset_for_recompute()
    assert r.state is RequestState.QUEUED and r.all_token_ids == [1, 2, 3, 9] and r.num_preemptions == 1


def test_finish_conditions():
    r = Request("a", [1], SamplingParams(max_tokens=3, stop_token_ids=(7,)))
    assert not r.append_token(5, eos_token_id=2)
    assert r.append_token(7, eos_token_id=2) and r.finish_reason is FinishReason.STOP
    r = Request("b", [1], SamplingParams(max_tokens=2))
    assert not r.append_token(2, eos_token_id=3) and r.append_token(4, eos_token_id=3)
    assert r.finish_reason is FinishReason.LENGTH
    r = Request("c", [1], SamplingParams(max_tokens=9, ignore_eos=True))
    assert not r.append_token(3, eos_token_id=3)
    r = Request("d", [1, 2], SamplingParams(max_tokens=9))
    assert r.append_token(5, max_model_len=3) and r.finish_reason is FinishReason.LENGTH

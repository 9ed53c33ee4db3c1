"""The sampler against transformers' logits processors, numerically safe parameters, and
the input rules every front shares (model/input_processor.py)."""
import pytest
import torch

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from model.input_processor import InputProcessor
from model.sampler import Sampler, apply_penalties, filter_logits
from model.tokenizer import ByteTokenizer


def _logits(b=4, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * 3


@pytest.mark.parametrize("temp", [1e-40, 1e-30, 1e-38, 5e-6])
def test_tiny_temperatures_sample_greedily(temp):
    logits = _logits()
    sp = SamplingParams(temperature=temp, seed=3)
    assert sp.greedy
    assert Sampler()(logits, [sp] * 4, [0] * 4) == logits.argmax(-1).tolist()


def test_filters_match_transformers_warpers():
    tf = pytest.importorskip("transformers.generation.logits_process")
    logits = _logits(3, 64)
    cases = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.8),
             SamplingParams(temperature=0.9, min_p=0.1)]
    ours = filter_logits(logits, cases)
    hf = [tf.TopKLogitsWarper(5), tf.TopPLogitsWarper(0.8), tf.MinPLogitsWarper(0.1)]
    for i, (sp, w) in enumerate(zip(cases, hf)):
        ref = w(None, logits[i:i + 1] / sp.temperature)[0]
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref)), sp
        keep = ~torch.isinf(ref)
        torch.testing.assert_close(ours[i][keep], ref[keep])


def test_penalties_match_transformers_and_openai_formula():
    tf = pytest.importorskip("transformers.generation.logits_process")
    logits = _logits(1, 40)[0]
    prompt, out = [1, 2, 3], [3, 7, 7, 9]
    sp = SamplingParams(repetition_penalty=1.3)
    ref = tf.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + out]), logits[None].clone())[0]
    torch.testing.assert_close(apply_penalties(logits, sp, prompt, out), ref)
    sp = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, sp, prompt, out)
    want = logits.clone()
    for t, c in {3: 1, 7: 2, 9: 1}.items():
        want[t] -= 0.5 + 0.25 * c
    torch.testing.assert_close(got, want)


def test_penalties_change_greedy_choice_and_logprobs_are_reported():
    logits = torch.zeros(2, 10)
    logits[:, 4] = 5.0
    logits[:, 6] = 4.9
    s = Sampler()
    params = [SamplingParams(frequency_penalty=1.0, logprobs=2), SamplingParams(logprobs=0)]
    tokens, lps = s.sample(logits, params, [1, 0], [([0], [4]), ([0], [])])
    assert tokens == [6, 4]
    full = logits.log_softmax(-1)
    assert lps[0]["token_id"] == 6 and lps[0]["logprob"] == pytest.approx(float(full[0, 6]))
    assert [t for t, _ in lps[0]["top"]] == [4, 6] and lps[1]["top"] == []


def test_seeded_sampling_is_batch_independent():
    logits = _logits(3, 64)
    sp = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.02, seed=11)
    alone = Sampler()(logits[1:2], [sp], [5])
    mixed = Sampler()(logits, [SamplingParams(), sp, SamplingParams(temperature=0.5)], [0, 5, 2])
    assert mixed[1] == alone[0]


@pytest.mark.parametrize("kw,field", [
    ({"min_p": 1.5}, "min_p"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"n": 0}, "n"), ({"n": 17}, "n"),
])
def test_new_fields_are_validated(kw, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kw)
    assert e.value.field == field


def test_input_rules_name_the_field_and_both_numbers():
    ip = InputProcessor(ByteTokenizer(), 259, 100, max_tokens_limit=64, eos_token_ids=(257, 7))
    with pytest.raises(InvalidRequestError) as e:
        ip.build("hello", SamplingParams(max_tokens=2**31 - 1))
    assert e.value.field == "max_tokens" and "2147483647" in str(e.value) and "64" in str(e.value)
    ip = InputProcessor(ByteTokenizer(), 259, 100, eos_token_ids=(257, 7))
    with pytest.raises(InvalidRequestError) as e:
        ip.build("x" * 59, SamplingParams(max_tokens=50))     # 60 prompt tokens (BOS) + 50 > 100
    assert e.value.field == "max_tokens" and "60" in str(e.value) and "100" in str(e.value) and "50" in str(e.value)
    assert ip.build("x" * 59, SamplingParams(max_tokens=40)).sampling.eos_token_ids == (257, 7)
    with pytest.raises(InvalidRequestError) as e:
        ip.build("hi", SamplingParams(stop_token_ids=(5, 259)))
    assert e.value.field == "stop_token_ids" and "259" in str(e.value)


def test_every_accepted_parameter_samples_a_valid_token():
    """Any SamplingParams that validates gives a token in the vocabulary, never an exception
    (issue 13: one request must not be able to fail a batch)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    floats = st.floats(allow_nan=False, allow_infinity=False)
    params = st.builds(
        SamplingParams, temperature=st.one_of(st.just(0.0), st.floats(0, 1e30), st.floats(0, 1e-30)),
        top_k=st.integers(0, 100), top_p=st.floats(1e-300, 1.0).filter(lambda x: x > 0), min_p=st.floats(0, 1),
        presence_penalty=st.floats(-2, 2), frequency_penalty=st.floats(-2, 2),
        repetition_penalty=st.floats(1e-300, 10).filter(lambda x: x > 0), seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
        logprobs=st.one_of(st.none(), st.integers(0, 20)))

    @settings(max_examples=150, deadline=None)
    @given(sp=params, scale=floats.filter(lambda x: abs(x) < 1e4), hist=st.lists(st.integers(0, 63), max_size=20))
    def check(sp, scale, hist):
        logits = _logits(2, 64) * scale
        tokens, lps = Sampler().sample(logits, [sp, SamplingParams()], [len(hist), 0], [([1, 2], hist), ([1], [])])
        assert all(0 <= t < 64 for t in tokens)
        if sp.logprobs is not None:
            assert lps[0]["token_id"] == tokens[0] and len(lps[0]["top"]) == sp.logprobs
    check()

import pytest

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams


@pytest.mark.parametrize("kw,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"stop_token_ids": (-3,)}, "stop_token_ids"),
    ({"stop": ("",)}, "stop"), ({"max_tokens": True}, "max_tokens"),
])
def test_invalid_values_name_their_field(kw, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kw)
    assert e.value.field == field and field in str(e.value)


def test_valid_defaults_are_greedy():
    sp = SamplingParams(stop=["\n"], stop_token_ids=[5])
    assert sp.greedy and sp.stop == ("\n",) and sp.stop_token_ids == (5,)

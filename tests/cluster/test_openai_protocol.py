"""OpenAI request bodies -> SamplingParams (no server): defaults from generation_config.json,
explicit fields win, unsupported fields and bad types refused by name."""
import pytest

from cluster.openai_api.protocol import error_body, fit_max_tokens, parse_chat, parse_completion
from engine.errors import InvalidRequestError

MSGS = [{"role": "user", "content": "hi"}]
QWEN_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def test_generation_config_defaults_fill_unset_fields_only():
    p, _, gen = parse_chat({"messages": MSGS}, QWEN_DEFAULTS)
    sp = p.sampling
    assert (sp.temperature, sp.top_p, sp.top_k, sp.repetition_penalty) == (0.7, 0.8, 20, 1.05) and gen
    assert not p.max_tokens_set and fit_max_tokens(sp, 10, 128, 0).max_tokens == 118
    assert fit_max_tokens(sp, 10, 128, 50).max_tokens == 50
    p, _, _ = parse_chat({"messages": MSGS, "temperature": 0, "top_k": -1, "max_completion_tokens": 7,
                          "logprobs": True, "top_logprobs": 3, "n": 2, "seed": 4}, QWEN_DEFAULTS)
    sp = p.sampling
    assert (sp.temperature, sp.top_k, sp.max_tokens, sp.logprobs, sp.n, sp.seed) == (0, 0, 7, 3, 2, 4)
    # No generation_config: OpenAI's defaults (temperature 1, 16 tokens for completions).
    c = parse_completion({"prompt": ["a", "b"], "stop": "x", "stream": True,
                          "stream_options": {"include_usage": True}}, {})
    assert c.sampling.temperature == 1.0 and c.sampling.max_tokens == 16 and c.sampling.stop == ("x",)
    assert c.prompts == ["a", "b"] and c.stream and c.include_usage
    assert parse_completion({"prompt": [1, 2, 3]}, {}).prompts == [[1, 2, 3]]


@pytest.mark.parametrize("body,field", [
    ({"prompt": "x", "temperature": "hot"}, "temperature"), ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "n": True}, "n"), ({"prompt": 5}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": "x", "echo": True}, "echo"), ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "logit_bias": {"1": 2}}, "logit_bias"), ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "stop": [1]}, "stop"), ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "stop_token_ids": ["a"]}, "stop_token_ids"), ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_fields_are_named(body, field):
    with pytest.raises(InvalidRequestError) as e:
        parse_completion(body, {})
    assert e.value.field == field


@pytest.mark.parametrize("body,field", [
    ({"messages": []}, "messages"), ({"messages": MSGS, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MSGS, "tools": [{"type": "function"}]}, "tools"),
    ({"messages": MSGS, "add_generation_prompt": "yes"}, "add_generation_prompt"),
])
def test_bad_chat_fields_are_named(body, field):
    with pytest.raises(InvalidRequestError) as e:
        parse_chat(body, {})
    assert e.value.field == field


def test_error_body_is_openai_shaped():
    e = error_body(429, "full")["error"]
    assert e == {"message": "full", "type": "rate_limit_error", "param": None, "code": "overloaded"}
    assert error_body(400, "bad", "n")["error"]["param"] == "n"

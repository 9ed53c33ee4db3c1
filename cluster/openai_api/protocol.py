"""OpenAI request bodies -> (prompts, SamplingParams), validated with errors that name the
field; and the response objects (completion, chat completion, chunks, usage, logprobs) in the
shapes the official `openai` client parses."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams

_NUM = (int, float)
# Fields we do not implement: refused by name rather than silently ignored.
_UNSUPPORTED = {"suffix": None, "logit_bias": {}, "tools": [], "functions": [], "tool_choice": "none",
                "echo": False, "min_tokens": 0, "best_of": None}


def _get(body: dict, name: str, types, default=None, *, nullable=True):
    v = body.get(name, default)
    if v is None:
        if not nullable:
            raise InvalidRequestError(name, "must not be null")
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise InvalidRequestError(name, f"must be {_kind(types)}, got a boolean")
    if not isinstance(v, types):
        raise InvalidRequestError(name, f"must be {_kind(types)}, got {type(v).__name__}")
    return v


def _kind(types) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list", dict: "an object"}
    types = types if isinstance(types, tuple) else (types,)
    if set(types) == {int, float}:
        return "a number"
    return " or ".join(names.get(t, t.__name__) for t in types)


@dataclass
class ParsedRequest:
    prompts: list                   # text or token-id lists (completions); one rendered text (chat)
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    model: str
    max_tokens_set: bool            # False: each prompt gets the room left in the context


def _check_unsupported(body: dict) -> None:
    for name, neutral in _UNSUPPORTED.items():
        v = body.get(name)
        if v is None or v == neutral or (name == "best_of" and v == body.get("n", 1)):
            continue
        raise InvalidRequestError(name, "is not supported by this server")
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise InvalidRequestError("response_format", "only {\"type\": \"text\"} is supported")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError("stop", "must be a string or a list of strings")
    from cluster.front_guard import check_stop_strings
    check_stop_strings(stop)            # the gRPC front's limits
    return tuple(stop)


def _int_list(body: dict, name: str) -> tuple[int, ...]:
    v = _get(body, name, list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise InvalidRequestError(name, "must be a list of integers")
    return tuple(v)


def sampling_from_body(body: dict, defaults: dict, logprobs: int | None) -> tuple[SamplingParams, bool]:
    """Common fields of both endpoints; `defaults` (generation_config.json) fill unset ones."""
    _check_unsupported(body)
    max_tokens = _get(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int)
    d = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, **defaults}
    kw = {name: _get(body, name, _NUM, d[name]) for name in ("temperature", "top_p", "min_p", "repetition_penalty")}
    top_k = _get(body, "top_k", int, d["top_k"])
    sp = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else 16, top_k=0 if top_k == -1 else top_k,
        seed=_get(body, "seed", int), n=_get(body, "n", int, 1),
        presence_penalty=_get(body, "presence_penalty", _NUM, 0.0),
        frequency_penalty=_get(body, "frequency_penalty", _NUM, 0.0),
        logprobs=logprobs, stop=_stop(body), stop_token_ids=_int_list(body, "stop_token_ids"),
        ignore_eos=_get(body, "ignore_eos", bool, False), **kw)
    return sp, max_tokens is not None


def _stream_opts(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", bool, False)
    opts = _get(body, "stream_options", dict, {})
    include_usage = _get(opts, "include_usage", bool, False) if opts else False
    if opts and not stream:
        raise InvalidRequestError("stream_options", "is only allowed with stream: true")
    return stream, include_usage


def parse_completion(body: dict, defaults: dict) -> ParsedRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = list(prompt)
    else:
        raise InvalidRequestError("prompt", "must be a string, a list of strings, a list of token ids or a list of those")
    if len(prompts) > 64:
        raise InvalidRequestError("prompt", f"at most 64 prompts per request, got {len(prompts)}")
    lp = _get(body, "logprobs", int)
    if lp is not None and not 0 <= lp <= 5:
        raise InvalidRequestError("logprobs", f"must be in [0, 5] for completions, got {lp}")
    sp, _ = sampling_from_body(body, defaults, lp)
    stream, usage = _stream_opts(body)
    return ParsedRequest(prompts, sp, stream, usage, body.get("model"), True)   # OpenAI: 16 when unset


def parse_chat(body: dict, defaults: dict) -> tuple[ParsedRequest, list, bool]:
    """Returns (parsed, messages, add_generation_prompt); the caller renders the template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of messages")
    top = _get(body, "top_logprobs", int)
    lp = None
    if _get(body, "logprobs", bool, False):
        lp = top or 0
    elif top is not None:
        raise InvalidRequestError("top_logprobs", "needs logprobs: true")
    sp, set_ = sampling_from_body(body, defaults, lp)
    stream, usage = _stream_opts(body)
    gen = _get(body, "add_generation_prompt", bool, True)
    return ParsedRequest([], sp, stream, usage, body.get("model"), set_), messages, gen


def fit_max_tokens(sp: SamplingParams, num_prompt_tokens: int, max_model_len: int, limit: int) -> SamplingParams:
    """Unset max_tokens: the room left in the context (and under --max-tokens-limit), as vLLM."""
    room = max(1, max_model_len - num_prompt_tokens)
    if limit:
        room = min(room, limit)
    return dataclasses.replace(sp, max_tokens=room)


# Responses -------------------------------------------------------------------------------------
def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u


def envelope(rid: str, obj: str, model: str, choices: list, usage: dict | None = None, created=None) -> dict:
    d = {"id": rid, "object": obj, "created": created or int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        d["usage"] = usage
    return d


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special=False)


def chat_logprobs(tokenizer, entries) -> dict:
    def one(tid, lp):
        s = token_text(tokenizer, tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return {"content": [{**one(e["token_id"], e["logprob"]),
                         "top_logprobs": [one(t, x) for t, x in e["top"]]} for e in entries]}


def completion_logprobs(tokenizer, entries, text_offset: int = 0) -> dict:
    tokens, offsets, pos = [], [], text_offset
    for e in entries:
        s = token_text(tokenizer, e["token_id"])
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{token_text(tokenizer, t): x for t, x in e["top"]} for e in entries],
            "text_offset": offsets}


class HTTPError(Exception):
    """An answer other than 200, with OpenAI's error JSON (error_body)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}
    codes = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large", 429: "overloaded",
             503: "not_serving"}
    return {"error": {"message": message, "type": kinds.get(status, "server_error"), "param": param,
                      "code": codes.get(status, None if status == 400 else "internal_error")}}

"""Turns a user's prompt (text or token ids) and sampling parameters into a validated Request."""
from __future__ import annotations

import itertools

from engine.errors import InvalidRequestError
from engine.request import Request
from engine.sampling_params import SamplingParams

_ids = itertools.count()


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int,
                 max_prompt_tokens: int = 0, max_tokens_limit: int = 0, max_kv_tokens: int = 0):
        """max_prompt_tokens / max_tokens_limit: operator limits (0 = only the model's context).
        max_kv_tokens: the most tokens one request's KV may take on the smallest cache."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_prompt_tokens = max_prompt_tokens
        self.max_tokens_limit = max_tokens_limit
        self.max_kv_tokens = max_kv_tokens

    def tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "is empty")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if not ids:
                raise InvalidRequestError("prompt_token_ids", "is empty")
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                    raise InvalidRequestError(
                        "prompt_token_ids", f"token id {t!r} is not an integer in [0, {self.vocab_size})")
            return ids
        raise InvalidRequestError("prompt", f"must be text or a list of token ids, got {type(prompt).__name__}")

    def build(self, prompt, sampling: SamplingParams | None = None, request_id: str | None = None,
              arrival_s: float = 0.0) -> Request:
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequestError("sampling", "must be a SamplingParams")
        ids = self.tokenize(prompt)
        n = len(ids)
        if n >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"has {n} tokens; the model's context is {self.max_model_len} tokens "
                "and at least one must be left to generate")
        if self.max_prompt_tokens and n > self.max_prompt_tokens:
            raise InvalidRequestError("prompt", f"has {n} tokens; the server's limit is {self.max_prompt_tokens}")
        if self.max_tokens_limit and sampling.max_tokens > self.max_tokens_limit:
            raise InvalidRequestError("max_tokens", f"is {sampling.max_tokens}; the server's limit is {self.max_tokens_limit}")
        if self.max_kv_tokens and n + 1 > self.max_kv_tokens:
            raise InvalidRequestError("prompt", f"has {n} tokens; the KV cache holds at most {self.max_kv_tokens} per request")
        if request_id is None:
            request_id = f"req-{next(_ids)}"
        elif not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id", "must be a non-empty string")
        return Request(request_id, ids, sampling, arrival_s=arrival_s)

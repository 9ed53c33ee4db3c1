"""Turns a user's prompt (text or token ids) and sampling parameters into a validated Request."""
from __future__ import annotations

import dataclasses
import itertools

from engine.errors import InvalidRequestError
from engine.request import Request
from engine.sampling_params import SamplingParams

_ids = itertools.count()


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int,
                 max_prompt_tokens: int = 0, max_tokens_limit: int = 0, max_kv_tokens: int = 0,
                 eos_token_ids=()):
        """max_prompt_tokens / max_tokens_limit: operator limits (0 = only the model's context).
        max_kv_tokens: the most tokens one request's KV may take on the smallest cache.
        eos_token_ids: every end-of-sequence id of the model (config.json and
        generation_config.json); each request stops on any of them unless it sets ignore_eos.
        The one validation path of every front (in-process, gRPC, HTTP)."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_prompt_tokens = max_prompt_tokens
        self.max_tokens_limit = max_tokens_limit
        self.max_kv_tokens = max_kv_tokens
        self.eos_token_ids = tuple(eos_token_ids)

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
        self.check_sampling(sampling, n)
        if self.max_kv_tokens and n + 1 > self.max_kv_tokens:
            raise InvalidRequestError("prompt", f"has {n} tokens; the KV cache holds at most {self.max_kv_tokens} per request")
        if request_id is None:
            request_id = f"req-{next(_ids)}"
        elif not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id", "must be a non-empty string")
        if self.eos_token_ids and sampling.eos_token_ids != self.eos_token_ids:
            sampling = dataclasses.replace(sampling, eos_token_ids=self.eos_token_ids)
        return Request(request_id, ids, sampling, arrival_s=arrival_s)

    def check_sampling(self, sampling: SamplingParams, num_prompt_tokens: int) -> None:
        """Rules that need the model and the server's limits (vLLM's): the prompt plus max_tokens
        must fit the context, max_tokens the operator's limit, stop token ids the vocabulary."""
        if sampling.n != 1:
            raise InvalidRequestError("n", f"is {sampling.n}: one request is one completion here; the HTTP and "
                                      "gRPC fronts fan n out into n requests (cluster/fanout.py)")
        m = sampling.max_tokens
        if self.max_tokens_limit and m > self.max_tokens_limit:
            raise InvalidRequestError(
                "max_tokens", f"is {m}, over the server's limit of {self.max_tokens_limit} (--max-tokens-limit)")
        if num_prompt_tokens + m > self.max_model_len:
            raise InvalidRequestError(
                "max_tokens", f"is {m} and the prompt has {num_prompt_tokens} tokens: {num_prompt_tokens + m} "
                f"is over the model's context of {self.max_model_len} tokens; ask for at most "
                f"{self.max_model_len - num_prompt_tokens}")
        for t in sampling.stop_token_ids:
            if t >= self.vocab_size:
                raise InvalidRequestError("stop_token_ids", f"token id {t} is not in the vocabulary [0, {self.vocab_size})")

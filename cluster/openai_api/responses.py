"""Response bodies of the OpenAI front: the non-streaming collector and the server-sent-event
streams of /v1/completions and /v1/chat/completions.

A stream sends one chunk per token delivery, also when its text is still held back (half a
UTF-8 character, a possible stop string): clients then time tokens as gRPC clients do, and
text arrives as soon as it is complete."""
from __future__ import annotations

import json
import time
from contextlib import aclosing

from cluster.fanout import stream_n
from cluster.openai_api import protocol as proto

DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Collector:
    """Text, tokens, logprobs, finish reasons and usage of every choice. Choice i belongs to
    prompt i // n; prompt tokens count once per prompt (as OpenAI counts them)."""

    def __init__(self, tokenizer, num_choices: int, n: int, kind: str):
        self.tok, self.n, self.kind = tokenizer, n, kind
        self.text = [""] * num_choices
        self.logprobs: list[list] = [[] for _ in range(num_choices)]
        self.finish: list[str | None] = [None] * num_choices
        self.prompt_tokens: dict[int, int] = {}
        self.cached_tokens: dict[int, int] = {}
        self.completion_tokens = 0
        self.error: str | None = None

    def add(self, i: int, item) -> None:
        self.text[i] += item.text
        if item.logprobs:
            self.logprobs[i] += item.logprobs
        if item.finish_reason is None:
            return
        if item.error:
            self.error = self.error or item.error
        self.finish[i] = item.finish_reason
        u = item.usage or {}
        self.prompt_tokens[i // self.n] = u.get("prompt_tokens", 0)
        self.cached_tokens[i // self.n] = u.get("cached_tokens", 0)
        self.completion_tokens += u.get("completion_tokens", 0)

    def usage(self) -> dict:
        return proto.usage_dict(sum(self.prompt_tokens.values()), self.completion_tokens,
                                sum(self.cached_tokens.values()))

    def logprobs_of(self, i: int, entries, offset: int = 0):
        if not entries:
            return None
        if self.kind == "chat.completion":
            return proto.chat_logprobs(self.tok, entries)
        return proto.completion_logprobs(self.tok, entries, offset)

    def response(self, rid: str, model: str) -> dict:
        if self.error:          # failed while generating: the server's fault, not the client's
            raise proto.HTTPError(500, f"request {rid} failed: {self.error}")
        choices = []
        for i, text in enumerate(self.text):
            lp = self.logprobs_of(i, self.logprobs[i]) if self.logprobs[i] else None
            if self.kind == "chat.completion":
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": lp, "finish_reason": self.finish[i]})
            else:
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": self.finish[i]})
        return proto.envelope(rid, self.kind, model, choices, self.usage())


def _error_event(message: str) -> str:
    return sse(proto.error_body(500, message))


async def _deliveries(cluster, tracked, col: Collector, rid):
    """(index, item) for every delivery worth a chunk, each recorded in `col`; a failed request
    yields (None, its error event) and ends the stream."""
    async with aclosing(stream_n(cluster, tracked)) as items:
        async for i, item in items:
            col.add(i, item)
            if item.finish_reason is not None and item.error:
                yield None, _error_event(f"request {rid} failed: {item.error}")
                return
            if item.finish_reason is None and not item.token_ids and not item.text:
                continue
            yield i, item


async def sse_completion(cluster, tracked, col: Collector, rid, model, include_usage):
    created = int(time.time())
    offsets = [0] * len(tracked)
    async with aclosing(_deliveries(cluster, tracked, col, rid)) as deliveries:
        async for i, item in deliveries:
            if i is None:
                yield item
                return
            choice = {"index": i, "text": item.text, "logprobs": col.logprobs_of(i, item.logprobs, offsets[i]),
                      "finish_reason": item.finish_reason}
            offsets[i] += len(item.text)
            yield sse(proto.envelope(rid, "text_completion", model, [choice], created=created))
    if include_usage:
        yield sse(proto.envelope(rid, "text_completion", model, [], col.usage(), created=created))
    yield DONE


async def sse_chat(cluster, tracked, col: Collector, rid, model, include_usage):
    created = int(time.time())
    for i in range(len(tracked)):          # the role comes first, as OpenAI sends it
        delta = {"role": "assistant", "content": ""}
        yield sse(proto.envelope(rid, "chat.completion.chunk", model,
                                 [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}], created=created))
    async with aclosing(_deliveries(cluster, tracked, col, rid)) as deliveries:
        async for i, item in deliveries:
            if i is None:
                yield item
                return
            delta = {"content": item.text} if item.text or item.finish_reason is None else {}
            choice = {"index": i, "delta": delta, "logprobs": col.logprobs_of(i, item.logprobs),
                      "finish_reason": item.finish_reason}
            yield sse(proto.envelope(rid, "chat.completion.chunk", model, [choice], created=created))
    if include_usage:
        yield sse(proto.envelope(rid, "chat.completion.chunk", model, [], col.usage(), created=created))
    yield DONE

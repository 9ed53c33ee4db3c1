"""Streaming to clients: every accepted request's output queue, its text (detokenized at the
edge, stop strings found here) and its last item with usage and timings."""
from __future__ import annotations

import time
from collections.abc import Callable

from cluster.tracking import StreamDelta, Tracked
from model.output_processor import OutputProcessor


class Streams:
    def __init__(self, tokenizer, metrics=None, max_model_len: Callable[[], int] = lambda: 1 << 62):
        self.outputs = OutputProcessor(tokenizer)
        self.metrics = metrics
        self.max_model_len = max_model_len    # the smallest instance's context (a retry must fit anywhere)

    def open(self, t: Tracked) -> None:
        t.times["arrival"] = time.monotonic()
        self.outputs.add(t.request_id, t.req.prompt_token_ids, t.req.sampling.stop)
        if self.metrics:
            self.metrics.on_submit(t)

    def refused(self, t: Tracked) -> None:
        self.outputs.discard(t.request_id)
        if self.metrics:
            self.metrics.on_rejected(t)

    async def items(self, t: Tracked):
        """The request's StreamDelta items until the last one. Items that queued up while the
        consumer was busy (a client or front slower than the steps) leave as one: one message
        per request per wake-up, never one per token."""
        while True:
            item = await t.out.get()
            while item.finish_reason is None and not t.out.empty():
                nxt = t.out.get_nowait()
                if nxt.finish_reason is not None:       # the last item stays whole (usage, error)
                    yield item
                    item = nxt
                    break
                item = _merge(item, nxt)
            yield item
            if item.finish_reason is not None:
                return

    def deliver(self, t: Tracked, tokens: list[int], finish_reason: str | None, logprobs=None) -> bool:
        """New tokens for the caller. Returns True when the stream ended here although the
        workers did not end the request (context full, a stop string): free its attempt."""
        if t.closed:
            return False
        now = time.monotonic()
        t.req.output_token_ids.extend(tokens)
        early = False
        if finish_reason is None and t.req.num_tokens >= self.max_model_len():
            finish_reason, early = "length", True
        first = "first_token" not in t.times
        t.times.setdefault("first_token", now)
        t.times["last_token"] = now
        if self.metrics:
            self.metrics.on_tokens(t, len(tokens), first, now)
        delta = self.outputs.process(t.request_id, tokens, finish_reason)
        if delta.finish_reason is not None and finish_reason is None:     # a stop string matched
            early = True
        t.out.put_nowait(StreamDelta(t.request_id, tokens, delta.text, logprobs=logprobs))
        if delta.finish_reason is not None:
            self.close(t, delta.finish_reason)
        return early

    def close(self, t: Tracked, reason: str, error: str | None = None) -> None:
        """End the caller's stream (the workers may free their part a little later)."""
        if t.closed:
            return
        t.finish_reason = reason
        t.times["finish"] = time.monotonic()
        self.outputs.discard(t.request_id)
        usage = {"prompt_tokens": t.req.num_prompt_tokens, "completion_tokens": t.req.num_output_tokens,
                 "cached_tokens": t.num_cached_tokens}
        if self.metrics:
            self.metrics.on_finish(t, reason)
        t.out.put_nowait(StreamDelta(t.request_id, [], "", reason, usage, t.timings(), error))


def _merge(a: StreamDelta, b: StreamDelta) -> StreamDelta:
    """Two consecutive non-final items of one request as one."""
    lps = (a.logprobs or []) + (b.logprobs or []) if (a.logprobs or b.logprobs) else None
    return StreamDelta(a.request_id, a.token_ids + b.token_ids, a.text + b.text, logprobs=lps)

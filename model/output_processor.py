"""Text for generated tokens, and stop strings, at the edge (in-process engine or frontend).

Workers stop on token-level conditions (EOS, stop token ids, max_tokens, context length). Stop
strings need text, so they are found here; the caller then cancels the request on the workers
(as vLLM's frontend does)."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import FinishReason
from model.tokenizer import IncrementalDetokenizer, find_stop


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    times: dict = field(default_factory=dict)
    logprobs: list = field(default_factory=list)   # per token, when the request asked for them
    error: str | None = None        # why a request failed (finish_reason "error")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Delta:
    """What one step added to a request's output."""
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None


class _TextState:
    def __init__(self, tokenizer, prompt_ids, stops):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = stops
        self.emitted = 0            # characters of detok.text already handed out
        self.done = False


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._state: dict[str, _TextState] = {}

    def add(self, request_id: str, prompt_ids: list[int], stops=()) -> None:
        self._state[request_id] = _TextState(self.tokenizer, prompt_ids, tuple(stops))

    def discard(self, request_id: str) -> None:
        self._state.pop(request_id, None)

    def process(self, request_id: str, new_ids: list[int], finish_reason: str | None) -> Delta:
        """Text for new tokens. If a stop string appears, the text is cut before it and the
        returned delta has finish_reason "stop" (the caller must then stop the request)."""
        st = self._state.get(request_id)
        if st is None or st.done:
            return Delta(request_id, list(new_ids), "", finish_reason)
        before = len(st.detok.text)
        st.detok.add(new_ids)
        if finish_reason is not None:
            st.detok.flush()
        text = st.detok.text
        if st.stops:
            hit = find_stop(text, st.stops, before)
            if hit >= 0:
                text = text[:hit]
                finish_reason = FinishReason.STOP.value
            elif finish_reason is None:
                # Hold back a tail that could be the start of a stop string.
                hold = max(len(s) - 1 for s in st.stops)
                text = text[:max(st.emitted, len(text) - hold)]
        delta = text[st.emitted:]
        st.emitted = len(text)
        if finish_reason is not None:
            st.done = True
            self._state.pop(request_id, None)
        return Delta(request_id, list(new_ids), delta, finish_reason)

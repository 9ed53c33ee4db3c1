"""What the controller keeps per request, and what it streams back to callers."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from engine.request import Request, RequestState


def split_wid(wid: str) -> tuple[str, int]:
    """'request_id#attempt' -> (request_id, attempt)."""
    rid, _, attempt = wid.rpartition("#")
    return rid, int(attempt)


@dataclass
class StreamDelta:
    """One item of a request's stream: new tokens and their text; the last item carries the
    finish reason, usage counts and the TTFT breakdown."""
    request_id: str
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    timings: dict | None = None
    error: str | None = None
    logprobs: list | None = None    # one entry per token, when the request asked for them


@dataclass
class Tracked:
    req: Request
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    attempt: int = 0
    prefill: object = None          # Instance
    decode: object = None           # Instance
    blocks: list[int] | None = None
    route: str | None = None        # the route counted as carrying this attempt (Admission.inflight)
    finish_reason: str | None = None   # set once the client's stream has ended
    cancel_requested: bool = False
    token_seen: dict = field(default_factory=dict)     # attempt -> asyncio.Event
    num_cached_tokens: int = 0
    times: dict = field(default_factory=dict)          # controller clock (monotonic)
    durations: dict = field(default_factory=dict)      # measured spans, seconds

    @property
    def state(self) -> RequestState:
        """Where the current attempt is: the request's own state machine (engine/request.py).
        QUEUED: waiting for capacity; PREFILLING: given to a prefill instance, or to a colocated
        one that has not sent its first token; TRANSFERRING: its KV is moving; DECODING; then
        FINISHED, CANCELLED or FAILED once the controller is done with it."""
        return self.req.state

    def move(self, state: RequestState) -> None:
        if self.req.state is not state:
            self.req.transition(state)

    @property
    def colocated(self) -> bool:
        """The current attempt runs on one colocated instance (held in `decode`)."""
        return self.prefill is None and self.decode is not None

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def wid(self) -> str:
        """The id of the current attempt on the workers."""
        return f"{self.req.request_id}#{self.attempt}"

    @property
    def closed(self) -> bool:
        return self.finish_reason is not None

    def timings(self) -> dict:
        t, d = self.times, self.durations
        out = dict(d)
        if "first_token" in t:
            out["ttft_s"] = t["first_token"] - t["arrival"]
        if "finish" in t:
            out["e2e_s"] = t["finish"] - t["arrival"]
        n = len(self.req.output_token_ids)
        if n > 1 and "first_token" in t and "last_token" in t:
            out["tpot_s"] = (t["last_token"] - t["first_token"]) / (n - 1)
        return out

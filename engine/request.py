"""A request and its state machine.

    QUEUED ──► PREFILLING ──► TRANSFERRING ──► DECODING ──► FINISHED
      ▲            │   (colocated: PREFILLING ──► DECODING)    │
      └────────────┴──── preempted / worker died: recompute ◄──┘
    any live state ──► CANCELLED | FAILED

A request that goes back to QUEUED keeps its generated tokens: the next prefill recomputes
the KV of prompt + tokens so far, and generation continues where it stopped.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.errors import DisaggError
from engine.sampling_params import SamplingParams


class RequestState(enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DECODING = "decoding"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.CANCELLED, RequestState.FAILED)


_S = RequestState
_END = {_S.FINISHED, _S.CANCELLED, _S.FAILED}
TRANSITIONS: dict[RequestState, set[RequestState]] = {
    _S.QUEUED: {_S.PREFILLING} | _END,
    _S.PREFILLING: {_S.TRANSFERRING, _S.DECODING, _S.QUEUED} | _END,
    _S.TRANSFERRING: {_S.DECODING, _S.QUEUED} | _END,
    _S.DECODING: {_S.QUEUED} | _END,
    _S.FINISHED: set(),
    _S.CANCELLED: set(),
    _S.FAILED: set(),
}


class InvalidTransition(DisaggError):
    pass


class FinishReason(str, enum.Enum):
    STOP = "stop"          # EOS, a stop token id or a stop string
    LENGTH = "length"      # max_tokens reached, or the model's context is full
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass
class Request:
    """One generation request. Token ids only: text lives at the edges (tokenizer, frontend)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_s: float = 0.0
    state: RequestState = RequestState.QUEUED
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0      # tokens whose KV came from the prefix cache
    num_computed_tokens: int = 0    # tokens whose KV is in this worker's cache
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # Named timestamps (seconds, on whichever clock drives the policies): arrival, prefill_start,
    # prefill_end, transfer_end, decode_start, first_token, finish.
    times: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.times.setdefault("arrival", self.arrival_s)

    # Token bookkeeping -------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def append_token(self, token_id: int, eos_token_id: int | None = None,
                     max_model_len: int | None = None) -> bool:
        """Record a sampled token; returns True when it ends generation (sets finish_reason)."""
        self.output_token_ids.append(token_id)
        sp = self.sampling
        if not sp.ignore_eos and ((eos_token_id is not None and token_id == eos_token_id)
                                  or token_id in sp.eos_token_ids):
            self.finish_reason = FinishReason.STOP
        elif token_id in sp.stop_token_ids:
            self.finish_reason = FinishReason.STOP
        elif self.num_output_tokens >= sp.max_tokens:
            self.finish_reason = FinishReason.LENGTH
        elif max_model_len is not None and self.num_tokens >= max_model_len:
            self.finish_reason = FinishReason.LENGTH
        return self.finish_reason is not None

    # State machine -----------------------------------------------------------------------
    def transition(self, new_state: RequestState) -> None:
        if new_state not in TRANSITIONS[self.state]:
            raise InvalidTransition(
                f"request {self.request_id}: {self.state.value} -> {new_state.value} is not allowed")
        self.state = new_state

    def reset_for_recompute(self) -> None:
        """Back to QUEUED keeping generated tokens; the caller has freed the blocks."""
        self.transition(RequestState.QUEUED)
        self.block_ids = []
        self.num_cached_tokens = 0
        self.num_computed_tokens = 0
        self.num_preemptions += 1

    def mark(self, name: str, now_s: float) -> None:
        """Record a timestamp once (the first time wins)."""
        self.times.setdefault(name, now_s)

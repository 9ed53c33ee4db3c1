"""Sampling parameters of one request, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

MAX_SEED = 2**63 - 1


def _check_number(name: str, value, kind=(int, float)) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidRequestError(name, f"must be a number, got {type(value).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidRequestError(name, f"must be finite, got {value}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` means greedy (argmax).

    top_k: 0 disables it. top_p: 1.0 disables it. seed: per-request seed that makes
    random sampling reproducible, independent of batching and of where a token is sampled.
    stop_token_ids / stop: generation ends when one is produced; stop strings are cut off the text.
    ignore_eos: keep generating after the model's end-of-sequence token (benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        _check_number("max_tokens", self.max_tokens, int)
        if self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature}")
        _check_number("top_k", self.top_k, int)
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            _check_number("seed", self.seed, int)
            if not 0 <= self.seed <= MAX_SEED:
                raise InvalidRequestError("seed", f"must be in [0, 2^63-1], got {self.seed}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for t in self.stop_token_ids:
            _check_number("stop_token_ids", t, int)
            if t < 0:
                raise InvalidRequestError("stop_token_ids", f"token ids must be >= 0, got {t}")
        object.__setattr__(self, "stop", tuple(self.stop))
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop", "stop strings must be non-empty strings")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", "must be a boolean")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

"""Sampling parameters of one request, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

MAX_SEED = 2**63 - 1
MAX_N = 16                  # completions per request (each is a full request on the cluster)
MAX_TOP_LOGPROBS = 20       # as OpenAI's API
# Below this temperature, logits / T overflows (or the softmax collapses to one token anyway):
# such requests sample greedily instead of producing inf/nan probabilities.
MIN_TEMPERATURE = 1e-5


def _check_number(name: str, value, kind=(int, float)) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidRequestError(name, f"must be a number, got {type(value).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidRequestError(name, f"must be finite, got {value}")


def _check_range(name: str, value, lo, hi, kind=(int, float)) -> None:
    _check_number(name, value, kind)
    if not lo <= value <= hi:
        raise InvalidRequestError(name, f"must be in [{lo}, {hi}], got {value}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` (or below MIN_TEMPERATURE) means greedy (argmax).

    top_k: 0 disables it. top_p: 1.0 disables it. min_p: drop tokens whose probability is below
    min_p times the top token's (0 disables it). seed: per-request seed that makes random sampling
    reproducible, independent of batching and of where a token is sampled.
    presence_penalty / frequency_penalty (OpenAI, in [-2, 2]) subtract from the logits of tokens
    already generated (once / per occurrence); repetition_penalty (CTRL/HF, > 0, 1 disables it)
    divides positive and multiplies negative logits of tokens in the prompt or the output.
    logprobs: None, or how many top alternatives to return beside each sampled token's log
    probability (0 = only the sampled token's).
    stop_token_ids / stop: generation ends when one is produced; stop strings are cut off the text.
    eos_token_ids: the model's end-of-sequence ids (set by the front from the model's configs);
    ignore_eos: keep generating after them (benchmarks). n: completions to generate.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    n: int = 1
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

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
        _check_range("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _check_number("seed", self.seed, int)
            if not 0 <= self.seed <= MAX_SEED:
                raise InvalidRequestError("seed", f"must be in [0, 2^63-1], got {self.seed}")
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_number("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidRequestError("repetition_penalty", f"must be in (0, 10], got {self.repetition_penalty}")
        if self.logprobs is not None:
            _check_range("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS, int)
        _check_range("n", self.n, 1, MAX_N, int)
        for name in ("stop_token_ids", "eos_token_ids"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            for t in getattr(self, name):
                _check_number(name, t, int)
                if t < 0:
                    raise InvalidRequestError(name, f"token ids must be >= 0, got {t}")
        object.__setattr__(self, "stop", tuple(self.stop))
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop", "stop strings must be non-empty strings")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", "must be a boolean")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def needs_probs(self) -> bool:
        """The sampler must go beyond a plain argmax for this request."""
        return not self.greedy or self.penalized or self.logprobs is not None

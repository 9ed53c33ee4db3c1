"""Workloads: request lengths from the traces in placement/traces/, arrivals at a chosen rate.

    wl = make_workload("azure-conv", rate=8.0)                      # trace replay, scaled
    wl = make_workload("sharegpt", rate=4.0, num_requests=2000, arrival="gamma", cv=2.0, seed=1)
    for arrival_s, prompt_len, output_len in wl.requests(): ...

Names: azure-conv, azure-code, mooncake-conv, mooncake-synthetic (timed traces), sharegpt,
arxiv (lengths only), or a path to a CSV (Azure or length-distribution columns) or a Mooncake
JSONL file. Every random choice takes `seed`, so a workload is the same on every run. A
workload's rate is its realised mean rate, (n - 1) / span: `at_rate` rescales the arrival
times, so one arrival pattern serves every rate of a goodput search.
"""
from __future__ import annotations

import csv
import datetime as _dt
import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engine.errors import ConfigError

# Package data (pyproject: package-data), so a wheel install plans from the same files as the repo.
TRACES_DIR = Path(__file__).resolve().parent / "traces"
NAMED = {
    "azure-conv": "azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
    "azure-code": "azure_llm_2023/AzureLLMInferenceTrace_code.csv",
    "mooncake-conv": "mooncake_fast25/conversation_trace.jsonl",
    "mooncake-synthetic": "mooncake_fast25/synthetic_trace.jsonl",
    "sharegpt": "length_distributions/sharegpt_8k_filtered_stats_llama2_tokenizer.csv",
    "arxiv": "length_distributions/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
}
ARRIVALS = ("auto", "trace", "poisson", "gamma")
MOONCAKE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class Trace:
    """Rows of a trace file as read: timestamps (s from the first row) or None for length-only
    files, and hash_ids (one id per 512-token prompt block) for Mooncake files."""

    name: str
    timestamps_s: np.ndarray | None
    prompt_lens: np.ndarray
    output_lens: np.ndarray
    hash_ids: tuple | None = None


@dataclass(frozen=True)
class Workload:
    """Requests to simulate or replay: arrival time, prompt and output length per request."""

    name: str
    arrival_s: np.ndarray
    prompt_lens: np.ndarray
    output_lens: np.ndarray
    hash_ids: tuple | None = None

    @property
    def num_requests(self) -> int:
        return len(self.arrival_s)

    @property
    def rate(self) -> float:
        """Realised mean rate (req/s); inf for a single request."""
        span = float(self.arrival_s[-1] - self.arrival_s[0]) if self.num_requests else 0.0
        return (self.num_requests - 1) / span if span > 0 else float("inf")

    def at_rate(self, rate: float) -> "Workload":
        """The same requests and arrival pattern, time-scaled to mean rate `rate`."""
        if rate <= 0:
            raise ConfigError(f"rate must be > 0, got {rate}")
        if self.num_requests < 2 or self.rate == float("inf"):
            return self
        start = self.arrival_s[0]
        return replace(self, arrival_s=(self.arrival_s - start) * (self.rate / rate))

    def head(self, num_requests: int) -> "Workload":
        """The first `num_requests` requests."""
        n = max(1, num_requests)
        return replace(self, arrival_s=self.arrival_s[:n], prompt_lens=self.prompt_lens[:n],
                       output_lens=self.output_lens[:n],
                       hash_ids=self.hash_ids[:n] if self.hash_ids is not None else None)

    def requests(self):
        """(arrival_s, prompt_len, output_len) per request, in arrival order."""
        return zip(self.arrival_s.tolist(), self.prompt_lens.tolist(), self.output_lens.tolist())


def resolve(name_or_path: str) -> Path:
    if name_or_path in NAMED:
        path = TRACES_DIR / NAMED[name_or_path]
        if not path.is_file():
            raise ConfigError(f"workload {name_or_path!r}: its trace {path} is missing from this install; "
                              "reinstall disagg-serve from a wheel or a full checkout (the traces are package data)")
        return path
    p = Path(name_or_path)
    if not p.is_file():
        raise ConfigError(f"workload {name_or_path!r} is neither a known name ({', '.join(NAMED)}) "
                          "nor a trace file that exists")
    return p


@functools.lru_cache(maxsize=16)
def load_trace(name_or_path: str) -> Trace:
    """Read a trace file (cached: a goodput search reads it once)."""
    p = resolve(name_or_path)
    try:
        if p.suffix == ".jsonl":
            return _read_mooncake(p, name_or_path)
        return _read_csv(p, name_or_path)
    except (KeyError, ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"workload file {p} could not be read: {e}") from None


def _read_csv(p: Path, name: str) -> Trace:
    with p.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ConfigError(f"workload file {p} has no rows")
    if "ContextTokens" in rows[0]:     # Azure 2023: 7-digit fractions, so fromisoformat
        ts = np.array([_dt.datetime.fromisoformat(r["TIMESTAMP"]).timestamp() for r in rows])
        return Trace(name, ts - ts[0], _ints(rows, "ContextTokens"), _ints(rows, "GeneratedTokens"))
    if "num_prefill_tokens" in rows[0]:
        return Trace(name, None, _ints(rows, "num_prefill_tokens"), _ints(rows, "num_decode_tokens"))
    raise ConfigError(f"workload file {p}: unknown columns {list(rows[0])}; expected Azure "
                      "(TIMESTAMP, ContextTokens, GeneratedTokens) or num_prefill_tokens/num_decode_tokens")


def _ints(rows, key) -> np.ndarray:
    return np.array([int(r[key]) for r in rows], dtype=np.int64)


def _read_mooncake(p: Path, name: str) -> Trace:
    ts, prompt, output, hashes = [], [], [], []
    with p.open() as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                ts.append(d["timestamp"] / 1000.0)
                prompt.append(d["input_length"])
                output.append(d["output_length"])
                hashes.append(tuple(d.get("hash_ids", ())))
    if not ts:
        raise ConfigError(f"workload file {p} has no rows")
    t = np.array(ts)
    return Trace(name, t - t[0], np.array(prompt, dtype=np.int64), np.array(output, dtype=np.int64),
                 tuple(hashes))


def unit_gaps(num: int, arrival: str, cv: float, seed: int) -> np.ndarray:
    """Inter-arrival gaps with mean 1: exponential (Poisson) or gamma with the given CV."""
    rng = np.random.default_rng(seed)
    if arrival == "poisson":
        return rng.exponential(1.0, num)
    if cv <= 0:
        raise ConfigError(f"cv must be > 0, got {cv}")
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / shape, num)


def make_workload(name_or_path: str, rate: float | None = None, num_requests: int | None = None,
                  arrival: str = "auto", cv: float = 1.0, seed: int = 0,
                  max_model_len: int | None = None, sample: str = "head") -> Workload:
    """Build a workload. arrival="auto" replays a timed trace's own timestamps and draws Poisson
    arrivals for length-only files; "trace" replays (needs timestamps); "poisson" and "gamma"
    draw arrivals from `seed`. Timed traces keep their first `num_requests` rows (bursts stay
    intact) or, with sample="spread", `num_requests` rows evenly spaced over the whole trace
    (its rate profile, compressed in time: what a goodput search on a sample wants);
    length-only files draw `num_requests` rows with `seed` (default: all rows, shuffled).
    `rate` rescales to that mean rate (default: the trace's own, or 1 req/s). Lengths are
    clipped so prompt + output fits `max_model_len`."""
    if arrival not in ARRIVALS:
        raise ConfigError(f"arrival must be one of {ARRIVALS}, got {arrival!r}")
    if num_requests is not None and num_requests < 1:
        raise ConfigError(f"num_requests must be >= 1, got {num_requests}")
    tr = load_trace(name_or_path)
    timed = tr.timestamps_s is not None
    if arrival == "trace" and not timed:
        raise ConfigError(f"workload {name_or_path!r} has no timestamps to replay; use poisson or gamma")
    n_rows = len(tr.prompt_lens)
    if sample not in ("head", "spread"):
        raise ConfigError(f"sample must be head or spread, got {sample!r}")
    if timed and sample == "spread" and num_requests and num_requests < n_rows:
        idx = np.unique(np.linspace(0, n_rows - 1, num_requests).round().astype(np.int64))
    elif timed:
        idx = np.arange(min(num_requests or n_rows, n_rows))
    else:
        rng = np.random.default_rng(seed)
        n = num_requests or n_rows
        idx = rng.permutation(n_rows)[:n] if n <= n_rows else rng.integers(0, n_rows, n)
    prompt, output = tr.prompt_lens[idx].copy(), tr.output_lens[idx].copy()
    if max_model_len:
        prompt = np.minimum(prompt, max_model_len - 1)
        output = np.maximum(1, np.minimum(output, max_model_len - prompt))
    if arrival in ("trace", "auto") and timed:
        arrival_s = tr.timestamps_s[idx] - tr.timestamps_s[idx[0]]
    else:
        kind = "poisson" if arrival == "auto" else arrival
        gaps = unit_gaps(len(idx), kind, cv, seed)
        arrival_s = np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    hash_ids = tuple(tr.hash_ids[i] for i in idx) if tr.hash_ids is not None else None
    wl = Workload(str(name_or_path), arrival_s.astype(np.float64), prompt, output, hash_ids)
    if rate is not None:
        return wl.at_rate(rate)
    return wl if timed else wl.at_rate(1.0)


def prompt_token_ids(index: int, prompt_len: int, vocab_size: int, hash_ids=None,
                     block_tokens: int = MOONCAKE_BLOCK_TOKENS, salt: int = 0) -> list[int]:
    """Deterministic token ids for a synthetic prompt. With `hash_ids`, each 512-token block's
    ids derive from its hash id, so requests that share leading hash ids share a prefix (and
    hit the prefix cache); without, ids derive from the request index (no sharing). `salt`
    (e.g. a benchmark run's seed) gives other ids for the same index and hash ids: runs with
    different salts never share a prefix, so one run cannot warm the server's prefix cache for
    the next."""
    if not hash_ids:
        rng = np.random.default_rng([index + 1, salt] if salt else index + 1)
        return rng.integers(0, vocab_size, prompt_len).tolist()
    out: list[int] = []
    for h in hash_ids:
        rng = np.random.default_rng([int(h) + (1 << 40), salt] if salt else int(h) + (1 << 40))
        out.extend(rng.integers(0, vocab_size, block_tokens).tolist())
        if len(out) >= prompt_len:
            break
    out.extend([0] * (prompt_len - len(out)))
    return out[:prompt_len]

"""Run one batch's model step so that a request that makes it fail fails alone.

    run(batch) ──ok──► sample ──ok──► tokens
        │                 └─raises─► sample row by row: rows that raise fail
        └─raises─► device fault? ──yes──► raise (the instance restarts)
                        └─no──► bisect: re-run each half without the other;
                                a half that raises is split again; one request that
                                raises on its own fails, every other request keeps going

Re-running is idempotent: a step writes each request's KV at that request's own slots (the
positions of the tokens it computes), so running a request again in a smaller batch writes the
same values into the same slots, and a request left out of a re-run keeps what the first try
wrote, which is overwritten when it is computed again. Nothing else is written (block tables
are allocated by the scheduler before the step; prefix-cache hashes only after it, and never for
a failed request). A failed request's blocks hold junk: the caller frees them without caching.

A device fault (a CUDA error, or an out-of-memory error that a retry after emptying the cache
does not clear) is not a request's fault: it is raised, and the instance is restarted.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.batching import Batch
from engine.request import Request

log = logging.getLogger("disagg.step_isolation")


@dataclass
class StepOutcome:
    """`batch`: what ran, failed requests removed; `tokens` and `logprobs` (an entry or None):
    one per `batch.sampled`; `failed`: requests that made the step fail, with a one-line reason."""
    batch: Batch
    tokens: list[int]
    logprobs: list
    failed: list[tuple[Request, str]] = field(default_factory=list)
    num_reruns: int = 0
    # Async scheduling: the tokens still on the device, one per `batch.sampled` (then `tokens`
    # and `logprobs` are empty until the caller copies them).
    device_tokens: torch.Tensor | None = None


def is_device_fault(e: BaseException) -> bool:
    """True for errors of the device rather than of a request's data."""
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(e, accel):
        return True
    text = str(e)
    return any(s in text for s in ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "NCCL error",
                                   "device-side assert", "illegal memory access"))


def reason(e: BaseException) -> str:
    """One line saying why a request failed."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"the model step failed on this request: {type(e).__name__}: {first}"[:400]


def _members(batch: Batch) -> list:
    return list(batch.prefill) + list(batch.decode)


def _sub_batch(members: list) -> Batch:
    return Batch(prefill=[m for m in members if not isinstance(m, Request)],
                 decode=[m for m in members if isinstance(m, Request)])


def _request(member) -> Request:
    return member if isinstance(member, Request) else member.request


class StepIsolation:
    """Wraps an instance's "execute a batch" call. `sample(logits, requests)` returns their
    tokens and logprobs entries (RankRuntime.sample); `rerun(batch)` runs a sub-batch again
    (None where a re-run is not possible, e.g. ranks of a tensor-parallel group that would have
    to follow it: a model failure is then raised)."""

    def __init__(self, sample: Callable, rerun: Callable | None = None):
        self.sample, self.rerun = sample, rerun
        self.num_isolated = 0           # requests failed alone so far
        self.num_reruns = 0

    def run(self, batch: Batch, execute: Callable[[], object], sample_device: Callable | None = None) -> StepOutcome:
        """`execute()` runs the whole batch the first time and returns its logits (one row per
        `batch.sampled`). With `sample_device(logits, requests)` (async scheduling) the tokens of
        a step that ran whole stay on the device; if it raises, rows are sampled on the host."""
        try:
            logits = self._execute_clearing_oom(batch, execute)
        except Exception as e:  # noqa: BLE001 - sorted below: a request's fault or the device's
            if is_device_fault(e) or self.rerun is None:
                raise
            log.warning("a step of %d requests failed (%s: %s); bisecting the batch",
                        len(_members(batch)), type(e).__name__, e)
            tokens, failed, n = self._bisect(_members(batch), e)
        else:
            if sample_device is not None and batch.sampled:
                try:
                    return StepOutcome(batch, [], [], device_tokens=sample_device(logits, batch.sampled))
                except Exception as e:  # noqa: BLE001 - narrowed down row by row below
                    if is_device_fault(e):
                        raise
            tokens, failed = self._sample_rows(logits, batch.sampled)
            n = 0
        self.num_reruns += n
        self.num_isolated += len(failed)
        bad = {id(r) for r, _ in failed}
        ok = Batch(prefill=[c for c in batch.prefill if id(c.request) not in bad],
                   decode=[r for r in batch.decode if id(r) not in bad], preempted=batch.preempted)
        rows = [tokens[id(r)] for r in ok.sampled]
        return StepOutcome(ok, [t for t, _ in rows], [lp for _, lp in rows], failed, n)

    def _execute_clearing_oom(self, batch: Batch, execute):
        try:
            return execute()
        except torch.OutOfMemoryError:
            if not torch.cuda.is_available() or self.rerun is None:
                raise
            torch.cuda.empty_cache()
            try:
                return self.rerun(batch)
            except torch.OutOfMemoryError as e:
                raise RuntimeError(f"CUDA error: out of memory that emptying the cache does not clear: {e}") from e

    def _sample_rows(self, logits, requests: list[Request]) -> tuple[dict, list]:
        """(token, logprobs) by id(request); a sampling failure is narrowed down to the rows
        that cause it."""
        if not requests:
            return {}, []
        try:
            return dict(zip(map(id, requests), zip(*self.sample(logits, requests)))), []
        except Exception as e:  # noqa: BLE001
            if is_device_fault(e):
                raise
        tokens, failed = {}, []
        for i, r in enumerate(requests):
            try:
                toks, lps = self.sample(logits[i:i + 1], [r])
                tokens[id(r)] = (toks[0], lps[0])
            except Exception as e:  # noqa: BLE001
                if is_device_fault(e):
                    raise
                failed.append((r, reason(e)))
        return tokens, failed

    def _bisect(self, members: list, error: Exception, ran_alone: bool = False) -> tuple[dict, list, int]:
        """Re-run each half of `members`; a half that raises is split again. A request fails
        only once it has raised when run alone (a lone request is re-run once first)."""
        if ran_alone:
            return {}, [(_request(members[0]), reason(error))], 0
        tokens, failed, runs = {}, [], 0
        half = len(members) // 2
        for part in (members[:half], members[half:]) if half else (members,):
            sub = _sub_batch(part)
            runs += 1
            try:
                logits = self.rerun(sub)
            except Exception as e:  # noqa: BLE001
                if is_device_fault(e):
                    raise
                t, f, n = self._bisect(part, e, ran_alone=len(part) == 1)
                runs += n
            else:
                t, f = self._sample_rows(logits, sub.sampled)
            tokens.update(t)
            failed += f
        return tokens, failed, runs

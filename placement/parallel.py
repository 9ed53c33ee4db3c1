"""Independent simulations on every core: `run_all(thunks)` calls each zero-argument function
in a forked worker process and returns their results in order.

Forking (not spawning) lets the workers inherit the thunks (deployments, workloads, latency
models) without pickling them; only results travel back. `DISAGG_SIM_WORKERS` sets the number
of processes (default: the machine's cores; 1 runs everything here, in order).
"""
from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence

_TASKS: Sequence[Callable] = ()


def num_workers() -> int:
    env = os.environ.get("DISAGG_SIM_WORKERS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"DISAGG_SIM_WORKERS must be an integer, got {env!r}") from None
    return os.cpu_count() or 1


def _call(i: int):
    return _TASKS[i]()


def run_all(thunks: Sequence[Callable], workers: int | None = None) -> Iterator:
    """Results of `thunks`, in order, as they become available."""
    global _TASKS
    workers = min(workers or num_workers(), len(thunks))
    if workers <= 1 or "fork" not in mp.get_all_start_methods() or mp.current_process().daemon:
        for t in thunks:
            yield t()
        return
    _TASKS = thunks
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            yield from pool.imap(_call, range(len(thunks)), chunksize=1)
    finally:
        _TASKS = ()

"""Traces back to back, so a replay's mix shifts: `disagg bench --replay` and the re-planning
report use it.

    wl = back_to_back("azure-code,azure-conv,mooncake-conv:1800", max_model_len=8192)

Each item is a workload name or path (placement/workload.py) with an optional `:SECONDS`: only
its first SECONDS of arrivals (a window of a long trace). Each trace starts `gap_s` after the
previous one's last arrival, at its own timestamps; `segments` says where each begins.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import ConfigError
from placement.workload import Workload, make_workload


@dataclass(frozen=True)
class Segment:
    name: str
    start_s: float
    end_s: float
    num_requests: int


def parse_items(spec: str) -> list[tuple[str, float | None]]:
    """"a,b:600" -> [("a", None), ("b", 600.0)]."""
    items = []
    for raw in spec.split(","):
        raw = raw.strip()
        if not raw:
            continue
        name, _, secs = raw.rpartition(":") if ":" in raw else (raw, "", "")
        if secs:
            try:
                window = float(secs)
            except ValueError:
                raise ConfigError(f"trace item {raw!r}: expected NAME or NAME:SECONDS") from None
            if not window > 0:
                raise ConfigError(f"trace item {raw!r}: SECONDS must be > 0")
            items.append((name, window))
        else:
            items.append((raw, None))
    if not items:
        raise ConfigError(f"no trace named in {spec!r}; expected e.g. azure-code,azure-conv")
    return items


def back_to_back(spec: str, max_model_len: int | None = None, gap_s: float = 1.0) -> tuple[Workload, list[Segment]]:
    """One workload of the traces of `spec` one after another, and where each begins."""
    parts, segments, t = [], [], 0.0
    for name, window in parse_items(spec):
        wl = make_workload(name, arrival="trace", max_model_len=max_model_len)
        if window is not None:
            wl = wl.head(max(1, int((wl.arrival_s < window).sum())))
        arr = wl.arrival_s - wl.arrival_s[0] + t
        segments.append(Segment(name if window is None else f"{name}:{window:g}", float(arr[0]), float(arr[-1]),
                                wl.num_requests))
        parts.append((arr, wl))
        t = float(arr[-1]) + gap_s
    hashes = None
    if all(wl.hash_ids is not None for _, wl in parts):
        hashes = tuple(h for _, wl in parts for h in wl.hash_ids)
    wl = Workload(spec, np.concatenate([a for a, _ in parts]),
                  np.concatenate([w.prompt_lens for _, w in parts]),
                  np.concatenate([w.output_lens for _, w in parts]), hashes)
    return wl, segments


def compress(wl: Workload, segments: list[Segment], factor: float) -> tuple[Workload, list[Segment]]:
    """Arrival times divided by `factor` (10 = ten times the trace's rate)."""
    if not factor > 0:
        raise ConfigError(f"compression factor must be > 0, got {factor}")
    from dataclasses import replace
    return (replace(wl, arrival_s=wl.arrival_s / factor),
            [Segment(s.name, s.start_s / factor, s.end_s / factor, s.num_requests) for s in segments])

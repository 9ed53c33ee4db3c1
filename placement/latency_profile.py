"""Profiled latency model: fitted to timings of our own engine on one device.

A profile is one JSON file per device and model under `placement/profiles/`
(`<device>_<model>.json`; the format is described in `placement/profiles/README.md`):

    {"format": "disagg-profile/1", "device": "H100", "model": "llama-3-8b", "created": "...",
     "tp": {"1": {"samples": [...],
                  "prefill": {"a": s, "b": s/token, "c": s/token^2},
                  "decode": {"a": s, "b": s/context token, "c": s/request},
                  "max_rel_error": {"prefill": 0.04, "decode": 0.02}}},
     "kv_transfer": {"intra_node": {"bandwidth": bytes/s, "latency_s": s}}}   # optional

A sample is {"phase": "prefill", "prompt_lens": [...], "time_s": t} (optionally with
"cached_lens") or {"phase": "decode", "batch_size": B, "sum_context": S, "time_s": t}.
The fit is least squares on relative error (rows scaled by 1/time, so a 2 ms step counts as
much as a 2 s prefill), with coefficients kept >= 0.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.errors import ConfigError
from placement.latency import LatencyModel, Link
from placement.serving import ServingTerms

FORMAT = "disagg-profile/1"
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


def _prefill_features(prompt_lens, cached_lens=None) -> list[float]:
    # c multiplies attention pairs x2: l^2 for a fresh prompt, n^2 + 2 n p with p cached tokens.
    cached = cached_lens or [0] * len(prompt_lens)
    new = [length - c for length, c in zip(prompt_lens, cached)]
    return [1.0, float(sum(new)), float(sum(n * n + 2 * n * c for n, c in zip(new, cached)))]


def _decode_features(batch_size, sum_context) -> list[float]:
    return [1.0, float(sum_context), float(batch_size)]


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: drop the most negative feature and refit
    (an active set that is exact for three features)."""
    active = list(range(x.shape[1]))
    while active:
        coef, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (coef >= 0).all():
            out = np.zeros(x.shape[1])
            out[active] = coef
            return out
        active.pop(int(np.argmin(coef)))
    return np.zeros(x.shape[1])


def _fit_phase(rows: list[list[float]], times: list[float], phase: str) -> tuple[dict, float]:
    if len(rows) < 3:
        raise ConfigError(f"fit_profile: need at least 3 {phase} samples, got {len(rows)}")
    x, y = np.array(rows), np.array(times)
    if (y <= 0).any():
        raise ConfigError(f"fit_profile: every {phase} time_s must be > 0")
    coef = _nonneg_lstsq(x / y[:, None], np.ones_like(y))
    rel = np.abs(x @ coef - y) / y
    return dict(zip("abc", (float(c) for c in coef))), float(rel.max())


FLOOR_MARGIN = 1.2


def _fit_prefill(rows: list[list[float]], times: list[float]) -> tuple[dict, float, float]:
    """Prefill = max(floor, a + b l + c pairs). A short prefill costs what reading the weights
    (or launching the kernels) costs whatever its length: the floor is the fastest sample, and
    a, b, c are fitted to the samples clear of it (> FLOOR_MARGIN x floor) when there are at
    least 3 of them. Returns (coefficients, max relative error over all samples, floor)."""
    if len(rows) < 3:
        raise ConfigError(f"fit_profile: need at least 3 prefill samples, got {len(rows)}")
    x, y = np.array(rows), np.array(times)
    if (y <= 0).any():
        raise ConfigError("fit_profile: every prefill time_s must be > 0")
    floor = float(y.min())
    keep = y > FLOOR_MARGIN * floor
    if keep.sum() < 3:
        coef, err = _fit_phase(rows, times, "prefill")
        return coef, err, 0.0
    c = _nonneg_lstsq(x[keep] / y[keep, None], np.ones(int(keep.sum())))
    rel = np.abs(np.maximum(floor, x @ c) - y) / y
    return dict(zip("abc", (float(v) for v in c))), float(rel.max()), floor


def fit_profile(samples: list[dict], device: str, model: str, tp: int,
                base: dict | None = None) -> dict:
    """Fit prefill and decode coefficients for one TP degree. Returns a profile dict holding
    `base`'s other TP degrees (if given) plus this one, samples included."""
    pre_rows, pre_t, dec_rows, dec_t = [], [], [], []
    for i, s in enumerate(samples):
        try:
            if s["phase"] == "prefill":
                pre_rows.append(_prefill_features(s["prompt_lens"], s.get("cached_lens")))
                pre_t.append(float(s["time_s"]))
            elif s["phase"] == "decode":
                dec_rows.append(_decode_features(s["batch_size"], s["sum_context"]))
                dec_t.append(float(s["time_s"]))
            else:
                raise ConfigError(f"fit_profile: sample {i} has phase {s['phase']!r}, expected prefill or decode")
        except (KeyError, TypeError) as e:
            raise ConfigError(f"fit_profile: sample {i} lacks a field ({e})") from None
    prefill, prefill_err, floor = _fit_prefill(pre_rows, pre_t)
    decode, decode_err = _fit_phase(dec_rows, dec_t, "decode")
    profile = json.loads(json.dumps(base)) if base else {
        "format": FORMAT, "device": device, "model": model, "tp": {}}
    if (profile["device"], profile["model"]) != (device, model):
        raise ConfigError(f"fit_profile: base profile is for {profile['device']}/{profile['model']}, not {device}/{model}")
    profile["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    profile["tp"][str(int(tp))] = {
        "samples": list(samples), "prefill": prefill, "prefill_floor_s": floor, "decode": decode,
        "max_rel_error": {"prefill": prefill_err, "decode": decode_err}}
    return profile


def profile_path(device: str, model: str) -> Path:
    """Where the profile of `model` on `device` lives: placement/profiles/<device>_<model>.json."""
    def clean(s: str) -> str:
        if "/" in s or s.endswith(".json"):          # a model folder or its config.json
            p = Path(s)
            s = p.parent.name if p.name == "config.json" else p.name
        return re.sub(r"[^A-Za-z0-9.-]+", "-", s).strip("-")
    return PROFILES_DIR / f"{clean(device)}_{clean(model)}.json"


def save_profile(profile: dict, path: str | Path | None = None) -> Path:
    """Write a profile (validated) to `path`, by default `profile_path(device, model)`."""
    _validate(profile, "profile")
    p = Path(path) if path else profile_path(profile["device"], profile["model"])
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(profile, indent=1) + "\n")
    return p


def load_profile(path: str | Path) -> dict:
    """Read and validate a profile JSON file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"profile {p} does not exist (write one with `disagg profile`)")
    try:
        profile = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"profile {p} is not valid JSON: {e}") from None
    _validate(profile, str(p))
    return profile


def _validate(profile, where: str) -> None:
    if not isinstance(profile, dict) or profile.get("format") != FORMAT:
        raise ConfigError(f"{where}: not a {FORMAT} profile")
    for key in ("device", "model", "tp"):
        if key not in profile:
            raise ConfigError(f"{where}: missing field {key!r}")
    if not profile["tp"]:
        raise ConfigError(f"{where}: holds no TP degree")
    if profile.get("serving") is not None:
        try:
            ServingTerms.from_dict(profile["serving"])
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None
    for tp, entry in profile["tp"].items():
        for phase in ("prefill", "decode"):
            coef = entry.get(phase) if isinstance(entry, dict) else None
            if not isinstance(coef, dict) or set(coef) != {"a", "b", "c"}:
                raise ConfigError(f"{where}: tp {tp} lacks {phase} coefficients a, b, c")


class ProfiledModel(LatencyModel):
    """prefill = max(floor, a + b * sum(new tokens) + c * sum(n^2 + 2 n cached)) (floor: the
    profile's `prefill_floor_s`, 0 when absent); decode = a + b * sum_context
    + c * batch_size, with the coefficients of one TP degree. Profiles are measured without
    pipeline parallelism, so pp must be 1. KV transfers use the profile's measured link figures
    when it has them, else the link the simulator passes in (from the device table)."""

    def __init__(self, profile: dict, tp: int = 1, pp: int = 1):
        _validate(profile, "profile")
        entry = profile["tp"].get(str(tp))
        if entry is None:
            raise ConfigError(f"profile {profile['device']}/{profile['model']} has no tp={tp}; "
                              f"it has tp {', '.join(sorted(profile['tp'], key=int))}")
        if pp != 1:
            raise ConfigError("a profiled latency model supports pp=1 only (profiles are measured without pipelining)")
        self.profile, self.tp, self.pp = profile, tp, 1
        self._pa, self._pb, self._pc = (entry["prefill"][k] for k in "abc")
        self._floor = float(entry.get("prefill_floor_s", 0.0))
        self._da, self._db, self._dc = (entry["decode"][k] for k in "abc")
        self._links = profile.get("kv_transfer", {})
        self.serving = ServingTerms.from_dict(profile.get("serving"))

    def prefill_time(self, prompt_lens: Sequence[int], cached_lens=None) -> float:
        _, new, square = _prefill_features(prompt_lens, cached_lens)
        t = self._pa + self._pb * new + self._pc * square
        return t if t > self._floor else self._floor

    def decode_time(self, batch_size: int, sum_context: int) -> float:
        return self._da + self._db * sum_context + self._dc * batch_size

    def decode_line(self, batch_size, sum_context):
        return self.decode_time(batch_size, sum_context), self._db * batch_size, 1 << 30

    def kv_transfer_time(self, num_bytes: float, link: Link) -> float:
        measured = self._links.get("intra_node" if link.same_node else "inter_node")
        if measured:
            link = Link(measured["bandwidth"], measured["latency_s"], link.same_node, link.num_streams)
        return super().kv_transfer_time(num_bytes, link)

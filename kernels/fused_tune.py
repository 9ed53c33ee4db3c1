"""Which tile shape, pipelining depth and split-K serves each decode matmul in the fused decode
path (kernels/fused_gemv.py), measured in the mode the model runs it (norm prologue, RoPE + KV
or SiLU or residual epilogue), on the model's own per-layer weights, as kernels/gemv.py's
tune_skinny does for the unfused path.

`tune_fused(cases, pdl=..., prefetch=...)` takes one case per (projection, mode): its layers,
an activation row and the mode's keyword arguments (model/fused_decode.py builds them). It times
every candidate config over all layers in one CUDA graph (each launch streams a different
layer's weights from HBM, as a decode step does), checks each config against F.linear in plain
mode, and records the fastest per (shape, mode, launch flags); `config_for` and `tuned_us` read
the table. Shapes under TUNE_MIN_BYTES (test models) take DEFAULT_CONFIG untimed.

Why per mode: on the H200 (2026-12-02) the config tuned in plain mode made gate_up's
norm + SiLU launch 61.4 µs against 56.6 plain (+9%), while qkv's norm + RoPE cost +7%.
"""
from __future__ import annotations

import torch

from kernels.fused_gemv import DEFAULT_CONFIG, check_config, fused_gemv

# (HB, BLOCK_K, num_warps, num_stages, SPLIT_K). The H200's first run ranked 32-row tiles first
# for every shape (at one program per multiprocessor: 96 for qkv, 64 for o and down); split-K
# (now with relaxed partial sums) and 64-row tiles are the new tries.
CANDIDATES = (
    (32, 256, 4, 4, 1), (32, 128, 4, 5, 1), (32, 512, 4, 3, 1), (64, 128, 4, 4, 1), (32, 256, 8, 3, 1),
    (32, 256, 4, 4, 2), (32, 128, 4, 5, 2), (32, 256, 4, 4, 4), (16, 256, 4, 4, 4),
    # two programs per multiprocessor fit (<= ~100 KB of stages): split-K without a second wave
    (32, 128, 4, 4, 2), (32, 128, 4, 4, 4), (16, 128, 4, 6, 4),
)
REFINE_TOP = 3      # a case with "refine": only the best configs of that mode are timed again
TUNE_MIN_BYTES = 4 << 20
_CHOICE: dict[tuple, tuple] = {}        # (device, dtype, N, K, pdl, prefetch, mode) -> config
_TIMES: dict[tuple, float] = {}         # same key -> µs per call of the chosen config
_RANKED: dict[tuple, list] = {}         # same key -> every timed config, fastest first


def _key(w: torch.Tensor, pdl: bool, prefetch: int, mode: str) -> tuple:
    return (str(w.device), w.dtype, w.shape[0], w.shape[1], bool(pdl), int(prefetch), mode)


def config_for(w: torch.Tensor, pdl: bool = False, prefetch: int = 0, off: int | None = None,
               mode: str = "plain") -> tuple:
    """The tuned config for weight w in `mode` under these launch flags, if it also suits tiles
    `off` apart (RoPE halves, gate|up); otherwise DEFAULT_CONFIG."""
    cfg = _CHOICE.get(_key(w, pdl, prefetch, mode), DEFAULT_CONFIG)
    if check_config(cfg, w.shape[0], w.shape[1], off):
        return DEFAULT_CONFIG
    return cfg


def tuned_us(w: torch.Tensor, pdl: bool = False, prefetch: int = 0, mode: str = "plain") -> float | None:
    """µs per call of the chosen config for w in `mode` under these flags (None: not timed)."""
    return _TIMES.get(_key(w, pdl, prefetch, mode))


def _graph_us(fn, calls: int) -> float:
    from kernels.gemv import _graph_us as graph_us
    return graph_us(fn, calls)


def _check(x, w, bias, cfg) -> None:
    ref = torch.nn.functional.linear(x, w, bias).float()
    err = float((fused_gemv(x, w, bias, config=cfg).float() - ref).norm() / ref.norm().clamp_min(1e-30))
    if not err < 1e-2:
        raise RuntimeError(f"relative error {err:.1e} against F.linear")


@torch.inference_mode()
def tune_fused(cases: list[dict], pdl: bool = False, prefetch: int = 0, candidates=CANDIDATES,
               log=None) -> list[dict]:
    """cases: [{name, mode, layers [nn.Linear], x [rows, K], kwargs (the mode's fused_gemv
    arguments), off (tile distance the mode needs, or None), refine (optional: a mode of the
    same weight tuned earlier in `cases`, whose REFINE_TOP best configs are the only ones timed,
    which keeps startup compiles down)}]. Times each candidate that suits
    the mode over all layers; keeps the fastest. CUDA only; idempotent per shape, mode and
    flags. Returns one row per case: every candidate's µs, the choice and its GB/s."""
    report = []
    checked: dict[tuple, str | None] = {}
    for case in cases:
        layers, x, off = case["layers"], case["x"], case.get("off")
        w0 = layers[0].weight
        n, k = w0.shape
        key = _key(w0, pdl, prefetch, case["mode"])
        if key in _CHOICE:
            continue
        _CHOICE[key] = DEFAULT_CONFIG
        if n * k * w0.element_size() < TUNE_MIN_BYTES:
            continue
        times = {}
        todo = candidates
        if case.get("refine"):      # the prologue variant of a mode: only its best configs again
            todo = _RANKED.get(_key(w0, pdl, prefetch, case["refine"]), [])[:REFINE_TOP] or candidates
        for cfg in todo:
            if check_config(cfg, n, k, off):
                continue
            try:
                if (n, k, cfg) not in checked:
                    _check(torch.randn((x.shape[0], k), device=x.device, dtype=x.dtype), w0, layers[0].bias, cfg)
                    checked[(n, k, cfg)] = None
                kw = dict(case["kwargs"], config=cfg, pdl=pdl, prefetch=prefetch)
                times[cfg] = _graph_us(lambda kw=kw: [fused_gemv(x, lay.weight, lay.bias, **kw) for lay in layers],
                                       len(layers))
            except Exception as e:  # noqa: BLE001 - a config that fails here is never chosen
                if log:
                    log(f"fused gemv {case['name']} {case['mode']} {cfg}: {type(e).__name__}: {str(e)[:200]}")
        if not times:
            continue
        best = min(times, key=times.get)
        _CHOICE[key], _TIMES[key] = best, times[best]
        _RANKED[key] = sorted(times, key=times.get)
        nbytes = n * k * w0.element_size()
        row = {"name": case["name"], "mode": case["mode"], "N": n, "K": k, "layers": len(layers), "pdl": pdl,
               "prefetch": prefetch, "chosen": list(best), "best_us": times[best], "GBps": nbytes / times[best] / 1e3,
               "all_us": {str(c): t for c, t in sorted(times.items(), key=lambda kv: kv[1])}}
        report.append(row)
        if log:
            ranked = ", ".join(f"{c}: {t:.1f}" for c, t in sorted(times.items(), key=lambda kv: kv[1])[:5])
            log(f"fused gemv {case['name']:>7} {case['mode']:<10} {n:>6}x{k:<6} pdl={int(pdl)}: best {best} "
                f"{times[best]:.2f} us ({row['GBps']:.0f} GB/s); top: {ranked}")
    return report


def reset() -> None:
    _CHOICE.clear()
    _TIMES.clear()
    _RANKED.clear()

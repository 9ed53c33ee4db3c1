"""Which tile shape, pipelining depth and split-K serves each decode matmul shape in the fused
decode path (kernels/fused_gemv.py): measured on the model's own per-layer weights, as
kernels/gemv.py's tune_skinny does for the unfused path.

`tune_fused(layers, pdl=..., prefetch=...)` times every candidate config over all layers of one
(N, K) shape in one CUDA graph (so each launch streams a different layer's weights from HBM, as
a decode step does, and with pdl the launches overlap as they will in the step), checks each
against F.linear, and records the fastest in a per-process table keyed by the launch flags;
`config_for` reads it. Shapes under TUNE_MIN_BYTES (test models) take DEFAULT_CONFIG untimed.
"""
from __future__ import annotations

import torch

from kernels.fused_gemv import DEFAULT_CONFIG, check_config, fused_gemv

# (HB, BLOCK_K, num_warps, num_stages, SPLIT_K): tile rows per half, K per step, warps, pipeline
# depth, K splits. Small HB and split-K give the 4096-row matrices (o, down) enough programs for
# 132 multiprocessors; deep pipelines keep ~32-64 KB in flight per program.
CANDIDATES = (
    (16, 256, 4, 4, 1), (16, 512, 4, 3, 1), (16, 128, 4, 6, 1), (32, 256, 4, 4, 1), (32, 128, 4, 5, 1),
    (16, 256, 8, 4, 1), (16, 256, 4, 4, 2), (16, 512, 4, 3, 2), (16, 128, 4, 6, 2), (32, 256, 4, 3, 2),
    (16, 256, 4, 4, 4), (16, 128, 4, 4, 4), (16, 256, 4, 3, 8), (32, 256, 8, 3, 1), (32, 512, 8, 2, 2),
)
TUNE_MIN_BYTES = 4 << 20
_CHOICE: dict[tuple, tuple] = {}        # (device, dtype, N, K, pdl, prefetch) -> config
_TIMES: dict[tuple, float] = {}         # same key -> µs per call of the chosen config


def _key(w: torch.Tensor, pdl: bool, prefetch: int) -> tuple:
    return (str(w.device), w.dtype, w.shape[0], w.shape[1], bool(pdl), int(prefetch))


def config_for(w: torch.Tensor, pdl: bool = False, prefetch: int = 0, off: int | None = None) -> tuple:
    """The tuned config for weight w under these launch flags, if it also suits tiles `off`
    apart (RoPE halves, gate|up); otherwise DEFAULT_CONFIG."""
    cfg = _CHOICE.get(_key(w, pdl, prefetch), DEFAULT_CONFIG)
    if check_config(cfg, w.shape[0], w.shape[1], off):
        return DEFAULT_CONFIG
    return cfg


def _graph_us(fn, calls: int) -> float:
    from kernels.gemv import _graph_us as graph_us
    return graph_us(fn, calls)


@torch.inference_mode()
def tune_fused(layers: list[torch.nn.Linear], pdl: bool = False, prefetch: int = 0, rows: int = 1,
               candidates=CANDIDATES, log=None) -> list[dict]:
    """Time each candidate config for each (N, K) among `layers` with `rows` activation rows,
    keep the fastest that matches F.linear (relative error < 1e-2). CUDA only; idempotent per
    shape and flags. Returns one row per shape: every candidate's µs, the choice and its GB/s."""
    by_shape: dict[tuple, list[torch.nn.Linear]] = {}
    for layer in layers:
        by_shape.setdefault((layer.out_features, layer.in_features), []).append(layer)
    report = []
    for (n, k), group in by_shape.items():
        w0 = group[0].weight
        key = _key(w0, pdl, prefetch)
        if key in _CHOICE:
            continue
        _CHOICE[key] = DEFAULT_CONFIG
        if n * k * w0.element_size() < TUNE_MIN_BYTES:
            continue
        gen = torch.Generator(device=w0.device).manual_seed(0)
        x = torch.randn((rows, k), generator=gen, device=w0.device, dtype=w0.dtype)
        ref = group[0](x).float()
        times = {}
        for cfg in candidates:
            if check_config(cfg, n, k):
                continue
            try:
                out = fused_gemv(x, w0, group[0].bias, config=cfg, pdl=pdl, prefetch=prefetch).float()
                err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
                if not err < 1e-2:
                    raise RuntimeError(f"relative error {err:.1e} against F.linear")
                times[cfg] = _graph_us(lambda c=cfg: [fused_gemv(x, lay.weight, lay.bias, config=c, pdl=pdl,
                                                                 prefetch=prefetch) for lay in group], len(group))
            except Exception as e:  # noqa: BLE001 - a config that fails here is never chosen
                if log:
                    log(f"fused gemv {n}x{k} {cfg}: {type(e).__name__}: {str(e)[:200]}")
        if not times:
            continue
        best = min(times, key=times.get)
        _CHOICE[key] = best
        _TIMES[key] = times[best]
        nbytes = n * k * w0.element_size()
        row = {"N": n, "K": k, "rows": rows, "layers": len(group), "pdl": pdl, "prefetch": prefetch,
               "chosen": list(best), "best_us": times[best], "GBps": nbytes / times[best] / 1e3,
               "all_us": {str(c): t for c, t in sorted(times.items(), key=lambda kv: kv[1])}}
        report.append(row)
        if log:
            ranked = ", ".join(f"{c}: {t:.1f}" for c, t in sorted(times.items(), key=lambda kv: kv[1])[:5])
            log(f"fused gemv {n:>6}x{k:<6} pdl={int(pdl)} prefetch={prefetch}: best {best} {times[best]:.1f} us "
                f"({row['GBps']:.0f} GB/s); top: {ranked}")
    return report


def tuned_us(w: torch.Tensor, pdl: bool = False, prefetch: int = 0) -> float | None:
    """µs per call of the chosen config for w under these flags (None: not timed)."""
    return _TIMES.get(_key(w, pdl, prefetch))


def reset() -> None:
    _CHOICE.clear()
    _TIMES.clear()

"""Setting up the fused decode path (model/fused_decode.py) for one model on one GPU: the tuning
cases of its projections in the modes they run, the plan that picks per norm-prologue projection
between the norm folded in, a separate RMSNorm kernel, or the unfused path, and a self-check of
every kernel mode before serving uses it."""
from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch

from kernels.fused_gemv import fused_gemv, fused_gemv_ref
from kernels.fused_tune import config_for, tuned_us
from model.fused_decode import FusedDecode, unsupported

# µs per launch inside a decode graph of the small kernels the plan may keep (the H200
# breakdown of 2026-12-02: RMSNorm 2.2, RoPE 2.2, KV write 1.35, SiLU-and-mul 1.5).
RMSNORM_US = 2.2
UNFUSED_EXTRA_US = {"qkv": 2.2 + 2.2 + 1.35, "gate_up": 2.2 + 1.5}
PLAN_NAMES = ("qkv", "gate_up")
PLAN_CHOICES = ("fused", "apart", "unfused")


def _scratch(model):
    attn = model.layers[0].self_attn
    dev, dt = attn.qkv_proj.weight.device, attn.qkv_proj.weight.dtype
    caches = [torch.zeros((4, 16, attn.num_kv_heads, attn.head_dim), device=dev, dtype=dt) for _ in range(2)]
    pos = torch.full((1,), 3, dtype=torch.int32, device=dev)      # a real rotation
    slots = torch.full((1,), 5, dtype=torch.int64, device=dev)
    return dev, dt, caches, pos, slots


@torch.inference_mode()
def tuning_cases(model) -> list[dict]:
    """kernels.fused_tune.tune_fused's cases: each projection over all layers in each mode the
    plan may run it in (qkv and gate_up with and without the norm prologue), one row."""
    L = model.layers
    attn, mlp, ln = L[0].self_attn, L[0].mlp, L[0].input_layernorm
    dev, dt, caches, pos, slots = _scratch(model)
    gen = torch.Generator(device=dev).manual_seed(0)

    def row(k):
        return torch.randn((1, k), generator=gen, device=dev, dtype=dt)
    h = model.cfg.hidden_size
    x = row(h)
    norm = (x.float().square().sum(-1), ln.weight, ln.eps)
    rope = (pos, model.cos_sin, *caches, slots, attn.num_heads, attn.num_kv_heads)
    res = (row(attn.o_proj.out_features), torch.zeros(1, device=dev))
    qkv, o = [l.self_attn.qkv_proj for l in L], [l.self_attn.o_proj for l in L]
    gu, down = [l.mlp.gate_up_proj for l in L], [l.mlp.down_proj for l in L]
    half, inter = attn.head_dim // 2, mlp.inter
    # The norm-prologue modes time only the best few configs of their plain counterparts.
    return [
        dict(name="qkv", mode="rope", layers=qkv, x=x, kwargs=dict(rope_kv=rope), off=half),
        dict(name="qkv", mode="norm+rope", layers=qkv, x=x, kwargs=dict(norm=norm, rope_kv=rope), off=half,
             refine="rope"),
        dict(name="o", mode="residual", layers=o, x=row(attn.q_size), kwargs=dict(residual=res), off=None),
        dict(name="gate_up", mode="silu", layers=gu, x=x, kwargs=dict(silu=True), off=inter),
        dict(name="gate_up", mode="norm+silu", layers=gu, x=x, kwargs=dict(norm=norm, silu=True), off=inter,
             refine="silu"),
        dict(name="down", mode="residual", layers=down, x=row(inter), kwargs=dict(residual=res), off=None),
    ]


def choose_plan(model, fused: FusedDecode) -> tuple:
    """Per norm-prologue projection, the fastest of: norm folded in, a separate RMSNorm kernel
    then the fused GEMV, or the unfused path (kernels/gemv.py's table plus its small kernels),
    from the tuners' timings at one row. Untimed options do not compete; the fused mode untimed:
    fused."""
    from kernels.gemv import tuned_us as skinny_us
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    plan = []
    for name, w, epi in (("qkv", attn.qkv_proj.weight, "rope"), ("gate_up", mlp.gate_up_proj.weight, "silu")):
        cost = {}
        t = tuned_us(w, fused.pdl, fused.prefetch, "norm+" + epi)
        if t is not None:
            cost["fused"] = t
        t = tuned_us(w, fused.pdl, fused.prefetch, epi)
        if t is not None:
            cost["apart"] = t + RMSNORM_US
        t = skinny_us(w, 1)
        if t is not None:
            cost["unfused"] = t + UNFUSED_EXTRA_US[name]
        # Untimed fused modes (shapes too small to tune: test models) keep the fused path.
        plan.append((name, min(cost, key=cost.get) if "fused" in cost else "fused"))
    return tuple(plan)


def parse_plan(text: str) -> tuple | None:
    """DISAGG_FUSED_PLAN: "auto" (None: choose_plan decides), "fused" (everything fused), or
    pairs like "qkv=apart,gate_up=unfused"."""
    text = text.strip().lower()
    if text in ("", "auto"):
        return None
    if text == "fused":
        return tuple((n, "fused") for n in PLAN_NAMES)
    plan = []
    for part in text.split(","):
        name, _, how = part.partition("=")
        if name.strip() not in PLAN_NAMES or how.strip() not in PLAN_CHOICES:
            raise ValueError(f"DISAGG_FUSED_PLAN: {part!r} is not <{'|'.join(PLAN_NAMES)}>=<{'|'.join(PLAN_CHOICES)}> "
                             "(or use auto / fused)")
        plan.append((name.strip(), how.strip()))
    return tuple(plan)


@torch.inference_mode()
def self_check(model, fused: FusedDecode) -> str | None:
    """Run each fused kernel mode the plan uses once on layer 0's weights (one row, scratch KV)
    against its reference; the reason it failed, or None. A kernel that does not build or does
    not agree on this GPU then costs the fused path, never a serving step."""
    cases = [c for c in tuning_cases(model)
             if c["name"] not in PLAN_NAMES or c["mode"].startswith("norm+") == (fused.how(c["name"]) == "fused")]
    for case in cases:
        if case["name"] in PLAN_NAMES and fused.how(case["name"]) == "unfused":
            continue
        lin = case["layers"][0]
        outs = []
        for fn in (fused_gemv, fused_gemv_ref):
            kwargs = dict(case["kwargs"])
            scratch = []
            if "rope_kv" in kwargs:     # fresh caches per run: both write into them
                pos, cs, kc, vc, slots, hq, hk = kwargs["rope_kv"]
                scratch = [torch.zeros_like(kc), torch.zeros_like(vc)]
                kwargs["rope_kv"] = (pos, cs, *scratch, slots, hq, hk)
            if "residual" in kwargs:
                res, ssq = kwargs["residual"]
                scratch = [res.clone(), ssq.clone()]
                kwargs["residual"] = tuple(scratch)
            if fn is fused_gemv:
                kwargs.update(config=config_for(lin.weight, fused.pdl, fused.prefetch, case["off"], case["mode"]),
                              pdl=fused.pdl, prefetch=fused.prefetch, impl=fused.impl)
            try:
                out = fn(case["x"], lin.weight, lin.bias, **kwargs)
            except Exception as e:  # noqa: BLE001 - reported, and the unfused path serves
                return f"{case['name']} {case['mode']}: {type(e).__name__}: {str(e)[:300]}"
            outs.append(torch.cat([out.float().flatten()] + [t.float().flatten() for t in scratch]))
        err = float((outs[0] - outs[1]).norm() / outs[1].norm().clamp_min(1e-30))
        if not err < 2e-2:
            return f"{case['name']} {case['mode']}: relative error {err:.1e} against the unfused reference"
    return None


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in ("0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value in ("1", "true", "yes")


def settings_from_env() -> FusedDecode | None:
    """DISAGG_FUSED_DECODE=0: no fused path. DISAGG_PDL=1: programmatic dependent launch
    between its kernels (measured slower on the H200 in graphs: off by default);
    DISAGG_PDL_PREFETCH=<columns>: with it, an L2 prefetch of each weight row's start;
    DISAGG_DECODE_SPLIT_TOKENS: the attention's fewest tokens per split (256);
    DISAGG_DECODE_COMBINE=1: the attention's last split combines the others (no reduce kernel)."""
    if not _flag("DISAGG_FUSED_DECODE", True):
        return None
    pdl = _flag("DISAGG_PDL", False)
    return FusedDecode(pdl=pdl, prefetch=int(os.environ.get("DISAGG_PDL_PREFETCH", "0") or 0) if pdl else 0,
                       split_tokens=int(os.environ.get("DISAGG_DECODE_SPLIT_TOKENS", "256") or 256),
                       combine=_flag("DISAGG_DECODE_COMBINE", False))


def setup(model, log=None) -> tuple[FusedDecode | None, list[dict]]:
    """(the fused path's settings for this model, or None; the tuning report): settings from
    the environment, configs tuned per projection and mode, the plan (DISAGG_FUSED_PLAN: auto,
    fused, or pairs like qkv=apart), and a self-check of every mode it uses. CUDA only."""
    from kernels.fused_tune import tune_fused
    fused = settings_from_env()
    if fused is None or unsupported(model):
        return None, []
    report = tune_fused(tuning_cases(model), pdl=fused.pdl, prefetch=fused.prefetch, log=log)
    plan = parse_plan(os.environ.get("DISAGG_FUSED_PLAN", "auto"))
    fused = replace(fused, plan=choose_plan(model, fused) if plan is None else plan)
    why = self_check(model, fused)
    if why:
        logging.getLogger(__name__).warning("fused decode kernels off: %s", why)
        return None, report
    return fused, report

"""The report of `disagg bench`: every figure of a run as one JSON-able dict, and its table.
The same for every backend (gRPC, OpenAI-compatible HTTP)."""
from __future__ import annotations

import datetime as _dt
import math
from dataclasses import asdict

import numpy as np

STAGES = ("prefill_queue", "prefill_compute", "kv_transfer", "decode_queue")
GOODPUT_DEFINITION = ("requests that completed with TTFT <= ttft_slo_s and TPOT <= tpot_slo_s, "
                      "per second from the first arrival to the last response")


def _stats(x) -> dict:
    x = np.asarray([v for v in x if math.isfinite(v)], dtype=float)
    if not len(x):
        return {"mean": None, "p50": None, "p90": None, "p99": None, "n": 0}
    p50, p90, p99 = (float(v) for v in np.percentile(x, [50, 90, 99]))
    return {"mean": float(x.mean()), "p50": p50, "p90": p90, "p99": p99, "n": int(len(x))}


def summarize(recs: list, wl, info, notes: dict, args) -> dict:
    """Every figure of the run, as one JSON-able dict (per-request rows under "requests")."""
    ok = [r for r in recs if r.ok]
    ttft_slo = args.ttft_slo_s if args.ttft_slo_s is not None else math.inf
    tpot_slo = args.tpot_slo_s if args.tpot_slo_s is not None else math.inf
    met = [r.ok and r.ttft_s <= ttft_slo and r.tpot_s <= tpot_slo for r in recs]
    end = max((r.done_s for r in ok), default=0.0)
    duration = max(end, max((r.sent_s for r in recs if math.isfinite(r.sent_s)), default=0.0), 1e-9)
    statuses, reasons = {}, {}
    for r in recs:
        statuses[r.status] = statuses.get(r.status, 0) + 1
        if r.finish_reason:
            reasons[r.finish_reason] = reasons.get(r.finish_reason, 0) + 1
    out_tok, in_tok = sum(r.num_tokens for r in ok), sum(r.prompt_len for r in ok)
    multi = [r for r in ok if r.num_tokens > 1]
    breakdown = {s: _stats([r.timings.get(f"{s}_s", math.nan) for r in (multi if s in STAGES[2:] else ok)])
                 for s in STAGES}
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in vars(args).items() if k not in ("token", "func", "segments")},
        "server": {"backend": getattr(args, "backend", "grpc"), "model": info.model, "max_model_len": info.max_model_len, "vocab_size": info.vocab_size,
                   "max_prompt_tokens": info.max_prompt_tokens, "max_tokens_limit": info.max_tokens_limit},
        "workload": {"name": wl.name, "num_requests": len(recs), "offered_rate_rps": wl.rate, **notes},
        "duration_s": duration, "num_sent": sum(math.isfinite(r.sent_s) for r in recs),
        "num_completed": len(ok), "num_failed": len(recs) - len(ok),
        "status_counts": statuses, "finish_reasons": reasons,
        # Completed at "length" with fewer tokens than asked: tokens lost on the way.
        "num_short_outputs": sum(r.finish_reason == "length" and r.num_tokens < r.output_len for r in ok),
        "total_prompt_tokens": in_tok, "total_output_tokens": out_tok,
        # Prompt tokens the server's prefix caches served (usage.cached_tokens; gRPC backend).
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
        "prefix_hit_rate": sum(r.cached_tokens for r in ok) / max(1, in_tok),
        "request_throughput_rps": len(ok) / duration, "output_token_throughput_tps": out_tok / duration,
        "total_token_throughput_tps": (in_tok + out_tok) / duration,
        "ttft_s": _stats([r.ttft_s for r in ok]), "tpot_s": _stats([r.tpot_s for r in multi]),
        "itl_s": _stats([g for r in ok for g in r.itl_s]), "e2e_s": _stats([r.e2e_s for r in ok]),
        "server_ttft_s": _stats([r.timings.get("ttft_s", math.nan) for r in ok]),
        "ttft_breakdown_s": breakdown,
        "send_lag_s": _stats([r.sent_s - r.arrival_s for r in recs]),
        "slo": {"ttft_s": args.ttft_slo_s, "tpot_s": args.tpot_slo_s},
        "attainment": sum(met) / max(1, len(recs)),
        "ttft_attainment": sum(r.ok and r.ttft_s <= ttft_slo for r in recs) / max(1, len(recs)),
        "tpot_attainment": sum(r.ok and r.tpot_s <= tpot_slo for r in recs) / max(1, len(recs)),
        "goodput_rps": sum(met) / duration, "goodput_definition": GOODPUT_DEFINITION,
        "segments": segments(recs, met, getattr(args, "segments", None)),
        "windows": windows(recs, met, getattr(args, "window_s", 0.0)),
        "requests": [_row(r) for r in recs],
    }


def windows(recs: list, met: list, window_s: float) -> list[dict]:
    """Attainment of the requests arriving in each window of `window_s` seconds (0: a tenth of
    the run): how it moves while the mix shifts."""
    if not recs:
        return []
    last = max(r.arrival_s for r in recs)
    width = window_s if window_s and window_s > 0 else max(last / 10, 1e-3)
    out = []
    for k in range(int(last // width) + 1):
        lo, hi = k * width, (k + 1) * width
        idx = [i for i, r in enumerate(recs) if lo <= r.arrival_s < hi]
        if idx:
            ttft = [recs[i].ttft_s for i in idx if recs[i].ok]
            out.append({"start_s": round(lo, 3), "end_s": round(hi, 3), "num_requests": len(idx),
                        "attainment": sum(met[i] for i in idx) / len(idx),
                        "num_failed": sum(not recs[i].ok for i in idx),
                        "ttft_p90_s": float(np.percentile(ttft, 90)) if ttft else None})
    return out


def segments(recs: list, met: list, segs) -> list[dict]:
    """Attainment per replayed trace (`--replay A,B`), in replay order."""
    out, lo = [], 0
    for g in segs or []:
        hi = min(lo + g.num_requests, len(recs))
        n = hi - lo
        out.append({"name": g.name, "start_s": g.start_s, "end_s": g.end_s, "num_requests": n,
                    "attainment": sum(met[lo:hi]) / n if n else None})
        lo = hi
    return out


def _row(r) -> dict:
    d = {k: v for k, v in asdict(r).items() if k != "itl_s"} | {"ttft_s": r.ttft_s, "tpot_s": r.tpot_s}
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def format_table(res: dict) -> str:
    """The human-readable summary (latencies in ms)."""
    w = res["workload"]
    lines = [f"{'=' * 22} disagg bench {'=' * 22}",
             f"workload {w['name']}: {w['num_requests']} requests, offered {w['offered_rate_rps']:.3g} req/s; "
             f"clipped prompts {w['num_prompts_clipped']}, outputs {w['num_outputs_clipped']}",
             f"duration {res['duration_s']:.2f} s; completed {res['num_completed']}/{res['num_sent']} sent; "
             f"statuses {res['status_counts']}"
             + (f"; {res['num_short_outputs']} outputs shorter than asked" if res["num_short_outputs"] else ""),
             f"throughput {res['request_throughput_rps']:.3f} req/s, {res['output_token_throughput_tps']:.1f} output tok/s, "
             f"{res['total_token_throughput_tps']:.1f} total tok/s",
             f"SLO ttft {res['slo']['ttft_s']} s, tpot {res['slo']['tpot_s']} s: attainment {res['attainment']:.3f} "
             f"(ttft {res['ttft_attainment']:.3f}, tpot {res['tpot_attainment']:.3f}), goodput {res['goodput_rps']:.3f} req/s",
             f"{'ms':<24}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    rows = [("TTFT", res["ttft_s"]), ("TPOT", res["tpot_s"]), ("inter-token", res["itl_s"]),
            ("end-to-end", res["e2e_s"]), ("server TTFT", res["server_ttft_s"])]
    rows += [(f"  {s.replace('_', ' ')}", res["ttft_breakdown_s"][s]) for s in STAGES]
    for name, st in rows:
        vals = "".join(f"{st[k] * 1e3:>10.1f}" if st[k] is not None else f"{'-':>10}" for k in ("mean", "p50", "p90", "p99"))
        lines.append(f"{name:<24}{vals}")
    for g in res.get("segments") or []:
        att = "-" if g["attainment"] is None else f"{g['attainment']:.3f}"
        lines.append(f"trace {g['name']}: {g['num_requests']} requests from {g['start_s']:.1f} s, attainment {att}")
    if res.get("windows"):
        lines.append("attainment by arrival window: " + " ".join(
            f"[{w['start_s']:.0f}s {w['attainment']:.2f}]" for w in res["windows"]))
    return "\n".join(lines)

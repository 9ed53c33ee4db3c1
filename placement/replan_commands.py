"""`disagg replan-report`: the re-planning report (placement/replan_report.py) from the CLI."""
from __future__ import annotations

import shlex
import sys
import time

from engine.errors import ConfigError


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not v > 0 for v in vals):
        raise ConfigError(f"expected numbers > 0, got {text!r}")
    return vals


def add_args(p) -> None:
    p.add_argument("--plan", required=True, help="plan file: its instances, hardware and SLO (the split is the start "
                   "only if --start plan)")
    p.add_argument("--traces", default="azure-code,azure-conv",
                   help="traces back to back, NAME[:SECONDS],... (default: the Azure code then conversation traces)")
    p.add_argument("--compression", default="10", help="arrival-time compression factors, e.g. 8,10,12 (one load each)")
    p.add_argument("--latency-model", default="roofline", help="roofline or a profile JSON (placement/profiles/)")
    p.add_argument("--tune-s", type=float, default=3600.0, help="the start plan is the best split on this many "
                   "seconds of the traces (before compression)")
    p.add_argument("--flip-cost-s", type=float, default=5.0, help="seconds an instance serves nothing while it flips")
    p.add_argument("--warmup-s", type=float, default=30.0, help="arrivals re-simulated before each change of split")
    p.add_argument("--interval-s", type=float, default=5.0)
    p.add_argument("--window-s", type=float, default=30.0)
    p.add_argument("--max-window-requests", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--margin", type=float, default=0.05)
    p.add_argument("--confirmations", type=int, default=2)
    p.add_argument("--min-dwell-s", type=float, default=30.0)
    p.add_argument("--title", default=None)
    p.add_argument("--out", required=True, help="report folder (README.md, report.json)")


def cmd(args) -> int:
    from engine.model_config import load_model_config
    from engine.plan import Plan
    from placement.replan import ReplanConfig
    from placement.replan_report import build, write
    plan = Plan.load(args.plan)
    if args.flip_cost_s < 0 or args.warmup_s < 0:
        raise ConfigError("--flip-cost-s and --warmup-s must be >= 0")
    config = ReplanConfig(margin=args.margin, confirmations=args.confirmations, min_dwell_s=args.min_dwell_s,
                          window_s=args.window_s, max_window_requests=args.max_window_requests, repeat=args.repeat,
                          interval_s=args.interval_s)
    model = load_model_config(plan.model)
    t0 = time.perf_counter()
    rep = build(plan, args.traces, _floats(args.compression), args.latency_model, config, args.tune_s,
                args.flip_cost_s, args.warmup_s, model.max_position_embeddings,
                say=lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}", file=sys.stderr, flush=True))
    title = args.title or f"Re-planning on {args.traces}: {plan.model}, {rep['num_gpus']} GPUs"
    path = write(rep, args.out, title, "disagg replan-report " + shlex.join(sys.argv[sys.argv.index("replan-report") + 1:]
                                                                     if "replan-report" in sys.argv else []))
    for r in rep["loads"]:
        print(f"x{r['compression']:g} ({r['rate_rps']:.1f} req/s): re-planning {r['replan']['attainment']:.1%} "
              f"({r['replan']['num_flips']} flips), best fixed {r['best_fixed']['split']} {r['best_fixed']['attainment']:.1%}, "
              f"tuned for the start {r['first_window_plan']['split']} {r['first_window_plan']['attainment']:.1%}")
    print(f"report: {path} ({rep['wall_s']:.0f} s wall)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("replan-report", help="simulate online re-planning over traces back to back against "
                              "fixed splits; write a report")
    add_args(p)
    p.set_defaults(func=cmd)

"""`disagg place` and `disagg simulate`.

    disagg place --model llama-3-8b --gpu H100:8 --nodes 1 --ttft 0.4 --tpot 0.04 \
        --attainment 0.9 --workload azure-conv --out plan.json
    disagg simulate --plan plan.json --workload azure-conv --out report/

`register(subparsers)` adds both to a `disagg` parser; `python -m placement.commands ...` runs them
alone. Errors a user can cause end as one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import time
import types

from engine.errors import ConfigError, DisaggError
from placement.choices import KINDS


def _one_line_error(self, message):
    # argparse prints the whole usage first; one line naming the problem is clearer.
    self.exit(2, f"{self.prog}: error: {message}\n")


def _gpus(text: str) -> list[tuple[str, int]]:
    out = []
    for part in text.split(","):
        name, _, count = part.strip().partition(":")
        try:
            out.append((name, int(count) if count else 8))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--gpu takes TYPE:COUNT[,TYPE:COUNT], got {text!r}") from None
        if out[-1][1] < 1:
            raise argparse.ArgumentTypeError(f"--gpu counts must be >= 1, got {text!r}")
    return out


def _costs(text: str) -> dict[str, float]:
    try:
        return {k.strip(): float(v) for k, v in (p.split("=") for p in text.split(",") if p.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpu-cost takes TYPE=DOLLARS_PER_HOUR[,...], got {text!r}") from None


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rates takes comma-separated numbers, got {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("--rates must be > 0")
    return rates


def _workload_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--workload", required=required,
                   help="azure-conv, azure-code, mooncake-conv, mooncake-synthetic, sharegpt, arxiv, or a trace file")
    p.add_argument("--arrival", default="auto", choices=["auto", "trace", "poisson", "gamma"],
                   help="auto: a trace's own timestamps (scaled to each rate), else Poisson")
    p.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gamma gaps")
    p.add_argument("--seed", type=int, default=0)


def add_place_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset name or path to an HF config.json / model folder")
    p.add_argument("--gpu", required=True, type=_gpus, help="TYPE:COUNT per node, e.g. H100:8 or H100:8,A100:8 or cpu:2")
    p.add_argument("--nodes", type=int, default=1, help="nodes of each GPU type")
    p.add_argument("--ttft", type=float, required=True, help="TTFT target (s)")
    p.add_argument("--tpot", type=float, required=True, help="TPOT target (s)")
    p.add_argument("--attainment", type=float, default=0.9)
    _workload_args(p, required=True)
    p.add_argument("--rate", type=float, default=None, help="target rate (req/s); default: use all the devices")
    p.add_argument("--out", required=True, help="plan file to write")
    p.add_argument("--latency-model", default="roofline", help="roofline or a profile JSON (placement/profiles/)")
    p.add_argument("--pairing", default="auto", choices=["auto", "on", "off"],
                   help="Alg. 2: keep KV on NVLink by pairing prefill and decode stages on one node")
    p.add_argument("--gpu-cost", type=_costs, default={}, help="TYPE=$/h, overrides the table's default")
    p.add_argument("--search-requests", type=int, default=2000, help="requests sampled for each goodput search")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=None, help="default 8192 on GPUs, 4096 on cpu")
    p.add_argument("--max-batch-size", type=int, default=None, help="default 256 on GPUs, 64 on cpu")
    p.add_argument("--baselines", action="store_true", help="(always on now) colocated kinds are searched too")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"kinds of plan to compare, comma-separated among {', '.join(KINDS)}")
    p.add_argument("--objective", default="auto", choices=["auto", "goodput", "cost"],
                   help="rank plans by goodput per GPU or per dollar (auto: per dollar when GPU prices differ)")
    p.add_argument("--score-requests", type=int, default=None,
                   help="requests the final candidates are scored on (default: all, as `simulate` replays)")
    p.add_argument("--write-closest", action="store_true",
                   help="with --rate and no plan carrying it, write the closest plan (exit 1 still)")
    p.add_argument("--quiet", action="store_true")


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", required=True, help="plan file written by `disagg place`")
    _workload_args(p, required=False)
    p.add_argument("--out", required=True, help="report folder (index.html, PNGs, report.json)")
    p.add_argument("--rates", type=_rates, default=None, help="rates for the attainment curve (default: around the goodputs)")
    p.add_argument("--latency-model", default="roofline", help="roofline or a profile JSON")
    p.add_argument("--num-requests", type=int, default=None, help="first N requests of the workload (default: all)")
    p.add_argument("--quiet", action="store_true")


class Progress:
    """A progress bar on stderr (one line redrawn on a terminal, a line per step otherwise)."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.tty, self.t0 = quiet, sys.stderr.isatty(), time.perf_counter()

    def __call__(self, done: int, total: int, message: str) -> None:
        if self.quiet:
            return
        width = 24
        fill = int(width * done / max(total, 1))
        line = f"[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {time.perf_counter() - self.t0:5.1f}s {message}"
        sys.stderr.write(("\r" + line.ljust(100)) if self.tty else line + "\n")
        if self.tty and done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def cmd_place(args) -> int:
    from engine.model_config import load_model_config
    from placement.gpus import get_device
    from placement.optimizer import DevicePool, PlaceSpec, RateNotMet, place, table
    from placement.workload import make_workload
    if args.nodes < 1 or args.search_requests < 1 or (args.score_requests is not None and args.score_requests < 1):
        raise ConfigError("--nodes, --search-requests and --score-requests must be >= 1")
    model = load_model_config(args.model)
    pools = [DevicePool(get_device(name, args.gpu_cost.get(name)), count, args.nodes) for name, count in args.gpu]
    # A sample spread over the whole trace keeps its rate profile (a head sample would see
    # only the trace's first minutes).
    wl = make_workload(args.workload, num_requests=args.search_requests, arrival=args.arrival, cv=args.cv,
                       seed=args.seed, max_model_len=model.max_position_embeddings, sample="spread")
    # The final candidates are scored on what `disagg simulate` replays by default.
    full = make_workload(args.workload, num_requests=args.score_requests, arrival=args.arrival, cv=args.cv,
                         seed=args.seed, max_model_len=model.max_position_embeddings)
    cpu = all(pool.device.device == "cpu" for pool in pools)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    spec = PlaceSpec(model, args.model, pools, args.ttft, args.tpot, args.attainment, wl, args.workload,
                     rate=args.rate, latency=args.latency_model, pairing=args.pairing, block_size=args.block_size,
                     max_batch_tokens=args.max_batch_tokens or (4096 if cpu else 8192),
                     max_batch_size=args.max_batch_size or (64 if cpu else 256), baselines=args.baselines,
                     kinds=kinds, objective=args.objective, final_workload=full)
    t0 = time.perf_counter()
    say = (lambda m: None) if args.quiet else (lambda m: print(f"[{time.perf_counter() - t0:5.1f}s] {m}", file=sys.stderr))
    try:
        plan = place(spec, progress=say)
    except RateNotMet as e:
        print(f"disagg place: {e}", file=sys.stderr)
        if not args.write_closest:
            return 1
        plan = e.plan
        plan.save(args.out)
        print(f"WARNING: {args.out} does NOT carry --rate {args.rate:g}: it is the closest plan, "
              f"{plan.predicted['goodput_rps']:.3g} req/s", file=sys.stderr)
        print(table(plan.verdict))
        return 1
    plan.save(args.out)
    pr, v = plan.predicted, plan.verdict
    print(table(v))
    idle = sum(p.num_devices for p in pools) - pr["num_devices"]
    note = f"; {idle} GPU(s) left idle (more goodput per GPU used)" if idle > 0 else ""
    print(f"{args.out}: {v['kind']}: {pr['config']}; goodput {pr['goodput_rps']:.4g} req/s "
          f"({pr['goodput_per_device']:.4g} per GPU) on {pr['scored_on_requests']} requests of {args.workload}"
          f"{note}; searched in {pr['search_time_s']:.1f}s")
    return 0


def cmd_simulate(args) -> int:
    from engine.model_config import load_model_config
    from engine.plan import Plan
    from placement.report import build_report, write_report
    from placement.report_plots import require_matplotlib
    from placement.workload import make_workload
    require_matplotlib()            # before minutes of simulation, not after
    plan = Plan.load(args.plan)
    name = args.workload or plan.workload
    if not name:
        raise ConfigError("the plan names no workload; pass --workload")
    model = load_model_config(plan.model)
    wl = make_workload(name, num_requests=args.num_requests, arrival=args.arrival, cv=args.cv, seed=args.seed,
                       max_model_len=model.max_position_embeddings)
    report = build_report(plan, wl, args.latency_model, args.rates, Progress(args.quiet))
    path = write_report(report, args.out)
    for sys_name, s in report["systems"].items():
        print(f"{sys_name:>24}: {s['goodput_rps']:8.3g} req/s, {s['goodput_per_device']:7.3g} per GPU  ({s['config']})")
    print(f"report: {path}")
    return 0


def register(subparsers) -> None:
    """Add `place` and `simulate` to a `disagg` parser's subparsers."""
    p = subparsers.add_parser("place", help="search TP/PP and replica counts per phase for SLO goodput; write a plan")
    add_place_args(p)
    p.set_defaults(func=_guarded(cmd_place, "place"))
    s = subparsers.add_parser("simulate", help="simulate a plan and both colocated baselines; write an HTML report")
    add_simulate_args(s)
    s.set_defaults(func=_guarded(cmd_simulate, "simulate"))
    for parser in (p, s):
        parser.error = types.MethodType(_one_line_error, parser)


def _guarded(fn, name):
    def run(args) -> int:
        try:
            return fn(args)
        except (DisaggError, ValueError, OSError) as e:
            print(f"disagg {name}: error: {e}", file=sys.stderr)
            return 2
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="disagg", description="Placement and simulation.")
    parser.error = types.MethodType(_one_line_error, parser)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `disagg` command line.

Every error a user can cause ends as one line on stderr naming the problem, exit code 2;
never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from engine.errors import DisaggError


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", type=_ids, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-ids", type=_ids, default=[])
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def sampling_from_args(args):
    from engine.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=tuple(args.stop),
                          stop_token_ids=tuple(args.stop_token_ids), ignore_eos=args.ignore_eos, min_p=args.min_p,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          repetition_penalty=args.repetition_penalty)


def cmd_generate(args) -> int:
    sp = sampling_from_args(args)
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    if args.server:
        from cluster.grpc_client import generate_remote
        return generate_remote(args.server, prompt, sp, as_json=args.json, token=args.token,
                               tls_ca=args.tls_ca, timeout_s=args.timeout)
    from model.llm import LLM
    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    rid = llm.add_request(prompt, sp)
    while llm.has_unfinished:
        for d in llm.step():
            if not args.json and d.text:
                print(d.text, end="", flush=True)
    out = llm.take_result(rid)
    if args.json:
        print(json.dumps({"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason,
                          "prompt_token_ids": out.prompt_token_ids,
                          "usage": {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.token_ids),
                                    "cached_tokens": out.num_cached_tokens}}))
    else:
        print(f"\n[finish_reason={out.finish_reason} tokens={len(out.token_ids)}]", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from cluster.demo import run
    return run(args)


def cmd_serve(args) -> int:
    from cluster.serve import run
    return run(args)


def cmd_submit(args) -> int:
    from cluster.submit import split_argv, submit
    argv = sys.argv[sys.argv.index("submit") + 1:] if "submit" in sys.argv else []
    return submit(args, split_argv(argv))


def cmd_bench(args) -> int:
    from cluster.bench import run
    return run(args)


def cmd_roles(args) -> int:
    from cluster.roles_cli import run
    return run(args)


def cmd_profile(args) -> int:
    from cluster.profile import run
    return run(args)


LOG_LEVELS = ("debug", "info", "warning", "error")


def version_text() -> str:
    """`disagg --version`: the installed distribution's version and where it is imported from
    (a wheel, an editable checkout), as `pip --version` does."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        v = version("disagg-serve")
    except PackageNotFoundError:
        v = "0+unknown (not installed: run from a source tree)"
    where = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return f"disagg-serve {v} from {where} (python {sys.version_info.major}.{sys.version_info.minor})"


def add_common_args(p: argparse.ArgumentParser, top: bool) -> None:
    """--version and --log-level, accepted before and after the command name. A subcommand's
    default is SUPPRESS so it never overwrites a level given before the command."""
    p.add_argument("--version", action="version", version=version_text())
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=None if top else argparse.SUPPRESS,
                   help="log level of this process (default: $DISAGG_LOG_LEVEL, else each command's own)")


def setup_logging(level: str | None) -> None:
    """Configure the root logger once, before any command's own basicConfig (which then does
    nothing). DISAGG_LOG_LEVEL carries the level to child processes (`disagg` subprocesses)."""
    if level is None:
        return
    os.environ["DISAGG_LOG_LEVEL"] = level
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagg", description="Disaggregated prefill/decode LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text in-process, or through a server with --server")
    g.add_argument("--model", default="embedded", help="model folder, preset name, or 'embedded' (default)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--server", default=None, help="HOST:PORT of a `disagg serve` gRPC endpoint")
    g.add_argument("--token", default=os.environ.get("DISAGG_TOKEN"), help="bearer token for --server")
    g.add_argument("--tls-ca", default=None, help="CA certificate for a TLS server")
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds for --server")
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    from cluster.demo import add_demo_args
    d = sub.add_parser("demo", help="start a local cluster, stream one generation through gRPC, shut down")
    add_demo_args(d)
    d.set_defaults(func=cmd_demo)

    from cluster.serve import add_serve_args
    s = sub.add_parser("serve", help="deploy a plan on Ray and serve it over gRPC (default: local CPU cluster)")
    add_serve_args(s)
    s.set_defaults(func=cmd_serve)

    j = sub.add_parser("submit", help="run `disagg serve` as a Ray job (all serve flags pass through)")
    j.add_argument("--address", required=True, help="Ray dashboard URL, e.g. http://127.0.0.1:8265")
    j.add_argument("--job-id", default=None)
    j.add_argument("--working-dir", default=None, help="upload this folder as the job's working_dir")
    j.add_argument("--pip", action="append", default=None, help="pip requirement for the job's runtime_env")
    j.add_argument("--no-wait", action="store_true", help="return once submitted, without waiting for ready")
    add_serve_args(j)
    j.set_defaults(func=cmd_submit)

    from cluster.roles_cli import add_roles_args
    r = sub.add_parser("roles", help="list a serving cluster's instances and roles; --set INSTANCE=ROLE changes one")
    add_roles_args(r)
    r.set_defaults(func=cmd_roles)

    # Serving benchmark and engine profile (issue 6).
    from cluster.bench import add_bench_args
    b = sub.add_parser("bench", help="load-test a `disagg serve` endpoint: latency percentiles, SLO attainment, goodput")
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)
    from cluster.profile import add_profile_args
    pr = sub.add_parser("profile", help="time prefill and decode steps of our engine here; fit a latency profile")
    add_profile_args(pr)
    pr.set_defaults(func=cmd_profile)

    # Placement optimizer and simulator reports (issue 5): torch- and Ray-free.
    from placement.commands import register as register_placement
    register_placement(sub)
    from placement.replan_commands import register as register_replan
    register_replan(sub)
    add_common_args(parser, top=True)
    for p in sub.choices.values():
        add_common_args(p, top=False)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env_level = os.environ.get("DISAGG_LOG_LEVEL", "").lower() or None
    if args.log_level is None and env_level not in (None, *LOG_LEVELS):
        parser.error(f"DISAGG_LOG_LEVEL={env_level!r} is not one of {', '.join(LOG_LEVELS)}")
    setup_logging(args.log_level or env_level)
    try:
        return args.func(args) or 0
    except DisaggError as e:
        print(f"disagg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`disagg serve`: start (or join) Ray, deploy a plan of any kind (colocated, disaggregated or
mixed), and serve it over gRPC with Prometheus metrics, until SIGINT/SIGTERM."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

from engine.errors import ConfigError
from engine.plan import Plan

log = logging.getLogger("disagg.serve")


def plan_from_args(args) -> Plan:
    """The plan file (or the default 1 prefill + 1 decode on CPU), with CLI overrides."""
    plan = Plan.load(args.plan) if args.plan else Plan()
    d = plan.to_dict()
    if args.model:
        d["model"] = args.model
    if d.get("model"):
        # A Hugging Face repo id in the local cache becomes its snapshot folder here, so every
        # worker loads the same files without looking at the cache itself.
        from model.hub import looks_like_repo_id, resolve_cached_repo
        from engine.model_config import PRESETS
        if d["model"] not in PRESETS and looks_like_repo_id(d["model"]):
            d["model"] = resolve_cached_repo(d["model"])
    if getattr(args, "device", None):
        for phase in ("prefill", "decode", "colocated"):
            d[phase]["device"] = args.device
    if getattr(args, "kv_transfer_timeout", None):
        d["kv_transfer_timeout_s"] = args.kv_transfer_timeout
    if getattr(args, "routing", None):
        d["routing"] = args.routing
    return Plan.from_dict(d)


def auth_token_from_args(args) -> str | None:
    """The bearer token: --auth-token-file, else DISAGG_AUTH_TOKEN, else --auth-token (which
    `ps` shows to every user of the machine, hence the warning)."""
    if getattr(args, "auth_token_file", None):
        try:
            with open(args.auth_token_file) as f:
                token = f.read().strip()
        except OSError as e:
            raise ConfigError(f"--auth-token-file: cannot read {args.auth_token_file}: {e.strerror}") from None
        if not token:
            raise ConfigError(f"--auth-token-file: {args.auth_token_file} is empty")
        return token
    if os.environ.get("DISAGG_AUTH_TOKEN"):
        return os.environ["DISAGG_AUTH_TOKEN"]
    if getattr(args, "auth_token", None):
        log.warning("--auth-token is visible to every user of this machine (ps, /proc); "
                    "prefer DISAGG_AUTH_TOKEN or --auth-token-file")
        return args.auth_token
    return None


async def serve(args) -> int:
    # The gRPC server is up before Ray starts its daemons (fork + exec): gRPC's fork handlers
    # are of no use there and log a line per fork.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    # Ray and gRPC load here, not at import: `disagg --help` and the parser stay light.
    from cluster.api import Cluster, init_ray
    from cluster.front_guard import max_request_bytes
    from cluster.grpc_server import check_port_free, open_front
    from cluster.metrics import Metrics
    from cluster.ray_watch import watch_ray_safely
    plan = plan_from_args(args)
    replan_cfg = replan_config_from_args(args)     # a bad --replan-* value fails before anything starts
    token = auth_token_from_args(args)
    metrics = Metrics()
    cluster = Cluster(plan, metrics, args.max_prompt_tokens, args.max_tokens_limit, args.max_pending)
    limit = args.max_request_bytes or max_request_bytes(args.max_prompt_tokens, cluster.model_config.max_position_embeddings)
    # The port first: a port in use fails at once, before a Ray cluster is started for nothing.
    front = await open_front(cluster, args.host, args.port, token, args.tls_cert, args.tls_key, limit)
    try:
        check_port_free(args.metrics_host or args.host, max(args.metrics_port or 0, 0))
    except ConfigError:
        await front.server.stop(0)
        raise
    http = api = sock = None
    try:
        if args.http_port is not None and args.http_port >= 0:
            from cluster.openai_api.server import bind_http
            sock = bind_http(args.host, args.http_port)
        init_ray(args.ray_address)
        await cluster.astart()
        from cluster.replanner import start as start_replanner
        start_replanner(cluster, metrics, args.replan, replan_cfg, args.replan_latency_model)
        front.health.watch(cluster)
        if sock is not None:
            from cluster.openai_api.server import start_http
            from model.chat_template import read_template_file
            template = read_template_file(args.chat_template) if args.chat_template else None
            api = await start_http(cluster, sock, served_model_name(args, plan), token, limit, template)
        if args.metrics_port is not None and args.metrics_port >= 0:
            try:
                http, _ = metrics.serve(args.metrics_port, args.metrics_host or args.host)
            except OSError as e:
                raise ConfigError(f"cannot serve metrics on port {args.metrics_port}: {e}") from None
    except BaseException:
        if api is not None:
            await api.stop()
        elif sock is not None:
            sock.close()
        await front.server.stop(0)
        await cluster.ashutdown()       # nothing left running behind a failed start
        raise
    mport = http.server_port if http else None
    hport = api.port if api else None
    ready = {"host": args.host, "port": front.port, "metrics_port": mport, "http_port": hport, "pid": os.getpid()}
    print(f"disagg serve: ready on {args.host}:{front.port}"
          + (f", OpenAI API on http://{args.host}:{hport}/v1" if hport else "")
          + (f", metrics on http://{args.metrics_host or args.host}:{mport}/metrics" if mport else ""), flush=True)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(ready, f)
        os.replace(tmp, args.ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def poll_stats():
        while True:
            try:
                metrics.update_from_stats(await cluster.astats())
            except Exception as e:  # noqa: BLE001 - metrics must never take the server down
                log.warning("stats poll failed: %s", e)
            await asyncio.sleep(1.0)
    poller = loop.create_task(poll_stats())
    lost = loop.create_task(watch_ray_safely())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait([lost, stopped], return_when=asyncio.FIRST_COMPLETED)
    poller.cancel()
    if lost.done():
        return await _on_ray_lost(cluster, front, lost.result())
    lost.cancel()
    print("disagg serve: shutting down", file=sys.stderr, flush=True)
    if api is not None:
        await api.stop()
    await front.drain_and_stop(grace_s=5)
    await cluster.ashutdown()
    if http:
        http.shutdown()
    return 0


async def _on_ray_lost(cluster, front, why: str) -> int:
    """The Ray cluster under us is gone: end every stream with UNAVAILABLE, stop, exit 1.
    Nothing Ray-side can be shut down any more, and Ray's exit hooks would wait on a dead
    GCS, so the process ends here."""
    cluster.lost = why
    cluster.fail_all(f"the Ray cluster was lost ({why})")
    await front.health.drain()
    await front.server.stop(grace=2)
    from cluster.ray_watch import kill_local_ray
    try:
        await asyncio.wait_for(asyncio.to_thread(kill_local_ray), 10)
    except Exception:  # noqa: BLE001 - exiting anyway
        pass
    print(f"disagg serve: error: the Ray cluster was lost ({why}); exiting", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def replan_config_from_args(args):
    """The re-planner's knobs: ReplanConfig's defaults, overridden by the --replan-* flags given."""
    from placement.replan import ReplanConfig
    given = {"interval_s": args.replan_interval_s, "window_s": args.replan_window_s, "margin": args.replan_margin,
             "confirmations": args.replan_confirmations, "min_dwell_s": args.replan_dwell_s,
             "min_window_requests": args.replan_min_requests}
    return ReplanConfig(**{k: v for k, v in given.items() if v is not None})


def served_model_name(args, plan: Plan) -> str:
    return args.served_model_name or args.model or plan.model or "embedded"


def add_serve_args(p) -> None:
    p.add_argument("--plan", default=None, help="plan file (JSON or YAML) from `disagg place`")
    p.add_argument("--model", default=None, help="override the plan's model (folder, preset, HF repo id in the local cache, or 'embedded')")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="override every phase's device")
    p.add_argument("--host", default="127.0.0.1", help="gRPC and HTTP bind address (default loopback)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any free port)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP API port (0 = any free port, -1 = off); binds --host")
    p.add_argument("--served-model-name", default=None,
                   help="the model name the HTTP API reports and accepts (default: --model or the plan's)")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja2 chat template file (default: the model's own, from its tokenizer files)")
    p.add_argument("--metrics-port", type=int, default=9400, help="Prometheus port (-1 = off, 0 = any free port)")
    p.add_argument("--metrics-host", default=None, help="metrics bind address (default: --host)")
    p.add_argument("--auth-token-file", default=None,
                   help="require 'authorization: Bearer TOKEN', TOKEN read from this file (or set DISAGG_AUTH_TOKEN)")
    p.add_argument("--auth-token", default=None,
                   help="the token itself (visible in `ps`: prefer DISAGG_AUTH_TOKEN or --auth-token-file)")
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--max-prompt-tokens", type=int, default=0, help="refuse longer prompts (0 = model context)")
    p.add_argument("--max-tokens-limit", type=int, default=0, help="refuse larger max_tokens (0 = model context)")
    p.add_argument("--max-request-bytes", type=int, default=0,
                   help="gRPC receive limit per request (0 = 1 MiB + 16 bytes per --max-prompt-tokens or context token)")
    p.add_argument("--max-pending", type=int, default=1024, help="requests waiting for capacity before RESOURCE_EXHAUSTED")
    p.add_argument("--kv-transfer-timeout", type=float, default=None)
    p.add_argument("--routing", default=None, choices=["prefix", "load"],
                   help="prefill instance choice: expected prefix-cache hit against queued tokens "
                        "(prefix, the plan's default) or queued tokens only (load)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS or a local one)")
    p.add_argument("--replan", default="auto", choices=["auto", "off"],
                   help="online re-planning: flip instances between roles when another split of the same instances "
                        "serves the recent load better (auto: on when the plan allows it; see README)")
    p.add_argument("--replan-interval-s", type=float, default=None, help="seconds between decisions (default 5)")
    p.add_argument("--replan-window-s", type=float, default=None, help="recent arrivals judged (default 60)")
    p.add_argument("--replan-margin", type=float, default=None,
                   help="attainment a split must win by, 0-1 (default 0.05)")
    p.add_argument("--replan-confirmations", type=int, default=None,
                   help="decisions in a row naming the same flip before it happens (default 2)")
    p.add_argument("--replan-dwell-s", type=float, default=None, help="seconds between two flips at least (default 60)")
    p.add_argument("--replan-min-requests", type=int, default=None,
                   help="fewer arrivals in the window: no decision (default 16)")
    p.add_argument("--replan-latency-model", default="auto",
                   help="auto (the committed profile of the plan's device and model, else roofline), roofline or a profile JSON")
    p.add_argument("--ready-file", default=None, help="write {host, port, metrics_port, http_port} here once serving")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = os.environ.get("DISAGG_SERVE_PROFILE")
    if not out:
        return asyncio.run(serve(args))
    # Where the controller's event loop spends its time (benchmarks/served.py --profile): a
    # cProfile of this process's main thread, written when serve exits.
    import cProfile
    prof = cProfile.Profile()
    try:
        return prof.runcall(asyncio.run, serve(args))
    finally:
        prof.dump_stats(out)

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
    return Plan.from_dict(d)


async def serve(args) -> int:
    # Ray and gRPC load here, not at import: `disagg --help` and the parser stay light.
    from cluster.api import Cluster, init_ray
    from cluster.grpc_server import start_server
    from cluster.metrics import Metrics
    plan = plan_from_args(args)
    init_ray(args.ray_address)
    metrics = Metrics()
    cluster = Cluster(plan, metrics, args.max_prompt_tokens, args.max_tokens_limit, args.max_pending)
    await cluster.astart()
    server = http = api = None
    try:
        server, port = await start_server(cluster, args.host, args.port, args.auth_token, args.tls_cert, args.tls_key)
        if args.http_port is not None and args.http_port >= 0:
            from cluster.openai_api.server import start_http
            from model.chat_template import read_template_file
            template = read_template_file(args.chat_template) if args.chat_template else None
            api = await start_http(cluster, args.host, args.http_port, served_model_name(args, plan),
                                   args.auth_token, chat_template=template)
        if args.metrics_port is not None and args.metrics_port >= 0:
            try:
                http, _ = metrics.serve(args.metrics_port, args.metrics_host or args.host)
            except OSError as e:
                raise ConfigError(f"cannot serve metrics on port {args.metrics_port}: {e}") from None
    except BaseException:
        if api is not None:
            await api.stop()
        if server is not None:
            await server.stop(0)
        await cluster.ashutdown()       # nothing left running behind a failed start
        raise
    mport = http.server_port if http else None
    hport = api.port if api else None
    ready = {"host": args.host, "port": port, "metrics_port": mport, "http_port": hport, "pid": os.getpid()}
    print(f"disagg serve: ready on {args.host}:{port}"
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
    await stop.wait()
    print("disagg serve: shutting down", file=sys.stderr, flush=True)
    poller.cancel()
    if api is not None:
        await api.stop()
    await server.stop(grace=5)
    await cluster.ashutdown()
    if http:
        http.shutdown()
    return 0


def served_model_name(args, plan: Plan) -> str:
    return args.served_model_name or args.model or plan.model or "embedded"


def add_serve_args(p) -> None:
    p.add_argument("--plan", default=None, help="plan file (JSON or YAML) from `disagg place`")
    p.add_argument("--model", default=None, help="override the plan's model (folder, preset or 'embedded')")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="override every phase's device")
    p.add_argument("--host", default="127.0.0.1", help="gRPC bind address (default loopback)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any free port)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP API port (0 = any free port, -1 = off); binds --host")
    p.add_argument("--served-model-name", default=None,
                   help="the model name the HTTP API reports and accepts (default: --model or the plan's)")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja2 chat template file (default: the model's own, from its tokenizer files)")
    p.add_argument("--metrics-port", type=int, default=9400, help="Prometheus port (-1 = off, 0 = any free port)")
    p.add_argument("--metrics-host", default=None, help="metrics bind address (default: --host)")
    p.add_argument("--auth-token", default=os.environ.get("DISAGG_AUTH_TOKEN"),
                   help="require 'authorization: Bearer TOKEN' (env DISAGG_AUTH_TOKEN)")
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--max-prompt-tokens", type=int, default=0, help="refuse longer prompts (0 = model context)")
    p.add_argument("--max-tokens-limit", type=int, default=0, help="refuse larger max_tokens (0 = model context)")
    p.add_argument("--max-pending", type=int, default=1024, help="requests waiting for capacity before RESOURCE_EXHAUSTED")
    p.add_argument("--kv-transfer-timeout", type=float, default=None)
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS or a local one)")
    p.add_argument("--ready-file", default=None, help="write {host, port, metrics_port} here once serving")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(args))

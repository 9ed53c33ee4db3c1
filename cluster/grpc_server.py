"""The gRPC frontend (grpc.aio): Inference.Generate / ModelInfo, Admin (cluster/admin.py),
grpc.health.v1 and reflection.

Requests are parsed from raw bytes here (not by grpc's deserializer), so malformed protobuf
gets INVALID_ARGUMENT instead of an internal error. Status codes: INVALID_ARGUMENT names the
field; RESOURCE_EXHAUSTED when the cluster is full; UNAUTHENTICATED without the bearer token;
a client that cancels, disconnects or runs past its deadline cancels its request and frees its
KV blocks on both pools; UNAVAILABLE while starting and once the Ray cluster is lost.
The token is checked on metadata before a body is read, a message over the receive limit is
refused with RESOURCE_EXHAUSTED, and health follows the controller (cluster/front_guard.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid
from contextlib import aclosing
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.admin import SERVICE as ADMIN_SERVICE
from cluster.admin import admin_handler
from cluster.fanout import stream_n, submit_n
from cluster.front_guard import AuthInterceptor, HealthReporter, check_stop_strings
from cluster.front_guard import max_request_bytes as request_limit
from engine.errors import ConfigError, InvalidRequestError, OverloadedError, RequestFailedError
from engine.sampling_params import SamplingParams
from protos import inference_pb2 as pb

log = logging.getLogger("disagg.grpc")
SERVICE = "disagg.v1.Inference"
MAX_REQUEST_ID = 256
OFFLOAD_BYTES = 64 << 10       # requests larger than this are parsed and validated off the loop


def sampling_from_proto(s: pb.SamplingOptions) -> SamplingParams:
    return SamplingParams(
        max_tokens=s.max_tokens or 16, temperature=s.temperature, top_k=s.top_k,
        top_p=s.top_p if s.HasField("top_p") else 1.0, seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos,
        min_p=s.min_p if s.HasField("min_p") else 0.0, presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        logprobs=s.logprobs if s.HasField("logprobs") else None, n=s.n or 1)


def _logprobs(entries) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=e["token_id"], logprob=e["logprob"],
                            top=[pb.TopLogprob(token_id=i, logprob=x) for i, x in e["top"]])
            for e in entries or ()]


def parse_request(raw: bytes) -> tuple[str, str | list[int], SamplingParams]:
    """Bytes of a GenerateRequest -> (request id, prompt, sampling), or InvalidRequestError
    naming the field. Pure CPU work, safe to run in a thread."""
    req = pb.GenerateRequest()
    try:
        req.ParseFromString(raw)
    except DecodeError as e:
        raise InvalidRequestError("request", f"not a valid GenerateRequest ({e})") from None
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequestError("prompt", "set either text or token_ids")
    if len(req.request_id) > MAX_REQUEST_ID:
        raise InvalidRequestError("request_id", f"longer than {MAX_REQUEST_ID} characters")
    check_stop_strings(req.sampling.stop)
    prompt = req.text if kind == "text" else list(req.token_ids.ids)
    return req.request_id or f"grpc-{uuid.uuid4().hex[:16]}", prompt, sampling_from_proto(req.sampling)


def _timings(d: dict | None) -> pb.Timings:
    d = d or {}
    return pb.Timings(**{k: float(d[k]) for k in pb.Timings.DESCRIPTOR.fields_by_name if k in d})


class InferenceService:
    def __init__(self, cluster, health: HealthReporter | None = None):
        self.cluster = cluster
        self.health = health        # held here so that it lives as long as the server

    async def _parse(self, raw: bytes, context):
        """(request id, prompt, sampling) of a valid request, or abort. A large request is
        parsed and validated off the event loop, so other streams keep their pace."""
        try:
            if len(raw) > OFFLOAD_BYTES:
                return await asyncio.get_running_loop().run_in_executor(None, parse_request, raw)
            return parse_request(raw)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def generate(self, raw: bytes, context):
        c = self.cluster
        if c.inputs is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is starting; try again shortly")
        rid, prompt, sampling = await self._parse(raw, context)
        tracked = None
        try:
            tracked = await submit_n(c, prompt, sampling, rid)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except OverloadedError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except RequestFailedError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        async with aclosing(stream_n(c, tracked)) as items:
            async for i, item in items:
                if item.finish_reason is None:
                    yield pb.GenerateResponse(request_id=rid, token_ids=item.token_ids, text=item.text, index=i,
                                              logprobs=_logprobs(item.logprobs))
                    continue
                if item.error:
                    code = grpc.StatusCode.UNAVAILABLE if c.lost else grpc.StatusCode.INTERNAL
                    await context.abort(code, f"request {rid} failed: {item.error}")
                u = item.usage or {}
                yield pb.GenerateResponse(
                    request_id=rid, token_ids=item.token_ids, text=item.text, finish_reason=item.finish_reason,
                    usage=pb.Usage(prompt_tokens=u.get("prompt_tokens", 0), completion_tokens=u.get("completion_tokens", 0),
                                   cached_tokens=u.get("cached_tokens", 0)),
                    timings=_timings(item.timings), index=i)

    async def model_info(self, raw: bytes, context):
        c = self.cluster
        if c.inputs is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is starting; try again shortly")
        mc = c.model_config
        return pb.ModelInfoResponse(
            model=c.plan.model, architecture=mc.arch, vocab_size=mc.vocab_size, max_model_len=c.controller.max_model_len,
            num_layers=mc.num_layers, hidden_size=mc.hidden_size, num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads,
            block_size=c.plan.block_size, eos_token_id=mc.eos_token_id if mc.eos_token_id is not None else -1,
            max_prompt_tokens=c.limits[0], max_tokens_limit=c.limits[1], plan_json=json.dumps(c.plan.to_dict()))


def _handler(svc: InferenceService) -> grpc.GenericRpcHandler:
    methods = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            svc.generate, request_deserializer=None, response_serializer=pb.GenerateResponse.SerializeToString),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            svc.model_info, request_deserializer=None, response_serializer=pb.ModelInfoResponse.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)


@dataclass
class Front:
    """A bound, started gRPC server and its health reporter."""
    server: grpc.aio.Server
    port: int
    health: HealthReporter

    async def drain_and_stop(self, grace_s: float) -> None:
        """NOT_SERVING first (load balancers stop sending), then let streams finish."""
        await self.health.drain()
        await self.server.stop(grace=grace_s)


def _credentials(tls_cert: str | None, tls_key: str | None):
    if not (tls_cert or tls_key):
        return None
    if not (tls_cert and tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    try:
        with open(tls_key, "rb") as k, open(tls_cert, "rb") as c:
            return grpc.ssl_server_credentials([(k.read(), c.read())])
    except OSError as e:
        raise ConfigError(f"cannot read the TLS files: {e}") from None


def check_port_free(host: str, port: int) -> None:
    """ConfigError when host:port is taken, checked with a plain bind (no SO_REUSEPORT) before
    gRPC tries: its own failure is a multi-line C-core log plus an exception."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                raise ConfigError(f"cannot serve gRPC on {host}:{port}: {e.strerror} "
                                  "(another server holds the port? choose another --port)") from None


async def open_front(cluster, host: str = "127.0.0.1", port: int = 0, auth_token: str | None = None,
                     tls_cert: str | None = None, tls_key: str | None = None,
                     max_request_bytes: int = 4 << 20) -> Front:
    """Bind and start the gRPC server on host:port (port 0 = any free port), NOT_SERVING until
    `front.health.watch(cluster)` finds the controller serving. A port in use is a ConfigError
    (SO_REUSEPORT is off, so a second server never shares a port with the first)."""
    creds = _credentials(tls_cert, tls_key)
    check_port_free(host, port)
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(auth_token)] if auth_token else None,
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", max_request_bytes)])
    hs = health.aio.HealthServicer()
    reporter = HealthReporter(hs, (SERVICE,))
    server.add_generic_rpc_handlers((_handler(InferenceService(cluster, reporter)), admin_handler(cluster)))
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection.enable_server_reflection((SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    addr = f"{host}:{port}"
    try:
        bound = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)
    except RuntimeError as e:          # grpcio >= 1.85 raises where older versions return 0
        raise ConfigError(f"cannot bind gRPC to {addr} ({e}); is the port in use?") from None
    if bound == 0:
        raise ConfigError(f"cannot bind gRPC to {addr}; is the port in use?")
    await reporter.set_state("starting")
    await server.start()
    return Front(server, bound, reporter)


async def start_server(cluster, host: str = "127.0.0.1", port: int = 0, auth_token: str | None = None,
                       tls_cert: str | None = None, tls_key: str | None = None,
                       max_request_bytes: int = 0) -> tuple[grpc.aio.Server, int]:
    """Serve a started `cluster` on host:port. Returns (server, bound port). The receive limit
    defaults to what the cluster's largest accepted prompt needs (`front_guard.max_request_bytes`)."""
    limit = max_request_bytes or request_limit(cluster.limits[0], cluster.model_config.max_position_embeddings)
    front = await open_front(cluster, host, port, auth_token, tls_cert, tls_key, limit)
    front.health.watch(cluster)
    await front.health.poll(cluster)
    return front.server, front.port

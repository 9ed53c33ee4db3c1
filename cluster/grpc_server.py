"""The gRPC frontend (grpc.aio): Inference.Generate / ModelInfo, grpc.health.v1 and reflection.

Requests are parsed from raw bytes here (not by grpc's deserializer), so malformed protobuf
gets INVALID_ARGUMENT instead of an internal error. Status codes: INVALID_ARGUMENT names the
field; RESOURCE_EXHAUSTED when the cluster is full; UNAUTHENTICATED without the bearer token;
a client that cancels, disconnects or runs past its deadline cancels its request and frees its
KV blocks on both pools.
"""
from __future__ import annotations

from contextlib import aclosing
import json
import logging
import uuid

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.errors import ConfigError, InvalidRequestError, OverloadedError, RequestFailedError
from cluster.fanout import stream_n, submit_n
from engine.sampling_params import SamplingParams
from protos import inference_pb2 as pb

log = logging.getLogger("disagg.grpc")
SERVICE = "disagg.v1.Inference"
MAX_REQUEST_ID = 256


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


def _timings(d: dict | None) -> pb.Timings:
    d = d or {}
    return pb.Timings(**{k: float(d[k]) for k in pb.Timings.DESCRIPTOR.fields_by_name if k in d})


class InferenceService:
    def __init__(self, cluster, auth_token: str | None = None):
        self.cluster = cluster
        self.auth_token = auth_token

    async def _check_auth(self, context) -> None:
        if not self.auth_token:
            return
        md = dict(context.invocation_metadata() or ())
        if md.get("authorization") != f"Bearer {self.auth_token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization')")

    async def generate(self, raw: bytes, context):
        await self._check_auth(context)
        req = pb.GenerateRequest()
        try:
            req.ParseFromString(raw)
        except DecodeError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid GenerateRequest ({e})")
        kind = req.WhichOneof("prompt")
        if kind is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: set either text or token_ids")
        if len(req.request_id) > MAX_REQUEST_ID:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id: longer than {MAX_REQUEST_ID} characters")
        prompt = req.text if kind == "text" else list(req.token_ids.ids)
        rid = req.request_id or f"grpc-{uuid.uuid4().hex[:16]}"
        tracked = None
        try:
            tracked = await submit_n(self.cluster, prompt, sampling_from_proto(req.sampling), rid)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except OverloadedError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except RequestFailedError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        async with aclosing(stream_n(self.cluster, tracked)) as items:
            async for i, item in items:
                if item.finish_reason is None:
                    yield pb.GenerateResponse(request_id=rid, token_ids=item.token_ids, text=item.text, index=i,
                                              logprobs=_logprobs(item.logprobs))
                    continue
                if item.error:
                    await context.abort(grpc.StatusCode.INTERNAL, f"request {rid} failed: {item.error}")
                u = item.usage or {}
                yield pb.GenerateResponse(
                    request_id=rid, token_ids=item.token_ids, text=item.text, finish_reason=item.finish_reason,
                    usage=pb.Usage(prompt_tokens=u.get("prompt_tokens", 0), completion_tokens=u.get("completion_tokens", 0),
                                   cached_tokens=u.get("cached_tokens", 0)),
                    timings=_timings(item.timings), index=i)

    async def model_info(self, raw: bytes, context):
        await self._check_auth(context)
        c = self.cluster
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


async def start_server(cluster, host: str = "127.0.0.1", port: int = 0, auth_token: str | None = None,
                       tls_cert: str | None = None, tls_key: str | None = None) -> tuple[grpc.aio.Server, int]:
    """Serve `cluster` on host:port (port 0 = any free port). Returns (server, bound port)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 2**20)])
    server.add_generic_rpc_handlers((_handler(InferenceService(cluster, auth_token)),))
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    addr = f"{host}:{port}"
    try:
        if tls_cert or tls_key:
            if not (tls_cert and tls_key):
                raise ConfigError("TLS needs both --tls-cert and --tls-key")
            with open(tls_key, "rb") as k, open(tls_cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            bound = server.add_secure_port(addr, creds)
        else:
            bound = server.add_insecure_port(addr)
    except OSError as e:
        raise ConfigError(f"cannot read the TLS files: {e}") from None
    except RuntimeError as e:          # grpcio >= 1.85 raises where older versions return 0
        raise ConfigError(f"cannot bind gRPC to {addr} ({e}); is the port in use?") from None
    if bound == 0:
        raise ConfigError(f"cannot bind gRPC to {addr}; is the port in use?")
    await server.start()
    for name in ("", SERVICE):
        await hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound

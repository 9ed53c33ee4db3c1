"""What stands in front of the gRPC handlers: the bearer-token check (on metadata, before any
request body is read), the request-size limits, and grpc.health.v1 driven by the controller.

The HTTP front (OpenAI API) applies the same limits (`check_stop_strings`, `max_request_bytes`)
and reads the same health source (`Controller.health()`).
"""
from __future__ import annotations

import asyncio
import hmac
import logging

import grpc
from grpc_health.v1 import health_pb2

from engine.errors import InvalidRequestError

log = logging.getLogger("disagg.grpc")

# Bytes a request may carry beyond its prompt: sampling options, stop strings, request id.
REQUEST_OVERHEAD_BYTES = 1 << 20
# A token id is a varint of at most 5 bytes (10 for a negative int32, which is refused); text
# runs about 4 bytes per token, rarely over 16 (long words, multi-byte scripts).
BYTES_PER_PROMPT_TOKEN = 16
# Stop strings are matched against every new piece of text on the controller's event loop, so
# their number and length are bounded (TGI allows 4 by default, the OpenAI API 4).
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
# Health methods stay open without a token: load balancers and Kubernetes probes call them.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def max_request_bytes(max_prompt_tokens: int, context_tokens: int) -> int:
    """The receive limit of one request message: what the largest accepted prompt can take
    (`--max-prompt-tokens`, else the model's context) plus a fixed allowance."""
    return REQUEST_OVERHEAD_BYTES + BYTES_PER_PROMPT_TOKEN * (max_prompt_tokens or context_tokens)


def check_stop_strings(stop) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError("stop", f"has {len(stop)} strings; at most {MAX_STOP_STRINGS} are accepted")
    for s in stop:
        if len(s) > MAX_STOP_CHARS:
            raise InvalidRequestError("stop", f"a stop string has {len(s)} characters; at most {MAX_STOP_CHARS}")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call without `authorization: Bearer TOKEN` before its handler runs: the
    refusal handler is a streaming one that never reads the request, so an unauthenticated
    body is never buffered (HTTP/2 flow control holds the sender back)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()
        self._deny = grpc.stream_stream_rpc_method_handler(self._refuse)

    @staticmethod
    async def _refuse(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization')")

    def allowed(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(got, self._expected)
        return False

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHOD_PREFIXES) or self.allowed(details.invocation_metadata):
            return await continuation(details)
        return self._deny


class HealthReporter:
    """Sets grpc.health.v1 (overall "" and each service) from `Controller.health()`: SERVING
    only while the controller says "serving"; NOT_SERVING while starting, while a role the
    plan needs has no live instance, while draining, and once the cluster is gone."""

    def __init__(self, servicer, services: tuple[str, ...], interval_s: float = 0.5):
        self.servicer, self.services, self.interval_s = servicer, ("", *services), interval_s
        self.state = "starting"
        self.roles: dict = {}
        self._task: asyncio.Task | None = None

    async def set_state(self, state: str) -> None:
        if state != self.state:
            log.info("health: %s -> %s %s", self.state, state, self.roles)
        self.state = state
        status = health_pb2.HealthCheckResponse.SERVING if state == "serving" else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.services:
            await self.servicer.set(name, status)

    async def poll(self, cluster) -> None:
        try:
            h = await asyncio.wait_for(cluster.ahealth(), 10)
        except Exception as e:  # noqa: BLE001 - a controller that cannot answer is not serving
            log.warning("health check failed: %s", e)
            h = {"state": "not_serving", "roles": {}}
        self.roles = h.get("roles", {})
        if self.state != "draining":
            await self.set_state(h["state"])

    def watch(self, cluster) -> None:
        """Poll the controller in the background until `drain` or `close`."""
        async def loop():
            while True:
                await self.poll(cluster)
                await asyncio.sleep(self.interval_s)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(loop())

    async def drain(self) -> None:
        await self.set_state("draining")
        self.close()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

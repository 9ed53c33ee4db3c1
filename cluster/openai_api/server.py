"""FastAPI app and uvicorn server of the OpenAI-compatible front.

Auth (constant-time bearer check) and the body-size limit run as ASGI middleware before any
body is read. A request is admitted whole or refused (400 names the field, 429 overload, 503
not serving); a client that disconnects, mid-stream or while waiting, cancels its requests,
which frees their KV blocks on every instance."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import uuid
from contextlib import aclosing

from starlette.requests import Request

from cluster.fanout import cancel_open, stream_n, submit_n
from cluster.openai_api import protocol as proto
from cluster.openai_api.protocol import HTTPError
from cluster.openai_api.responses import Collector, sse_chat, sse_completion
from engine.errors import ConfigError, InvalidRequestError, OverloadedError, RequestFailedError

log = logging.getLogger("disagg.http")


def _error_response(status, message, param=None):
    from starlette.responses import JSONResponse
    return JSONResponse(proto.error_body(status, message, param), status_code=status)


DRAIN_BYTES = 16 << 20     # an oversized body up to this much over the limit is read (and dropped) before the 413


class Guard:
    """ASGI middleware: bearer token on /v1/*, and a body-size limit enforced on the
    Content-Length header and on the bytes as they arrive (chunked uploads)."""

    def __init__(self, app, token: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.token = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        if self.token and scope["path"].startswith("/v1/"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.token):
                return await _error_response(401, "missing or wrong bearer token (header 'Authorization: Bearer ...')")(
                    scope, receive, send)
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_body_bytes:
            return await self._too_large(scope, receive, send, declared)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body_bytes:
                    raise HTTPError(413, f"request body over the server's limit of {self.max_body_bytes} bytes")
            return msg
        await self.app(scope, limited, send)

    async def _too_large(self, scope, receive, send, n):
        """413 on the declared length, the body never kept. A body that is not much over the
        limit is read and dropped first: closing a socket with unread bytes sends a TCP reset,
        which can reach a client still writing before the 413 does. A client that asked
        `Expect: 100-continue` has sent nothing yet, and a far larger body is not worth reading."""
        headers = dict(scope.get("headers") or ())
        if headers.get(b"expect", b"").lower() != b"100-continue" and n <= self.max_body_bytes + DRAIN_BYTES:
            more = True
            while more:
                msg = await receive()
                more = msg["type"] == "http.request" and msg.get("more_body", False)
        resp = _error_response(413, f"request body of {n} bytes is over the server's limit of {self.max_body_bytes} bytes")
        await resp(scope, receive, send)


async def until_disconnect(receive, coro):
    """Run coro; if the client disconnects first, cancel it and return None."""
    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
    work, watcher = asyncio.ensure_future(coro), asyncio.ensure_future(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return None
    return work.result()


def make_sse_response(gen):
    from starlette.responses import StreamingResponse

    class SSEResponse(StreamingResponse):
        """Streams until done or until the client disconnects; either way the generator is
        closed here (its cleanup cancels the requests), never left to the garbage collector."""

        async def __call__(self, scope, receive, send):
            try:
                await until_disconnect(receive, self.stream_response(send))
            except OSError:           # the client went away while we wrote
                pass
            finally:
                await self.body_iterator.aclose()
    return SSEResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class OpenAIFront:
    def __init__(self, cluster, served_model_name: str, chat_template: str | None = None):
        self.cluster = cluster
        self.model = served_model_name
        self.chat_template = chat_template or getattr(cluster.tokenizer, "chat_template", None)
        self.defaults = dict(cluster.model_config.generation_defaults)

    async def _body(self, request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPError(400, f"the body is not valid JSON ({e})", "body") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object", "body")
        return body

    def _check_model(self, name) -> None:
        if name is not None and name != self.model:
            raise HTTPError(404, f"the model {name!r} does not exist; this server serves {self.model!r}", "model")

    async def _admit(self, rid: str, prompts: list[list[int]], p: proto.ParsedRequest) -> list:
        """Every (prompt, choice) admitted, or none."""
        c = self.cluster
        tracked = []
        try:
            for k, ids in enumerate(prompts):
                sp = p.sampling if p.max_tokens_set else proto.fit_max_tokens(
                    p.sampling, len(ids), c.controller.max_model_len, c.limits[1])
                tracked += await submit_n(c, ids, sp, rid if len(prompts) == 1 else f"{rid}-p{k}")
        except BaseException:
            await cancel_open(c, tracked)
            raise
        return tracked

    async def completions(self, request: Request):
        body = await self._body(request)
        p = proto.parse_completion(body, self.defaults)
        self._check_model(p.model)
        prompts = await asyncio.to_thread(lambda: [self.cluster.inputs.tokenize(x) for x in p.prompts])
        rid = f"cmpl-{uuid.uuid4().hex}"
        return await self._run(request, rid, prompts, p, "text_completion")

    async def chat(self, request: Request):
        from model.chat_template import render_chat
        body = await self._body(request)
        p, messages, gen = proto.parse_chat(body, self.defaults)
        self._check_model(p.model)
        tok = self.cluster.tokenizer

        def render():
            text = render_chat(self.chat_template, messages, getattr(tok, "special_tokens", {}), gen)
            ids = tok.encode(text, add_special_tokens=False)
            if not ids:
                raise InvalidRequestError("messages", "the chat template rendered an empty prompt")
            return self.cluster.inputs.tokenize(ids)

        async def admit(rid, prompts, p):
            try:
                return await self._admit(rid, prompts, p)
            except InvalidRequestError as e:
                if e.field in ("prompt", "prompt_token_ids"):      # the user wrote messages, not a prompt
                    raise InvalidRequestError("messages", str(e).split(": ", 1)[1]) from None
                raise
        prompts = [await asyncio.to_thread(render)]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return await self._run(request, rid, prompts, p, "chat.completion", admit)

    async def _run(self, request, rid, prompts, p, kind, admit=None):
        from starlette.responses import JSONResponse
        tracked = await (admit or self._admit)(rid, prompts, p)
        n = p.sampling.n
        col = Collector(self.cluster.tokenizer, len(tracked), n, kind)
        if p.stream:
            fmt = sse_chat if kind == "chat.completion" else sse_completion
            return make_sse_response(fmt(self.cluster, tracked, col, rid, self.model, p.include_usage))

        async def collect():
            async with aclosing(stream_n(self.cluster, tracked)) as items:
                async for i, item in items:
                    col.add(i, item)
            return col.response(rid, self.model)
        result = await until_disconnect(request.receive, collect())
        if result is None:
            return JSONResponse({}, status_code=499)
        return JSONResponse(result)

    async def models(self, request: Request):
        import time
        c = self.cluster
        return {"object": "list", "data": [{
            "id": self.model, "object": "model", "created": int(time.time()), "owned_by": "disagg-serve",
            "root": c.plan.model, "max_model_len": c.controller.max_model_len,
            # Beyond OpenAI's fields, for load generators (`disagg bench --backend openai`).
            "vocab_size": c.model_config.vocab_size, "max_prompt_tokens": c.limits[0],
            "max_tokens_limit": c.limits[1]}]}

    async def health(self, request: Request):
        from starlette.responses import JSONResponse
        # Cluster.ahealth also reports a lost Ray cluster, where the front has it.
        source = getattr(self.cluster, "ahealth", None) or self.cluster.controller.health
        h = await source()
        return JSONResponse(h, status_code=200 if h["state"] == "serving" else 503)


def build_app(front: OpenAIFront, auth_token: str | None, max_body_bytes: int):
    from fastapi import FastAPI

    app = FastAPI(title="disagg-serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPError)
    async def _http(request: Request, e: HTTPError):
        return _error_response(e.status, str(e), e.param)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, e: InvalidRequestError):
        return _error_response(400, str(e), e.field)

    @app.exception_handler(OverloadedError)
    async def _overloaded(request: Request, e: OverloadedError):
        return _error_response(429, str(e))

    @app.exception_handler(RequestFailedError)
    async def _unavailable(request: Request, e: RequestFailedError):
        return _error_response(503, str(e))

    app.add_api_route("/v1/completions", front.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", front.chat, methods=["POST"])
    app.add_api_route("/v1/models", front.models, methods=["GET"])
    app.add_api_route("/health", front.health, methods=["GET"])
    return Guard(app, auth_token, max_body_bytes)


class HTTPServer:
    def __init__(self, server, task, port):
        self.server, self.task, self.port = server, task, port

    async def stop(self) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), 10)
        except asyncio.TimeoutError:
            self.task.cancel()


def _uvicorn_server_class():
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        def capture_signals(self):            # serve.py owns SIGINT/SIGTERM
            return contextlib.nullcontext()
    return Server


def _Server(config):
    return _uvicorn_server_class()(config)


def bind_http(host: str, port: int) -> socket.socket:
    """The HTTP front's listening socket, bound before anything else starts (a port in use is a
    one-line error, never shared: no SO_REUSEPORT)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot bind the HTTP front to {host}:{port} ({e.strerror}); is the port in use?") from None
    sock.listen(1024)
    return sock


async def start_http(cluster, sock: socket.socket, served_model_name: str, auth_token: str | None = None,
                     max_body_bytes: int | None = None, chat_template: str | None = None) -> HTTPServer:
    """Serve the OpenAI API on a socket from `bind_http`, in this event loop. The body limit
    defaults to the gRPC front's receive limit (front_guard.max_request_bytes)."""
    import uvicorn

    from cluster.front_guard import max_request_bytes
    limit = max_body_bytes or max_request_bytes(cluster.limits[0], cluster.controller.max_model_len)
    app = build_app(OpenAIFront(cluster, served_model_name, chat_template), auth_token, limit)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=5)
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise ConfigError("the HTTP front stopped while starting")
        await asyncio.sleep(0.01)
    return HTTPServer(server, task, sock.getsockname()[1])

"""Python entry point: start a disaggregated cluster from a plan and send it requests.

    from cluster.api import Cluster
    with Cluster.start(Plan()) as c:                # 1 prefill + 1 decode on CPU, embedded model
        outs = c.generate(["Hello"], SamplingParams(max_tokens=16))

The sync methods run the controller on a background event loop; `astart`/`agenerate` are for
callers that already run asyncio (the gRPC frontend).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

from cluster.controller import Controller
from cluster.tracking import StreamDelta
from engine.model_config import load_model_config
from engine.plan import Plan
from engine.sampling_params import SamplingParams
from model.input_processor import InputProcessor
from model.output_processor import RequestOutput
from model.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

OFFLOAD_PROMPT_ITEMS = 16384        # characters or token ids


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join `address` (or RAY_ADDRESS), or start a local Ray instance closed to the network.

    Joining uses Ray's token authentication as the cluster is set up for it (RAY_AUTH_MODE=token
    and the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token; README "Security"). The local
    instance binds every Ray port to 127.0.0.1 (`closed_to_network`)."""
    import ray
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts workers at nice 15; our workers are the serving hot path, not background jobs.
    os.environ.setdefault("RAY_worker_niceness", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - unreachable, or refused for want of a token
            from engine.errors import ConfigError
            raise ConfigError(f"cannot join the Ray cluster at {address}: {str(e).strip().splitlines()[-1]} "
                              "(a cluster with token authentication needs RAY_AUTH_MODE=token and its token in "
                              "RAY_AUTH_TOKEN or ~/.ray/auth_token)") from None
        return
    # Nothing but this process reaches the local instance, so Ray's token is not needed here.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    closed_to_network()
    kw = {"num_cpus": num_cpus} if num_cpus else {}
    if num_gpus is not None:
        kw["num_gpus"] = num_gpus
    # Ray gives its raylet a fixed 30 s to register with the GCS (and waits a fixed time for the
    # GCS's port file); on an overloaded machine that can pass. A failed start is retried (its
    # half-started processes killed first) before giving up.
    attempts = int(os.environ.get("DISAGG_RAY_START_ATTEMPTS", "3"))
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", include_dashboard=False, log_to_driver=False, **kw)
            return
        except Exception as e:  # noqa: BLE001 - the local raylet or GCS did not come up
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            ray.shutdown()
            killed = _kill_own_ray_processes()
            if attempt < attempts:      # e.g. the raylet or the GCS port file not there in time
                log.warning("the local Ray cluster did not start in time (attempt %d of %d; %d half-started "
                            "processes stopped): trying again", attempt, attempts, killed)
                time.sleep(2.0 * attempt)
                continue
            from engine.errors import ConfigError
            raise ConfigError(f"could not start a local Ray cluster: {last} "
                              f"(after {attempt} attempt{'s' if attempt > 1 else ''}; its logs: "
                              "/tmp/ray/session_latest/logs; on an overloaded machine the start can time "
                              "out: try again)") from None


_RAY_PROCESS_MARKERS = ("gcs_server", "raylet", "ray/_private", "ray/dashboard", "ray/autoscaler", "ray::")


def _kill_own_ray_processes() -> int:
    """SIGKILL the Ray processes that descend from this process (what a failed `ray.init` left
    running), and nothing else: other processes' Ray clusters are untouched. Linux (/proc) only."""
    import signal

    from cluster.procs import descendants, process_table
    table, me, killed = process_table(), os.getpid(), 0
    for pid in descendants(table, me) - {me}:
        if any(m in table[pid][2] for m in _RAY_PROCESS_MARKERS):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def closed_to_network() -> None:
    """Make the local Ray instance about to start use 127.0.0.1 as its node address, so GCS,
    raylet, object manager, agents, metrics export and worker ports all listen on loopback
    only (and the workers' process groups too). Ray does this itself on macOS and Windows (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0): the
    variable reaches Ray's child processes; this process may have read it at import already."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Tensor-parallel groups (gloo on CPU, NCCL's bootstrap on GPU) pick an interface of their
    # own; on one host the loopback one serves, and reaches no one else.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False


class Cluster:
    def __init__(self, plan: Plan, metrics=None, max_prompt_tokens: int = 0, max_tokens_limit: int = 0,
                 max_pending: int = 1024, actor_cls: type | None = None):
        """actor_cls: the class of the rank actors (a subclass of cluster.actors.RankActor;
        tests use one that injects faults)."""
        from model.embedded import resolve_model_source
        self.plan = plan
        source = resolve_model_source(plan.model)
        self.model_config = load_model_config(source)
        folder = Path(source) if Path(source).is_dir() else None
        self.tokenizer = load_tokenizer(folder, self.model_config.bos_token_id, self.model_config.eos_token_id)
        self.controller = Controller(plan, self.model_config, self.tokenizer, metrics, max_pending, actor_cls)
        self.limits = (max_prompt_tokens, max_tokens_limit)
        self.inputs: InputProcessor | None = None
        self.lost: str | None = None          # why the Ray cluster under us is gone, once it is
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # Async API ---------------------------------------------------------------------------
    async def astart(self) -> "Cluster":
        await self.controller.start()
        self.inputs = InputProcessor(self.tokenizer, self.model_config.vocab_size, self.controller.max_model_len,
                                     self.limits[0], self.limits[1],
                                     self.controller.max_request_blocks * self.plan.block_size,
                                     self.model_config.eos_token_ids)
        return self

    async def submit(self, prompt, sampling: SamplingParams | None = None, request_id: str | None = None):
        """Validate and accept a request; returns its tracking handle (raises InvalidRequestError
        or OverloadedError, with nothing half done)."""
        if isinstance(prompt, (str, list)) and len(prompt) > OFFLOAD_PROMPT_ITEMS:    # would stall the loop
            req = await asyncio.get_running_loop().run_in_executor(None, self.inputs.build, prompt, sampling, request_id)
        else:
            req = self.inputs.build(prompt, sampling, request_id)
        if req.request_id in self.controller.tracked:
            from engine.errors import InvalidRequestError
            raise InvalidRequestError("request_id", f"{req.request_id!r} is already in flight")
        return await self.controller.submit(req)

    async def agenerate(self, prompt, sampling: SamplingParams | None = None, request_id: str | None = None):
        t = await self.submit(prompt, sampling, request_id)
        try:
            async for item in self.controller.stream(t):
                yield item
        finally:
            if not t.closed:
                await self.controller.cancel(t.request_id)

    async def acancel(self, request_id: str) -> None:
        await self.controller.cancel(request_id)

    async def ahealth(self) -> dict:
        """The controller's health (see `Controller.health`); "not_serving" once Ray is lost."""
        if self.lost:
            return {"state": "not_serving", "roles": {}, "lost": self.lost}
        return await self.controller.health()

    def fail_all(self, why: str) -> None:
        """End every request in flight with `why` (the cluster under them is gone)."""
        for t in list(self.controller.tracked.values()):
            self.controller.fail(t, why)

    async def astats(self) -> dict:
        return await self.controller.stats()

    async def ashutdown(self) -> None:
        await self.controller.shutdown()

    # Sync API (background loop) ---------------------------------------------------------
    @classmethod
    def start(cls, plan: Plan | None = None, *, ray_address: str | None = None, **kw) -> "Cluster":
        init_ray(ray_address)
        c = cls(plan or Plan(), **kw)
        c._loop = asyncio.new_event_loop()
        c._thread = threading.Thread(target=c._loop.run_forever, name="disagg-controller", daemon=True)
        c._thread.start()
        try:
            c._run(c.astart())
        except BaseException:
            c.shutdown()
            raise
        return c

    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def generate(self, prompts, sampling: SamplingParams | list[SamplingParams] | None = None,
                 timeout: float | None = None) -> list[RequestOutput]:
        """Send all prompts at once and wait for every output (in input order)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)

        async def one(prompt, sp):
            out = None
            async for item in self.agenerate(prompt, sp):
                if out is None:
                    out = RequestOutput(item.request_id, [])
                out.token_ids += item.token_ids
                out.text += item.text
                if item.finish_reason is not None:
                    out.finish_reason, out.times = item.finish_reason, item.timings or {}
                    out.prompt_token_ids = []
                    if item.error:
                        from engine.errors import RequestFailedError
                        raise RequestFailedError(item.error)
            return out

        async def all_of():
            return await asyncio.gather(*[one(p, sp) for p, sp in zip(prompts, params)])
        return self._run(all_of(), timeout)

    def stream(self, prompt, sampling: SamplingParams | None = None):
        """Iterate over StreamDelta items as they arrive."""
        import queue
        q: queue.Queue = queue.Queue()

        async def pump():
            try:
                async for item in self.agenerate(prompt, sampling):
                    q.put(item)
            except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread
                q.put(e)
        asyncio.run_coroutine_threadsafe(pump(), self._loop)
        while True:
            item = q.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if isinstance(item, StreamDelta) and item.finish_reason is not None:
                return

    def stats(self) -> dict:
        return self._run(self.astats())

    def cancel(self, request_id: str) -> None:
        self._run(self.acancel(request_id))

    def shutdown(self) -> None:
        if self._loop is None:
            return
        try:
            self._run(self.ashutdown(), timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

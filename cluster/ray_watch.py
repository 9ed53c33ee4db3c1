"""Notice when the Ray cluster under `disagg serve` is gone (its raylet or GCS died), so the
server ends its streams with UNAVAILABLE and exits instead of hanging on a dead cluster.

Two signals: the processes of a local Ray instance this process started (their exit is seen
at once), and, for any cluster, the GCS's view of this node (it marks a node dead ~15 s after
its raylet stops answering; a GCS that does not answer for `GCS_TIMEOUT_S` twice is lost too).
"""
from __future__ import annotations

import asyncio
import logging
import threading

log = logging.getLogger("disagg.serve")
POLL_INTERVAL_S = 1.0
GCS_EVERY_S = 3.0
GCS_TIMEOUT_S = 5.0
WATCHED = ("raylet", "gcs_server")


def _local_processes() -> dict:
    """{name: Popen} of the Ray daemons this process started (empty when it joined a cluster)."""
    import ray
    node = ray._private.worker._global_node
    procs = getattr(node, "all_processes", None) or {}
    return {name: info.process for name in WATCHED for info in procs.get(name, ())}


def _dead_local(procs: dict) -> str | None:
    for name, p in procs.items():
        if p.poll() is not None:
            return f"the local {name.replace('_server', '')} process (pid {p.pid}) exited with code {p.returncode}"
    return None


async def _node_alive(node_id: str) -> bool | None:
    """This node's liveness as the GCS sees it; None when the GCS did not answer in time.
    ray.nodes() blocks (and retries for a minute against a dead GCS), hence a daemon thread."""
    import ray
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def ask():
        try:
            alive = any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(alive))
        except Exception:  # noqa: BLE001 - counted as no answer
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))
    threading.Thread(target=ask, name="disagg-ray-watch", daemon=True).start()
    try:
        return await asyncio.wait_for(fut, GCS_TIMEOUT_S)
    except asyncio.TimeoutError:
        return None


async def watch_ray() -> str:
    """Return (only) once the Ray cluster is lost, with a one-line reason."""
    import ray
    procs = _local_processes()
    node_id = ray.get_runtime_context().get_node_id()
    since_gcs, no_answer = GCS_EVERY_S, 0
    while True:
        why = _dead_local(procs)
        if why:
            return why
        if since_gcs >= GCS_EVERY_S:
            since_gcs = 0.0
            alive = await _node_alive(node_id)
            why = _dead_local(procs)        # a dead local daemon is the better reason
            if why:
                return why
            if alive is False:
                return f"the GCS reports this node ({node_id[:12]}) dead: its raylet is gone"
            no_answer = no_answer + 1 if alive is None else 0
            if no_answer >= 2:
                return f"the GCS has not answered for {no_answer * GCS_TIMEOUT_S:.0f} s"
        await asyncio.sleep(POLL_INTERVAL_S)
        since_gcs += POLL_INTERVAL_S


async def watch_ray_safely() -> str:
    """`watch_ray`, but a failure of the watcher itself is logged and never ends the server."""
    try:
        return await watch_ray()
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the watcher is an aid; serving goes on without it
        log.exception("watching the Ray cluster failed; a lost cluster will not be noticed")
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def kill_local_ray() -> None:
    """Stop the Ray daemons this process started (GCS, monitor, dashboard...), which would
    outlive a lost raylet as orphans. Nothing to do after joining a cluster."""
    import ray
    node = ray._private.worker._global_node
    if node is None or not getattr(node, "all_processes", None):
        return
    try:
        node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
    except Exception as e:  # noqa: BLE001 - best effort on the way out
        log.debug("stopping the local Ray daemons: %s", e)

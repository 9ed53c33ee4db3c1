"""`disagg serve` kept running by Ray Serve: the application a KubeRay RayService deploys.

RayService restarts what Ray Serve reports unhealthy, so the server runs as one Serve replica
pinned to the head node that starts `disagg serve` (the same command as everywhere else, joined
to the running cluster) as a child process and reports unhealthy when that process has exited:
Serve then replaces the replica, which starts a fresh server; the child gets SIGTERM when the
replica goes away, so two servers never hold the ports. Serve config (serveConfigV2):

    applications:
      - name: disagg
        import_path: cluster.serve_app:app
        args: {serve_args: "--plan /etc/disagg/plan.json --host 0.0.0.0"}
"""
import ctypes
import logging
import os
import shlex
import signal
import subprocess
import sys

import ray
from ray import serve

from cluster.readiness import READY_FILE

logger = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the replica process dies, even when it is killed."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def serve_command(serve_args: list[str], ray_address: str, ready_file: str = READY_FILE) -> list[str]:
    """The child's command line: `disagg serve` joined to the Ray cluster at `ray_address`."""
    for flag in ("--ready-file", "--ray-address"):
        if any(a == flag or a.startswith(flag + "=") for a in serve_args):
            raise ValueError(f"serve_args: {flag} is set by the Serve application, leave it out")
    return [sys.executable, "-m", "cluster.cli", "serve", *serve_args,
            "--ready-file", ready_file, "--ray-address", ray_address]


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=4,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=90,
    # The head node: where the Service's endpoints (gRPC, HTTP, metrics) are.
    ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
)
class DisaggServer:
    """Runs `disagg serve SERVE_ARGS` and reports unhealthy once it has exited."""

    def __init__(self, serve_args: list[str], ready_file: str = READY_FILE, ray_address: str | None = None):
        if os.path.exists(ready_file):
            os.remove(ready_file)     # a previous server's: not ready until this one writes it
        # This replica's own cluster, by its GCS address: "auto" could find another one on the node.
        address = ray_address or ray.get_runtime_context().gcs_address
        self.command = serve_command(serve_args, address, ready_file)
        logger.info("starting %s", shlex.join(self.command))
        self.proc = subprocess.Popen(self.command, preexec_fn=_die_with_parent)

    def check_health(self) -> None:
        rc = self.proc.poll()
        if rc is not None:
            raise RuntimeError(f"disagg serve exited with code {rc}")

    def __call__(self, request=None) -> dict:
        return {"pid": self.proc.pid, "running": self.proc.poll() is None, "command": self.command}

    def __del__(self):
        proc = getattr(self, "proc", None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)     # serve drains and shuts down cleanly on SIGTERM
        try:
            proc.wait(80)
        except subprocess.TimeoutExpired:
            proc.kill()


def app(args: dict):
    """Application builder for `import_path: cluster.serve_app:app`; args: {serve_args: "..."}."""
    unknown = set(args) - {"serve_args"}
    if unknown:
        raise ValueError(f"args: unknown key(s) {sorted(unknown)}; only 'serve_args' is accepted")
    return DisaggServer.bind(shlex.split(args.get("serve_args", "")))

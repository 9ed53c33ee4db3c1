"""Readiness probe for a Ray head pod that runs `disagg serve` (deploy/kuberay/):
`python -m cluster.readiness [--ready-file F] [--grpc HOST:PORT] [--ray]`, exit 0 when ready.

KubeRay starts the server only once the head pod is ready (a RayJob submits when the cluster is
ready, a RayService deploys when the head pod is), so a probe on the gRPC port alone would never
pass. Before the server has written its ready file, the pod is ready when Ray is (what KubeRay's
own probe checks); once the file exists, it is ready only while grpc.health.v1 says SERVING. A
server that crashes, drains or hangs takes its pod out of the Service's endpoints.
"""
import argparse
import json
import os
import sys
import urllib.request

# `disagg serve --ready-file` writes this once it serves (cluster/serve_app.py passes it).
READY_FILE = "/tmp/disagg-ready.json"
RAY_HEALTH_URLS = ("http://127.0.0.1:52365/api/local_raylet_healthz", "http://127.0.0.1:8265/api/gcs_healthz")


def ray_ready(timeout_s: float) -> str | None:
    """None when the raylet and the GCS answer healthy, else why not."""
    for url in RAY_HEALTH_URLS:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                body = resp.read().decode(errors="replace")
        except OSError as e:
            return f"{url}: {e}"
        if "success" not in body:
            return f"{url}: {body[:200]}"
    return None


def grpc_ready(target: str, timeout_s: float) -> str | None:
    """None when the server's overall health (service "") is SERVING, else why not."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            return f"{target}: {e.code().name} {e.details()}"
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
    return None


def check(ready_file: str, grpc_target: str | None, ray: bool, timeout_s: float) -> str | None:
    problem = ray_ready(timeout_s) if ray else None
    if problem is None and os.path.exists(ready_file):
        if grpc_target is None:      # the port the server wrote, on loopback (it may bind 0.0.0.0)
            with open(ready_file) as f:
                grpc_target = f"127.0.0.1:{json.load(f)['port']}"
        problem = grpc_ready(grpc_target, timeout_s)
    return problem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.readiness", description=__doc__.split("\n\n")[0])
    p.add_argument("--ready-file", default=READY_FILE, help="the file `disagg serve --ready-file` writes")
    p.add_argument("--grpc", default=None, help="the server's gRPC address (default: 127.0.0.1 and the port in the ready file)")
    p.add_argument("--ray", action="store_true", help="also require the local raylet and GCS to be healthy")
    p.add_argument("--timeout-s", type=float, default=2.0)
    args = p.parse_args(argv)
    problem = check(args.ready_file, args.grpc, args.ray, args.timeout_s)
    if problem:
        print(f"not ready: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

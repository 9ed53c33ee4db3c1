"""The head pod's readiness probe (python -m cluster.readiness) against a real gRPC health
server, and the RayService supervisor noticing that its `disagg serve` child has exited."""
import json
import subprocess
import sys
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cluster import readiness
from cluster.serve_app import DisaggServer, serve_command


@pytest.fixture()
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port, server
    server.stop(0)


def _probe(*args):
    return subprocess.run([sys.executable, "-m", "cluster.readiness", *args], capture_output=True, text=True,
                          timeout=60)


def test_not_started_is_ready_so_kuberay_can_start_the_server(tmp_path):
    assert readiness.check(str(tmp_path / "absent.json"), None, ray=False, timeout_s=1) is None


def test_started_server_is_ready_only_while_serving(tmp_path, health_server):
    servicer, port, server = health_server
    ready = tmp_path / "ready.json"
    ready.write_text(json.dumps({"host": "0.0.0.0", "port": port}))
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert readiness.check(str(ready), None, ray=False, timeout_s=2) is None
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert "NOT_SERVING" in readiness.check(str(ready), None, ray=False, timeout_s=2)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    proc = _probe("--ready-file", str(ready))
    assert proc.returncode == 0, proc.stderr
    server.stop(0)
    proc = _probe("--ready-file", str(ready))
    assert proc.returncode == 1 and "not ready" in proc.stderr and "UNAVAILABLE" in proc.stderr


def test_ray_down_is_not_ready(tmp_path):
    problem = readiness.check(str(tmp_path / "absent.json"), None, ray=True, timeout_s=1)
    assert problem is not None and "healthz" in problem


def test_supervisor_command_and_bad_args():
    cmd = serve_command(["--plan", "p.json", "--host", "0.0.0.0"], "10.0.0.1:6379", "/tmp/r.json")
    assert cmd[1:4] == ["-m", "cluster.cli", "serve"]
    assert cmd[-4:] == ["--ready-file", "/tmp/r.json", "--ray-address", "10.0.0.1:6379"]
    with pytest.raises(ValueError, match="--ready-file"):
        serve_command(["--ready-file=/x"], "10.0.0.1:6379")
    from cluster.serve_app import app
    with pytest.raises(ValueError, match="serve_arg"):
        app({"serve_arg": "--plan p.json"})


def test_supervisor_reports_unhealthy_once_the_server_exits(tmp_path):
    """The child is the real `disagg serve`; a plan file that does not exist makes it exit."""
    ready = tmp_path / "ready.json"
    ready.write_text("{}")                      # a previous server's: removed on start
    supervisor = DisaggServer.func_or_class(["--plan", str(tmp_path / "missing.json")], str(ready), "127.0.0.1:9")
    assert not ready.exists()
    deadline = time.monotonic() + 120
    while supervisor.proc.poll() is None:
        assert time.monotonic() < deadline, "disagg serve did not exit"
        supervisor.check_health()               # healthy while it runs
        time.sleep(0.2)
    with pytest.raises(RuntimeError, match="disagg serve exited with code [1-9]"):
        supervisor.check_health()

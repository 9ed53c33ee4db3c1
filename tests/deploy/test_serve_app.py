"""The RayService application under real Ray Serve: it starts `disagg serve`, the server answers;
when the server dies, Serve replaces the replica and a new server answers; shutting the
application down stops the server. ~2 minutes here (two tiny-llama server starts)."""
import json
import os
import signal
import socket
import time

import grpc
import pytest

from cluster.grpc_client import make_request
from engine.sampling_params import SamplingParams
from protos import inference_pb2_grpc as pb_grpc


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(path, old_pid=None, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while True:
        if os.path.exists(path):
            info = json.loads(open(path).read())
            if info["pid"] != old_pid:
                return info
        assert time.monotonic() < deadline, "disagg serve did not become ready"
        time.sleep(0.5)


def _generate(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        out = list(pb_grpc.InferenceStub(ch).Generate(
            make_request([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True)), timeout=60))
    return sum(len(r.token_ids) for r in out), out[-1].finish_reason


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_restarts_a_dead_server(ray_session, tmp_path):
    from ray import serve

    from cluster.serve_app import DisaggServer
    ready = str(tmp_path / "ready.json")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    try:
        app = DisaggServer.options(health_check_period_s=2, health_check_timeout_s=10).bind(
            ["--model", "tiny-llama", "--port", str(port), "--http-port", "-1", "--metrics-port", "-1"], ready)
        serve.run(app, name="disagg", route_prefix=None)
        first = _wait_ready(ready)
        assert _generate(port) == (4, "length")
        os.kill(first["pid"], signal.SIGKILL)
        second = _wait_ready(ready, old_pid=first["pid"])
        assert _generate(port) == (4, "length")
    finally:
        serve.shutdown()
    deadline = time.monotonic() + 30
    while True:
        try:
            os.kill(second["pid"], 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the server outlived its Serve application"
        time.sleep(0.5)

"""grpc.health.v1 tells the truth: NOT_SERVING while the only decode instance is dead, SERVING
again once it is replaced; when the local raylet dies, streams end with UNAVAILABLE and
`disagg serve` exits non-zero with one line saying why."""
import os
import signal
import threading
import time

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.grpc_client import make_request
from engine.sampling_params import SamplingParams
from protos import inference_pb2_grpc as pb_grpc
from tests.cluster.serve_proc import listening_sockets, start_serve, stop_serve
from tests.cluster.servers import Server, record

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _status(port, service=""):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _wait_status(port, want, timeout_s):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if _status(port) == want and _status(port, "disagg.v1.Inference") == want:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"health did not become {health_pb2.HealthCheckResponse.ServingStatus.Name(want)} "
                         f"within {timeout_s} s")


@pytest.mark.timeout(300)
def test_health_follows_the_only_decode_instance(ray_session):
    srv = Server({"model": "tiny-llama", "prefill": {"num_kv_blocks": 64}, "decode": {"num_kv_blocks": 64}})
    try:
        assert _status(srv.port) == SERVING and _status(srv.port, "disagg.v1.Inference") == SERVING
        assert srv.run(srv.cluster.ahealth()) == {"state": "serving",
                                                  "roles": {"prefill": 1, "decode": 1, "colocated": 0},
                                                  "instances": {"prefill-0": "prefill", "decode-0": "decode"}}
        victim = srv.cluster.controller.decodes[0]
        ray.kill(victim.driver, no_restart=True)
        down_s = _wait_status(srv.port, NOT_SERVING, 60)
        back_s = _wait_status(srv.port, SERVING, 180)
        assert srv.cluster.controller.decodes[0] is not victim      # replaced, not the same actor
        h = srv.run(srv.cluster.ahealth())
        assert h["state"] == "serving" and h["roles"]["decode"] == 1
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            out = list(pb_grpc.InferenceStub(ch).Generate(
                make_request([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True)), timeout=60))
        assert sum(len(r.token_ids) for r in out) == 4
        record("health", {"decode_killed_to_not_serving_s": round(down_s, 2),
                          "not_serving_to_serving_s": round(back_s, 2)})
    finally:
        srv.close()


@pytest.mark.timeout(300)
def test_raylet_loss_ends_streams_unavailable_and_serve_exits(tmp_path):
    proc, ready = start_serve(tmp_path)
    try:
        socks = listening_sockets(proc.pid)
        raylets = [p for p, comm, *_ in socks if comm == "raylet"]
        daemons = {p for p, comm, *_ in socks if comm == "gcs_server"}
        assert raylets and daemons, f"no raylet or GCS in the serve process tree: {socks}"
        with grpc.insecure_channel(f"127.0.0.1:{ready['port']}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            got, first, result = [], threading.Event(), {}

            def stream():
                try:
                    for r in stub.Generate(make_request([5, 6, 7], SamplingParams(max_tokens=1000, ignore_eos=True)),
                                           timeout=120):
                        got.extend(r.token_ids)
                        first.set()
                    result["code"] = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    result["code"], result["details"] = e.code(), e.details()
                result["t"] = time.monotonic()
                first.set()
            th = threading.Thread(target=stream)
            th.start()
            assert first.wait(60), f"no token before the kill: {result}"
            t0 = time.monotonic()
            os.kill(raylets[0], signal.SIGKILL)
            th.join(60)
            assert not th.is_alive(), "the stream did not end within 60 s of the raylet's death"
        assert result["code"] == grpc.StatusCode.UNAVAILABLE, result
        assert len(got) < 1000
        stream_end_s = result["t"] - t0
        assert stream_end_s < 30
        rc = proc.wait(60)
        exit_s = time.monotonic() - t0
        assert rc != 0
        log = (tmp_path / "serve.log").read_text()
        errors = [ln for ln in log.splitlines() if ln.startswith("disagg serve: error:")]
        assert len(errors) == 1 and "Ray cluster was lost" in errors[0] and "raylet" in errors[0], log[-3000:]
        left = [p for p in daemons if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
        assert not left, f"Ray daemons left running after serve exited: {left}"
        record("health", {"raylet_killed_to_stream_unavailable_s": round(stream_end_s, 2),
                          "raylet_killed_to_serve_exit_s": round(exit_s, 2), "serve_exit_code": rc,
                          "serve_error_line": errors[0]})
    finally:
        stop_serve(proc)

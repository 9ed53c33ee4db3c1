"""`disagg submit` sends `disagg serve` to a real Ray head node as a job; a Generate call to the
submitted server works; the job and the head node stop cleanly."""
import os
import socket
import subprocess
import sys
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


@pytest.fixture()
def head_node():
    """A Ray head node of its own, started with `ray start --block` in a new session so that
    stopping it (SIGTERM to that session) touches no other Ray instance on the machine."""
    import signal
    import tempfile
    temp = tempfile.mkdtemp(prefix="/tmp/rh")     # short: Ray's socket paths must fit AF_UNIX
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    gcs, dash = _free_port(), _free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    # Every port of its own: the test session's local Ray may hold the defaults (the dashboard
    # agent's 52365 among them, without which jobs cannot be submitted).
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
                             *ports, "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             "--disable-usage-stats", f"--temp-dir={temp}"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while True:
        try:
            import urllib.request
            urllib.request.urlopen(address + "/api/version", timeout=2)
            break
        except OSError:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the head node's dashboard did not come up"
            time.sleep(1)
    yield address, env, ray_bin, gcs
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        raise AssertionError("the head node did not stop on SIGTERM")
    import shutil
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.timeout(400)
def test_submit_serve_as_ray_job(head_node):
    address, env, ray_bin, gcs = head_node
    port = _free_port()
    token = "submit-test-token"
    # The token reaches the job through its runtime_env, never its entrypoint (`ray job list`).
    sub = subprocess.run([sys.executable, "-m", "cluster.cli", "submit", "--address", address, "--job-id", "disagg-test",
                          "--model", "tiny-llama", "--port", str(port), "--metrics-port", "-1", "--http-port", "-1"],
                         env=dict(env, DISAGG_AUTH_TOKEN=token), capture_output=True, text=True, timeout=300)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    assert "ready on 127.0.0.1" in sub.stdout
    from ray.job_submission import JobSubmissionClient
    assert token not in JobSubmissionClient(address).get_job_info("disagg-test").entrypoint
    request = make_request([5, 6, 7], SamplingParams(max_tokens=5, ignore_eos=True))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.InferenceStub(ch).Generate(request, timeout=60))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        out = list(pb_grpc.InferenceStub(ch).Generate(request, timeout=60, metadata=(("authorization", f"Bearer {token}"),)))
    assert sum(len(r.token_ids) for r in out) == 5 and out[-1].finish_reason == "length"
    stop = subprocess.run([ray_bin, "job", "stop", "--address", address, "disagg-test"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    from ray.job_submission import JobStatus, JobSubmissionClient
    client = JobSubmissionClient(address)
    deadline = time.monotonic() + 60
    while client.get_job_status("disagg-test") not in (JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED):
        assert time.monotonic() < deadline, "the job did not stop"
        time.sleep(1)
    assert client.get_job_status("disagg-test") == JobStatus.STOPPED
    deadline = time.monotonic() + 30
    while "disagg serve: shutting down" not in client.get_job_logs("disagg-test"):
        assert time.monotonic() < deadline, "serve did not shut down on SIGTERM: " + client.get_job_logs("disagg-test")[-2000:]
        time.sleep(0.5)

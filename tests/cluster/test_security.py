"""The front door of a default `disagg serve` (subprocess, its own local Ray): every listening
socket of its process tree is on loopback; a second server on the same port exits 2 at once;
the bearer token is checked before a body is read (RSS stays flat under 50 MB bodies) and
never appears on a command line; an oversized request is RESOURCE_EXHAUSTED."""
import os
import subprocess
import sys
import threading
import time

import grpc
import pytest

from cluster.grpc_client import make_request
from engine.sampling_params import SamplingParams
from protos import inference_pb2_grpc as pb_grpc
from tests.cluster.serve_proc import ENV, is_loopback, listening_sockets, rss_kib, start_serve, stop_serve, tree_pids
from tests.cluster.servers import record

TOKEN = "s3cret-token-for-tests"
BODY_BYTES = 50 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("secure")
    proc, ready = start_serve(d, env=dict(ENV, DISAGG_AUTH_TOKEN=TOKEN))
    yield proc, ready, d
    stop_serve(proc)


def _stub(ready):
    ch = grpc.insecure_channel(f"127.0.0.1:{ready['port']}",
                               options=[("grpc.max_send_message_length", -1)])
    return ch, pb_grpc.InferenceStub(ch)


@pytest.mark.timeout(120)
def test_every_listening_socket_is_loopback(served):
    proc, ready, _ = served
    socks = listening_sockets(proc.pid)
    names = {s[1] for s in socks}
    # The server itself, Ray's GCS and raylet, and at least one worker hold listening sockets.
    assert {ready["port"], ready["http_port"]} <= {s[3] for s in socks}, socks      # gRPC and HTTP fronts
    assert {"gcs_server", "raylet"} <= names, socks
    open_ = [s for s in socks if not is_loopback(s[2])]
    assert not open_, f"listening beyond loopback: {open_}"
    record("security", {"listening_sockets": len(socks), "processes": len({s[0] for s in socks}),
                        "non_loopback": len(open_)})


@pytest.mark.timeout(120)
def test_second_serve_on_the_same_port_exits_2(served, tmp_path):
    _, ready, d = served
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", "--plan", str(d / "plan.json"),
                        "--port", str(ready["port"]), "--metrics-port", "-1", "--http-port", "-1"],
                       env=ENV, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "port" in lines[0] and str(ready["port"]) in lines[0], p.stderr
    assert took < 30
    record("security", {"second_serve_exit_s": round(took, 1), "second_serve_stderr": lines[0]})


def _rss_peak_during(pids, fn):
    """(before, peak) tree RSS in KiB around fn(), sampled every 20 ms."""
    before = rss_kib(pids)
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(rss_kib(pids))
            time.sleep(0.02)
    th = threading.Thread(target=sample)
    th.start()
    try:
        out = fn()
    finally:
        done.set()
        th.join()
    peak.append(rss_kib(pids))
    return before, max(peak), out


@pytest.mark.timeout(180)
def test_unauthenticated_50mb_bodies_are_refused_before_reading(served):
    proc, ready, _ = served
    ch, stub = _stub(ready)
    big = make_request("x" * BODY_BYTES, SamplingParams(max_tokens=2))
    pids = tree_pids(proc.pid)

    def send(md):
        codes = []

        def one():
            try:
                list(stub.Generate(big, metadata=md, timeout=60))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
        ths = [threading.Thread(target=one) for _ in range(4)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        return codes

    rss_kib(pids)
    before, peak, codes = _rss_peak_during(pids, lambda: send(None))
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 4
    growth_mib = (peak - before) / 1024
    # Reading even one of the bodies would add >= 50 MiB; the tree's own noise was 6-21 MiB.
    assert growth_mib < 40, f"server tree RSS grew {growth_mib:.1f} MiB for 4 unauthenticated 50 MB bodies"
    # Authenticated but over the receive limit: refused too, memory stays bounded.
    md = (("authorization", f"Bearer {TOKEN}"),)
    before2, peak2, codes2 = _rss_peak_during(pids, lambda: send(md))
    assert codes2 == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4
    # A normal request with the token still works.
    out = list(stub.Generate(make_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True)),
                             metadata=md, timeout=60))
    assert sum(len(r.token_ids) for r in out) == 3
    ch.close()
    record("security", {"unauth_4x50MB_rss_growth_mib": round(growth_mib, 1),
                        "auth_4x50MB_over_limit_rss_growth_mib": round((peak2 - before2) / 1024, 1),
                        "tree_rss_before_mib": round(before / 1024)})


def test_token_is_on_no_command_line(served):
    proc, _, _ = served
    for p in tree_pids(proc.pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                assert TOKEN.encode() not in f.read()
        except OSError:
            pass


def test_token_flags(tmp_path, capsys):
    from cluster.cli import build_parser
    from cluster.serve import auth_token_from_args
    from engine.errors import ConfigError
    parser = build_parser()
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    env = os.environ.pop("DISAGG_AUTH_TOKEN", None)
    try:
        assert auth_token_from_args(parser.parse_args(["serve", "--auth-token-file", str(f)])) == "from-file"
        assert auth_token_from_args(parser.parse_args(["serve", "--auth-token", "cli"])) == "cli"
        os.environ["DISAGG_AUTH_TOKEN"] = "from-env"
        assert auth_token_from_args(parser.parse_args(["serve"])) == "from-env"
        (tmp_path / "empty").write_text("")
        for bad in (tmp_path / "missing", tmp_path / "empty"):
            with pytest.raises(ConfigError, match="--auth-token-file"):
                auth_token_from_args(parser.parse_args(["serve", "--auth-token-file", str(bad)]))
    finally:
        os.environ.pop("DISAGG_AUTH_TOKEN", None)
        if env is not None:
            os.environ["DISAGG_AUTH_TOKEN"] = env


@pytest.mark.timeout(120)
def test_shutdown_drains_health_first(served):
    """Last in this module: SIGINT turns health NOT_SERVING (seen by a Watch stream) before the
    server stops, then serve exits 0."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    proc, ready, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{ready['port']}") as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(2)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert proc.wait(60) == 0

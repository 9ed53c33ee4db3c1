"""The plan `disagg place` writes for CPU and the embedded model starts a working cluster with
`disagg serve --plan`: the plan that was simulated is the plan that runs."""
import json
import signal
import subprocess
import sys
import time

import grpc
import pytest

from cluster.grpc_client import make_request
from engine.plan import Plan
from engine.sampling_params import SamplingParams
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc


@pytest.mark.timeout(480)
def test_place_then_serve(tmp_path):
    plan_path = tmp_path / "plan.json"
    place = subprocess.run([sys.executable, "-m", "cluster.cli", "place", "--model", "embedded", "--gpu", "cpu:2",
                            "--nodes", "1", "--ttft", "2", "--tpot", "0.1", "--attainment", "0.9",
                            "--workload", "azure-conv", "--out", str(plan_path), "--quiet"],
                           capture_output=True, text=True, timeout=300)     # ~40 s quiet; minutes on a loaded 2-core box
    assert place.returncode == 0, place.stderr
    plan = Plan.load(plan_path)
    assert plan.model == "embedded" and plan.prefill.device == "cpu" and plan.predicted
    ready = tmp_path / "ready.json"
    serve = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--plan", str(plan_path), "--port", "0",
                              "--metrics-port", "-1", "--http-port", "-1", "--ready-file", str(ready)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert serve.poll() is None, serve.stdout.read()
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.5)
        port = json.loads(ready.read_text())["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
            served = Plan.from_dict(json.loads(info.plan_json))
            assert (served.prefill.num_instances, served.decode.num_instances) == \
                (plan.prefill.num_instances, plan.decode.num_instances)
            out = list(stub.Generate(make_request("Hello", SamplingParams(max_tokens=6, ignore_eos=True)), timeout=60))
        assert sum(len(r.token_ids) for r in out) == 6 and out[-1].finish_reason == "length"
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
    assert serve.returncode == 0

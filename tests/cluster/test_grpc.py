"""A real gRPC client against a real server on 127.0.0.1, backed by a local Ray cluster."""
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster.grpc_client import make_request
from cluster.grpc_server import start_server
from engine.sampling_params import SamplingParams
from model.llm import LLM
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.cluster.servers import Server

MODEL = "tiny-llama"
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def srv(ray_session):
    s = Server({"model": MODEL, "decode": {"num_kv_blocks": 12}}, auth_token=TOKEN,
               max_prompt_tokens=150, max_tokens_limit=100, max_pending=1)
    yield s
    s.close()


@pytest.fixture()
def stub(srv):
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        yield pb_grpc.InferenceStub(ch)


def _wait_all_free(srv, timeout=10.0):
    return srv.wait_all_free(timeout)


def test_streamed_generation_matches_in_process_engine(stub):
    prompts = [[5, 6, 7], list(range(10, 60)), [200] * 17]
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in LLM(MODEL).generate(prompts, sp)]
    for p, w in zip(prompts, want):
        responses = list(stub.Generate(make_request(p, sp)))
        assert len(responses) >= 2, "tokens arrive in several messages"
        assert [t for r in responses for t in r.token_ids] == w
        last = responses[-1]
        assert last.finish_reason == "length" and last.usage.completion_tokens == 12
        assert last.usage.prompt_tokens == len(p) and last.timings.ttft_s > 0
        assert all(r.finish_reason == "" for r in responses[:-1])


def test_text_prompt_and_model_info(stub):
    responses = list(stub.Generate(pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(max_tokens=4))))
    assert responses[-1].finish_reason in ("length", "stop")
    info = stub.ModelInfo(pb.ModelInfoRequest())
    assert info.architecture == "llama" and info.max_prompt_tokens == 150 and info.max_tokens_limit == 100
    assert '"model": "tiny-llama"' in info.plan_json


@pytest.mark.parametrize("req,field", [
    (pb.GenerateRequest(text=""), "prompt"),
    (pb.GenerateRequest(), "prompt"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "prompt_token_ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 999999])), "prompt_token_ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-1])), "prompt_token_ids"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(max_tokens=-5)), "max_tokens"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(max_tokens=101)), "max_tokens"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(temperature=-1)), "temperature"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(top_p=1.5)), "top_p"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(top_k=-2)), "top_k"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(stop=[""])), "stop"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(stop_token_ids=[-4])), "stop_token_ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3] * 151)), "prompt"),
    (pb.GenerateRequest(text="x", request_id="r" * 300), "request_id"),
])
def test_invalid_inputs_get_invalid_argument_naming_the_field(stub, req, field):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field)


def test_malformed_protobuf_bytes_get_invalid_argument(srv):
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        raw = ch.unary_stream("/disagg.v1.Inference/Generate", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            list(raw(b"\xff\xff\xff\x0f garbage"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_full_queue_gets_resource_exhausted(srv, stub):
    # 12 decode blocks of 16 tokens: one 120-token prompt with 60 new tokens takes 12 blocks, the
    # next waits for capacity (max_pending=1), the one after is refused.
    big = SamplingParams(max_tokens=60, ignore_eos=True)
    first = stub.Generate(make_request([7] * 120, big))
    next(first)
    second = stub.Generate(make_request([8] * 120, big))
    deadline = time.monotonic() + 5
    while srv.stats()["num_pending"] < 1:          # the second waits for decode capacity
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(make_request([9] * 120, big)))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sum(len(r.token_ids) for r in first) == 59
    assert sum(len(r.token_ids) for r in second) == 60
    _wait_all_free(srv)


def test_cancelled_stream_frees_blocks_on_both_workers(srv, stub):
    call = stub.Generate(make_request(list(range(3, 90)), SamplingParams(max_tokens=100, ignore_eos=True)))
    got = [next(call), next(call)]
    assert got[0].token_ids
    st = srv.stats()
    assert st["workers"]["decode-0"]["free_blocks"] < st["workers"]["decode-0"]["num_blocks"]
    call.cancel()
    st = _wait_all_free(srv)
    assert st["workers"]["prefill-0"]["num_held"] == 0


def test_deadline_ends_the_request(srv, stub):
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        for _ in stub.Generate(make_request([5] * 40, SamplingParams(max_tokens=100, ignore_eos=True)), timeout=0.3):
            time.sleep(0.05)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 5
    _wait_all_free(srv)


def test_auth(srv):
    with grpc.insecure_channel(f"127.0.0.1:{srv.auth_port}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        for md in (None, (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(make_request([5, 6], SamplingParams(max_tokens=2)), metadata=md))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = list(stub.Generate(make_request([5, 6], SamplingParams(max_tokens=2)),
                                metadata=(("authorization", f"Bearer {TOKEN}"),)))
        assert ok[-1].finish_reason in ("length", "stop")


def test_health_and_reflection(srv):
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        h = health_pb2_grpc.HealthStub(ch)
        assert h.Check(health_pb2.HealthCheckRequest(service="disagg.v1.Inference")).status == \
            health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"disagg.v1.Inference", "grpc.health.v1.Health"} <= names


def test_metrics_expose_every_series_with_counts(srv, stub):
    list(stub.Generate(make_request(list(range(3, 40)), SamplingParams(max_tokens=8, ignore_eos=True))))
    srv.metrics.update_from_stats(srv.stats())
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.http.server_port}/metrics", timeout=5).read().decode()

    def value(line_start):
        vals = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(line_start)]
        assert vals, f"missing series {line_start}"
        return sum(vals)
    for name in ("disagg_ttft_seconds_count", "disagg_inter_token_latency_seconds_count",
                 "disagg_e2e_latency_seconds_count", "disagg_kv_transfer_bytes_total",
                 "disagg_kv_transfer_seconds_count", "disagg_requests_total", "disagg_generated_tokens_total"):
        assert value(name) > 0, name
    for stage in ("prefill_queue", "prefill_compute", "kv_transfer", "decode_queue"):
        assert value(f'disagg_ttft_breakdown_seconds_count{{stage="{stage}"}}') > 0, stage
    for q in ("waiting", "held"):
        value(f'disagg_queue_length{{instance="prefill-0",queue="{q}"}}')
    for q in ("waiting", "running", "reserved"):
        value(f'disagg_queue_length{{instance="decode-0",queue="{q}"}}')
    value('disagg_kv_cache_usage_ratio{instance="decode-0"}')
    value('disagg_kv_cache_usage_ratio{instance="prefill-0"}')


def _self_signed(tmp_path):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_from_cert_and_key_files(srv, tmp_path):
    from cluster.grpc_client import channel
    cert, key = _self_signed(tmp_path)
    server, port = srv.run(start_server(srv.cluster, "127.0.0.1", 0, tls_cert=cert, tls_key=key))
    try:
        with channel(f"localhost:{port}", tls_ca=cert) as ch:
            out = list(pb_grpc.InferenceStub(ch).Generate(make_request([5, 6], SamplingParams(max_tokens=3)), timeout=30))
        assert out[-1].finish_reason in ("length", "stop")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                list(pb_grpc.InferenceStub(ch).Generate(make_request([5, 6], SamplingParams(max_tokens=3)), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.run(server.stop(0))

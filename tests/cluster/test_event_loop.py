"""Request-sized work stays off the front's event loop: a 4 MB token-id request is refused by
the receive limit (RESOURCE_EXHAUSTED, never parsed), 200k stop strings are refused naming
the field (parsed off the loop), a 900 kB text prompt is tokenized off the loop and refused
for its length; meanwhile another stream gets exactly the tokens of an undisturbed run. Its
inter-token gaps with and without the large requests are recorded (docs/reliability.md)."""
import threading
import time

import grpc
import pytest

from cluster.grpc_client import make_request
from engine.sampling_params import SamplingParams
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.cluster.servers import Server, record

MAX_TOKENS = 200
SP = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def srv(ray_session):
    s = Server({"model": "tiny-llama", "prefill": {"num_kv_blocks": 64}, "decode": {"num_kv_blocks": 64}})
    yield s
    s.close()


def _stream(stub, prompt):
    """(tokens, gaps between arrivals in ms) of one streamed generation."""
    toks, stamps = [], []
    for r in stub.Generate(make_request(prompt, SP), timeout=120):
        if r.token_ids:
            toks += r.token_ids
            stamps.append(time.monotonic())
    return toks, [1000 * (b - a) for a, b in zip(stamps, stamps[1:])]


def _large_requests():
    ids = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[200] * (2 << 20)), sampling=pb.SamplingOptions(max_tokens=4))
    stops = make_request([5, 6], SamplingParams(max_tokens=4))
    stops.sampling.stop.extend(str(i % 10) for i in range(200_000))      # 600 kB, under the limit
    text = make_request("y" * 900_000, SamplingParams(max_tokens=4))
    return [("token_ids_4MB", ids, grpc.StatusCode.RESOURCE_EXHAUSTED, None),
            ("stop_200k", stops, grpc.StatusCode.INVALID_ARGUMENT, "stop:"),
            ("text_900kB", text, grpc.StatusCode.INVALID_ARGUMENT, "prompt:")]


@pytest.mark.timeout(300)
def test_large_requests_do_not_stall_other_streams(srv):
    opts = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=opts) as ch:
        stub = pb_grpc.InferenceStub(ch)
        prompt = [7, 8, 9, 10]
        _stream(stub, prompt)                                     # warm-up
        alone, gaps_alone = _stream(stub, prompt)
        assert len(alone) == MAX_TOKENS
        large = _large_requests()
        assert len(large[0][1].SerializeToString()) > 4_000_000
        results, stop = {}, threading.Event()

        def hammer():
            while not stop.is_set():
                for name, req, _, _ in large:
                    try:
                        list(stub.Generate(req, timeout=60))
                        results.setdefault(name, []).append((grpc.StatusCode.OK, ""))
                    except grpc.RpcError as e:
                        results.setdefault(name, []).append((e.code(), e.details()))
        th = threading.Thread(target=hammer)
        th.start()
        try:
            time.sleep(0.5)
            busy, gaps_busy = _stream(stub, prompt)
        finally:
            stop.set()
            th.join(120)
    assert busy == alone, "the stream's tokens changed while large requests arrived"
    for name, _, code, field in large:
        assert results.get(name), f"{name} was never answered"
        for got, details in results[name]:
            assert got == code, (name, got, details)
            assert field is None or details.startswith(field), (name, details)
    srv.wait_all_free()
    p99 = lambda g: sorted(g)[int(0.99 * (len(g) - 1))]  # noqa: E731
    record("event_loop", {"gap_alone_p99_ms": round(p99(gaps_alone), 1), "gap_alone_max_ms": round(max(gaps_alone), 1),
                          "gap_busy_p99_ms": round(p99(gaps_busy), 1), "gap_busy_max_ms": round(max(gaps_busy), 1),
                          "large_requests_answered": {k: len(v) for k, v in results.items()}})

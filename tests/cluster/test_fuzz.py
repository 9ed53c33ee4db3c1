"""Generate requests fuzzed with hypothesis: any Unicode, huge and negative numbers, empty and
oversized fields, raw protobuf bytes with wrong wire types. The server never crashes, answers
only with the status codes it documents, and frees every block afterwards."""
import struct
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import inference_pb2 as pb
from tests.cluster.servers import Server, record

BATCH = 50
EXAMPLES = 41            # 41 x 50 = 2,050 requests
ALLOWED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
I32 = st.integers(-2**31, 2**31 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def structured(draw):
    s = pb.SamplingOptions(
        max_tokens=draw(st.one_of(st.integers(-3, 6), I32)), temperature=draw(FLOATS),
        top_k=draw(st.one_of(st.integers(-2, 300), I32)),
        stop=draw(st.lists(st.text(max_size=8), max_size=3)),
        stop_token_ids=draw(st.lists(I32, max_size=3)), ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):
        s.top_p = draw(FLOATS)
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    req = pb.GenerateRequest(request_id=draw(st.one_of(st.just(""), st.text(max_size=300))), sampling=s)
    kind = draw(st.sampled_from(["text", "ids", "ids_valid", "none"]))
    if kind == "text":
        req.text = draw(st.text(max_size=200))
    elif kind == "ids":
        req.token_ids.ids.extend(draw(st.lists(I32, max_size=200)))
    elif kind == "ids_valid":
        req.token_ids.ids.extend(draw(st.lists(st.integers(0, 258), min_size=1, max_size=200)))
    return req.SerializeToString()


VALID: dict[bytes, int] = {}     # serialized valid request -> the exact number of tokens it must get


@st.composite
def valid(draw):
    """A request inside every limit (prompt <= 128 ids, max_tokens <= 4, ignore_eos): it must
    succeed with exactly max_tokens tokens, whatever the fuzzed requests beside it do."""
    n = draw(st.integers(1, 4))
    s = pb.SamplingOptions(max_tokens=n, temperature=draw(st.sampled_from([0.0, 1e-40, 0.7, 1.5])), ignore_eos=True)
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**63 - 1))
    req = pb.GenerateRequest(sampling=s)
    req.token_ids.ids.extend(draw(st.lists(st.integers(0, 258), min_size=1, max_size=128)))
    raw = req.SerializeToString()
    VALID[raw] = n
    return raw


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def wire(draw):
    """Hand-encoded fields with arbitrary numbers and wire types (wrong types included)."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        field, wtype = draw(st.integers(1, 20)), draw(st.sampled_from([0, 1, 2, 5]))
        out += _varint(field << 3 | wtype)
        if wtype == 0:
            out += _varint(draw(st.integers(-2**63, 2**64 - 1)))
        elif wtype == 1:
            out += struct.pack("<d", draw(FLOATS))
        elif wtype == 5:
            out += struct.pack("<f", draw(st.floats(width=32, allow_nan=True)))
        else:
            payload = draw(st.one_of(st.binary(max_size=40), structured()))
            out += _varint(len(payload)) + payload
    return bytes(out)


REQUESTS = st.one_of(valid(), structured(), wire(), st.binary(max_size=300))


@pytest.fixture(scope="module")
def fuzz_srv(ray_session):
    s = Server({"model": "tiny-llama"}, max_prompt_tokens=128, max_tokens_limit=4, max_pending=64)
    yield s
    s.close()


@pytest.mark.timeout(600)
def test_fuzzed_requests_never_crash_the_server(fuzz_srv):
    seen: Counter = Counter()
    with grpc.insecure_channel(f"127.0.0.1:{fuzz_srv.port}") as ch:
        call = ch.unary_stream("/disagg.v1.Inference/Generate", request_serializer=None, response_deserializer=None)

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
        @given(st.lists(REQUESTS, min_size=BATCH, max_size=BATCH))
        def run(batch):
            calls = [call(raw, timeout=30) for raw in batch]
            for raw, c in zip(batch, calls):
                got = 0
                try:
                    for msg in c:
                        got += len(pb.GenerateResponse.FromString(msg).token_ids)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                seen[code] += 1
                assert code in ALLOWED, (code, c.details() if hasattr(c, "details") else "")
                if raw in VALID:
                    assert code == "OK" and got == VALID[raw], (code, got, VALID[raw])
                    seen["valid_exact"] += 1
        run()
        health = ch.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None)
        assert health(b"", timeout=5) == b"\x08\x01"           # SERVING
    total = sum(v for k, v in seen.items() if k != "valid_exact")
    assert total >= 2000, total
    assert seen["OK"] > 0 and seen["INVALID_ARGUMENT"] > 0 and seen["valid_exact"] > 0, seen
    fuzz_srv.wait_all_free(30)
    record("fuzz", {"requests": total, **dict(seen), "server_crashes": 0})

"""The sampling fields users expect, over gRPC, against the in-process engine; input rules."""
import grpc
import pytest

from cluster.grpc_client import make_request
from engine.sampling_params import SamplingParams
from model.llm import LLM
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.cluster.servers import Server

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def srv(ray_session):
    s = Server({"model": MODEL, "decode": {"num_kv_blocks": 24}, "max_model_len": 128}, max_tokens_limit=100)
    yield s
    s.close()


@pytest.fixture()
def stub(srv):
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        yield pb_grpc.InferenceStub(ch)


def test_n_penalties_logprobs_match_in_process_engine(stub, srv):
    prompt = [5, 6, 7, 8]
    sp = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.8, top_k=40, min_p=0.05, seed=7,
                        presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, logprobs=3, n=2)
    llm = LLM(MODEL)
    from cluster.fanout import child_params
    want = [llm.generate([prompt], child_params(sp, i))[0] for i in range(2)]
    by_index = {0: [], 1: []}
    lps = {0: [], 1: []}
    finished = set()
    for r in stub.Generate(make_request(prompt, sp)):
        by_index[r.index] += list(r.token_ids)
        lps[r.index] += list(r.logprobs)
        if r.finish_reason:
            finished.add(r.index)
            assert r.usage.completion_tokens == 8
    assert finished == {0, 1}
    for i in range(2):
        assert by_index[i] == want[i].token_ids
        assert [e.token_id for e in lps[i]] == want[i].token_ids
        assert [e.logprob for e in lps[i]] == pytest.approx([e["logprob"] for e in want[i].logprobs], abs=1e-4)
        assert all(len(e.top) == 3 for e in lps[i])
    srv.wait_all_free()


def test_tiny_temperature_is_greedy_not_fatal(stub, srv):
    prompt = [9, 10, 11]
    want = LLM(MODEL).generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    sp = pb.SamplingOptions(max_tokens=6, temperature=1e-40, ignore_eos=True)
    got = [t for r in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sp))
           for t in r.token_ids]
    assert got == want
    assert srv.stats()["counters"].get("instance_failures", 0) == 0


@pytest.mark.parametrize("prompt_len,sampling,field,numbers", [
    (29, pb.SamplingOptions(max_tokens=100), "max_tokens", ["100", "29", "128"]),   # 29 + 100 > 128
    (4, pb.SamplingOptions(max_tokens=2**31 - 1), "max_tokens", ["2147483647", "100"]),   # over --max-tokens-limit
    (4, pb.SamplingOptions(stop_token_ids=[259]), "stop_token_ids", ["259"]),
    (4, pb.SamplingOptions(min_p=2.0), "min_p", []),
    (4, pb.SamplingOptions(n=99), "n", []),
    (4, pb.SamplingOptions(logprobs=50), "logprobs", []),
])
def test_input_rules(stub, prompt_len, sampling, field, numbers):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(1, prompt_len + 1))),
                                              sampling=sampling)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field + ":"), e.value.details()
    assert all(num in e.value.details() for num in numbers), e.value.details()

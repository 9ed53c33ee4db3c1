"""A request that makes a step fail fails alone, over gRPC, on a real local cluster: poison
requests (a temperature of 1e-40, and requests whose data make the model step raise in the
prefill or in the decode instance, through the test-only actors of fault_actors.py) sent among
8 normal streams. The 8 complete with the tokens of an undisturbed run, each step poison ends
with INTERNAL and a one-line reason, no instance fails or restarts, every KV block is free."""
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.grpc_client import make_request
from engine.sampling_params import SamplingParams
from model.llm import LLM
from protos import inference_pb2_grpc as pb_grpc
from tests.cluster.fault_actors import POISON_DECODE, POISON_PREFILL, fault_counts, faulty_actor
from tests.cluster.servers import Server, record

MODEL = "tiny-llama"
NORMAL = [[7 + i, 30, 2 * i + 3, 99, 11] * (2 + i) for i in range(8)]
SP = SamplingParams(max_tokens=16, ignore_eos=True)


def _call(port, prompt, sp):
    """(status name, token ids, finish reason or error details) of one streamed Generate."""
    toks, last = [], None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            for r in pb_grpc.InferenceStub(ch).Generate(make_request(prompt, sp), timeout=120):
                toks += r.token_ids
                last = r
        except grpc.RpcError as e:
            return e.code().name, toks, e.details()
    return "OK", toks, last.finish_reason


@pytest.mark.timeout(400)
def test_poison_requests_fail_alone(ray_session):
    llm = LLM(MODEL)
    want = [o.token_ids for o in llm.generate(NORMAL, SP)]
    tiny_t = SamplingParams(max_tokens=6, temperature=1e-40, ignore_eos=True)
    tiny_prompts = [[40 + i, 41, 42] for i in range(10)]
    want_tiny = [o.token_ids for o in llm.generate(tiny_prompts, SamplingParams(max_tokens=6, ignore_eos=True))]
    # 5 poisons fail the prefill step, 5 pass it and fail the decode step, 10 ask for 1e-40.
    steps = [POISON_PREFILL + [i + 3] * (i + 1) for i in range(5)] + [POISON_DECODE + [i + 3] * (i + 1) for i in range(5)]
    actor = faulty_actor(poison_prefill=POISON_PREFILL, poison_decode=POISON_DECODE)
    s = Server({"model": MODEL, "prefill": {"max_batch_tokens": 512}}, actor_cls=actor)
    try:
        jobs = [(p, SP) for p in NORMAL] + [(p, SP) for p in steps] + [(p, tiny_t) for p in tiny_prompts]
        order = list(range(len(jobs)))
        order = order[::3] + order[1::3] + order[2::3]          # poisons interleaved with normal streams
        with ThreadPoolExecutor(len(jobs)) as ex:
            futs = {i: ex.submit(_call, s.port, *jobs[i]) for i in order}
            res = [futs[i].result() for i in range(len(jobs))]
        normal, poison, tiny = res[:8], res[8:18], res[18:]
        assert [r[0] for r in normal] == ["OK"] * 8 and [r[1] for r in normal] == want
        assert all(r[2] == "length" for r in normal)
        for code, toks, details in poison:
            assert code == "INTERNAL", (code, details)
            assert "injected fault" in details and "\n" not in details, details
        assert [r[0] for r in tiny] == ["OK"] * 10 and [r[1] for r in tiny] == want_tiny    # greedy
        fired = fault_counts(s.cluster)
        assert fired["poison"] >= 10, f"every step poison must have made a step raise: {fired}"
        st = s.wait_all_free(30)
        assert st["counters"]["instance_failures"] == 0 and st["counters"]["instance_restarts"] == 0, st["counters"]
        assert st["counters"]["requests_failed_alone"] == 10
        assert all(w["alive"] for w in st["workers"].values())
        with grpc.insecure_channel(f"127.0.0.1:{s.port}") as ch:
            h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert h.status == health_pb2.HealthCheckResponse.SERVING
        # The instance serves on: the normal streams again, undisturbed.
        t0 = time.monotonic()
        again = [_call(s.port, p, SP) for p in NORMAL[:2]]
        assert [r[1] for r in again] == want[:2]
        record("isolation", {"normal_streams": 8, "step_poisons": 10, "tiny_temperature": 10,
                             "tokens_identical": True, "instance_restarts": st["counters"]["instance_restarts"],
                             "failed_alone": st["counters"]["requests_failed_alone"],
                             "faults_fired": fired["poison"], "after_s": time.monotonic() - t0})
    finally:
        s.close()

"""Every plan kind served: colocated instances (prefill-first or chunked) and a mixed plan (a
colocated pool beside a prefill/decode pair) through gRPC give the in-process engine's greedy
tokens; cancels free blocks, a killed colocated instance loses nothing, overload is refused."""
import asyncio
import random
import threading
import time

import grpc
import pytest
import ray

from cluster.grpc_client import make_request
from engine.sampling_params import SamplingParams
from model.llm import LLM
from protos import inference_pb2_grpc as pb_grpc
from tests.cluster.servers import Server

MODEL = "tiny-llama"
N = 12


def _workload(seed, n=N):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.choice([1, 7, 16, 17, 40, 70]))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(1, 20), ignore_eos=True) for _ in range(n)]
    return prompts, params


@pytest.fixture(scope="module")
def reference():
    prompts, params = _workload(0)
    return prompts, params, [o.token_ids for o in LLM(MODEL).generate(prompts, params)]


def _grpc_generate(port, prompts, params, finish="length"):
    """Every request at once, each on its own client thread; token lists in input order."""
    out = [None] * len(prompts)

    def one(i):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            items = list(pb_grpc.InferenceStub(ch).Generate(make_request(prompts[i], params[i]), timeout=120))
        out[i] = [t for it in items for t in it.token_ids]
        assert items[-1].finish_reason == (finish or items[-1].finish_reason) != ""
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.fixture(scope="module")
def colocated(ray_session):
    srv = Server({"model": MODEL, "mode": "colocated", "kv_transfer_timeout_s": 20.0,
                  "colocated": {"num_instances": 2, "schedule": "chunked", "chunk_tokens": 32}})
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def mixed(ray_session):
    srv = Server({"model": MODEL, "mode": "mixed", "kv_transfer_timeout_s": 20.0})
    yield srv
    srv.close()


def test_colocated_plan_serves_the_in_process_engine_tokens(colocated, reference):
    prompts, params, want = reference
    assert _grpc_generate(colocated.port, prompts, params) == want
    st = colocated.wait_all_free()
    steps = {k: w["num_steps"] for k, w in st["workers"].items()}
    assert set(steps) == {"colocated-0", "colocated-1"} and all(steps.values()), \
        f"both colocated instances should have served requests: {steps}"
    health = colocated.run(colocated.cluster.controller.health())
    assert health == {"state": "serving", "roles": {"prefill": 0, "decode": 0, "colocated": 2},
                      "instances": {"colocated-0": "colocated", "colocated-1": "colocated"}}


def test_mixed_plan_routes_to_both_pools_with_identical_tokens(mixed, reference):
    prompts, params, want = reference
    assert _grpc_generate(mixed.port, prompts, params) == want
    st = mixed.wait_all_free()
    steps = {k: w["num_steps"] for k, w in st["workers"].items()}
    assert set(steps) == {"colocated-0", "prefill-0", "decode-0"}
    assert steps["colocated-0"] > 0 and steps["prefill-0"] > 0, f"both routes should have served: {steps}"


def test_cancel_frees_blocks_on_both_routes(mixed):
    prompts, _ = _workload(3, n=8)
    sp = SamplingParams(max_tokens=200, ignore_eos=True)
    got = {}

    def one(i):
        with grpc.insecure_channel(f"127.0.0.1:{mixed.port}") as ch:
            call = pb_grpc.InferenceStub(ch).Generate(make_request(prompts[i], sp), timeout=120)
            n = 0
            for item in call:
                n += len(item.token_ids)
                if n >= 3:
                    call.cancel()
                    break
            got[i] = n
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(3 <= n < 200 for n in got.values()) and len(got) == len(prompts)
    st = mixed.wait_all_free(30)
    assert all(w.get("num_running", 0) == 0 and w.get("num_waiting", 0) == 0 for w in st["workers"].values())


def test_killed_colocated_instance_loses_no_request(colocated):
    prompts, _ = _workload(4, n=10)
    sp = SamplingParams(max_tokens=30, ignore_eos=True)
    want = [o.token_ids for o in LLM(MODEL).generate(prompts, sp)]
    c = colocated.cluster
    victim = c.controller.colocated[0]
    streams = {i: [] for i in range(len(prompts))}
    killed = []

    async def one(i):
        async for item in c.agenerate(prompts[i], sp, request_id=f"k{i}"):
            streams[i] += item.token_ids
            if item.finish_reason is not None:
                assert item.finish_reason == "length", item
            if not killed and sum(len(v) >= 3 for v in streams.values()) >= 3:
                killed.append(time.monotonic())
                ray.kill(victim.driver, no_restart=True)
        return streams[i]

    async def all_of():
        return await asyncio.gather(*[one(i) for i in range(len(prompts))])
    got = colocated.run(all_of(), timeout=240)
    assert killed, "the colocated actor was killed mid-stream"
    assert got == want, "every request completed with the tokens of an undisturbed run"
    deadline = time.monotonic() + 120
    while not (c.controller.colocated[0] is not victim and c.controller.colocated[0].alive):
        assert time.monotonic() < deadline, "the colocated instance was not restarted"
        time.sleep(0.5)
    st = colocated.wait_all_free(30)
    assert st["counters"]["instance_failures"] >= 1 and st["counters"]["instance_restarts"] >= 1
    assert _grpc_generate(colocated.port, prompts[:3], [sp] * 3) == want[:3], "the restarted pool serves"


def test_overload_is_refused_as_for_disaggregated_plans(ray_session):
    srv = Server({"model": MODEL, "mode": "colocated", "colocated": {"max_queue": 2, "num_kv_blocks": 24}},
                 max_pending=2)
    try:
        counts: dict[str, int] = {}
        lock = threading.Lock()
        stop_at = time.monotonic() + 4.0
        sp = SamplingParams(max_tokens=16, ignore_eos=True)

        def client(k):
            with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub, i = pb_grpc.InferenceStub(ch), 0
                while time.monotonic() < stop_at:
                    try:
                        list(stub.Generate(make_request([(k * 7 + i) % 250 + 3] * 40, sp), timeout=60))
                        code = "OK"
                    except grpc.RpcError as e:
                        code = e.code().name
                        time.sleep(0.02)
                    with lock:
                        counts[code] = counts.get(code, 0) + 1
                    i += 1
        threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED"}, counts
        assert counts.get("RESOURCE_EXHAUSTED", 0) > 0 and counts.get("OK", 0) > 0, counts
        st = srv.wait_all_free(30)
        assert st["num_pending"] == 0
    finally:
        srv.close()

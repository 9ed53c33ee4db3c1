"""Prefix-aware routing among colocated instances on a real cluster (Ray, gRPC, the embedded
model, two colocated instances): cold first turns are spread, and every follow-up turn goes to
the instance holding its history and hits its prefix cache. Tokens equal the in-process
engine's, every request finishes, and the hit-rate gauge covers colocated instances."""
import grpc

from cluster.grpc_client import make_request
from protos import inference_pb2_grpc as pb_grpc
from tests.cluster.servers import Server
from tests.cluster.test_prefix_routing import CONVS, MODEL, TURNS, _requests, _turn_len, reference  # noqa: F401

INSTANCES = ("colocated-0", "colocated-1")


def test_colocated_follow_up_turns_go_to_their_history(ray_session, reference):  # noqa: F811
    srv = Server({"model": MODEL, "mode": "colocated", "routing": "prefix",
                  "colocated": {"num_instances": 2, "num_kv_blocks": 64}})
    try:
        prompts, params = _requests()
        tokens, cached = [], []
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            for p, sp in zip(prompts, params):      # one at a time: every queue is empty at each choice
                items = list(stub.Generate(make_request(p, sp), timeout=60))
                assert items[-1].finish_reason == "length"
                tokens.append([t for it in items for t in it.token_ids])
                cached.append(items[-1].usage.cached_tokens)
        st = srv.wait_all_free()        # nothing tracked or held: no request lost
        gauge = {i: srv.metrics.registry.get_sample_value("disagg_prefix_hit_rate", {"instance": i})
                 for i in INSTANCES}
    finally:
        srv.close()
    assert tokens == reference
    want = [0] * CONVS + [_turn_len(t - 1) for t in range(1, TURNS) for _ in range(CONVS)]
    assert cached == want
    per = st["prefix_cache"]
    assert set(per) == set(INSTANCES), per          # the cold turns were spread over both
    assert sum(v["hit_tokens"] for v in per.values()) == sum(want)
    assert sum(v["prompt_tokens"] for v in per.values()) == sum(len(p) for p in prompts)
    for inst in INSTANCES:
        assert gauge[inst] == per[inst]["hit_rate"]
    assert st["routing"] == "prefix"

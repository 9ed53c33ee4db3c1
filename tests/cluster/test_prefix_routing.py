"""Prefix-aware routing on a real cluster (Ray, gRPC, the embedded model, two prefill
instances): a conversation's follow-up turns go to the prefill instance that holds its history
and hit its prefix cache; with routing "load" the same requests hit less. Tokens equal the
in-process engine's in both, and every request finishes."""
import random

import grpc
import pytest

from cluster.grpc_client import make_request
from engine.sampling_params import SamplingParams
from model.llm import LLM
from protos import inference_pb2_grpc as pb_grpc
from tests.cluster.servers import Server

MODEL = "embedded"
CONVS, TURNS = 3, 3


def _turn_len(t):
    return 64 + 48 * t          # each turn extends the previous one by 3 blocks of 16 tokens


def _requests():
    """Turn t of conversation c is the first _turn_len(t) tokens of c's history, turns in order
    of rounds (every conversation's turn 0, then every turn 1, ...)."""
    rng = random.Random(7)
    history = [[rng.randrange(3, 256) for _ in range(_turn_len(TURNS - 1))] for _ in range(CONVS)]
    prompts = [history[c][:_turn_len(t)] for t in range(TURNS) for c in range(CONVS)]
    return prompts, [SamplingParams(max_tokens=4, ignore_eos=True) for _ in prompts]


@pytest.fixture(scope="module")
def reference():
    prompts, params = _requests()
    return [o.token_ids for o in LLM(MODEL).generate(prompts, params)]


def _serve_one_at_a_time(routing):
    """Send the requests one after another (every queue empty at each choice); returns
    (tokens, cached tokens per request, controller stats, hit-rate gauge per instance)."""
    srv = Server({"model": MODEL, "routing": routing, "prefill": {"num_instances": 2, "num_kv_blocks": 64},
                  "decode": {"num_kv_blocks": 64}})
    try:
        prompts, params = _requests()
        tokens, cached = [], []
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            for p, sp in zip(prompts, params):
                items = list(stub.Generate(make_request(p, sp), timeout=60))
                assert items[-1].finish_reason == "length"
                tokens.append([t for it in items for t in it.token_ids])
                cached.append(items[-1].usage.cached_tokens)
        st = srv.wait_all_free()
        gauge = {i: srv.metrics.registry.get_sample_value("disagg_prefix_hit_rate", {"instance": i})
                 for i in ("prefill-0", "prefill-1")}
        return tokens, cached, st, gauge
    finally:
        srv.close()


# Two cluster start-ups (one per routing): 67 s at load average ~20 on the shared 2-core machine.
@pytest.mark.slow
def test_prefix_routing_sends_turns_to_their_history_and_hits_more_than_load(ray_session, reference):
    tok_p, cached_p, st_p, gauge_p = _serve_one_at_a_time("prefix")
    tok_l, cached_l, st_l, _ = _serve_one_at_a_time("load")
    assert tok_p == reference and tok_l == reference
    # Prefix routing: every follow-up turn finds all of the previous turn's blocks cached.
    want = [0] * CONVS + [_turn_len(t - 1) for t in range(1, TURNS) for _ in range(CONVS)]
    assert cached_p == want
    assert sum(cached_l) < sum(cached_p), (cached_l, cached_p)
    prompt_tokens = sum(len(p) for p in _requests()[0])

    def rate(st):
        per = st["prefix_cache"]
        assert set(per) == {"prefill-0", "prefill-1"}, per      # both instances served
        return sum(v["hit_tokens"] for v in per.values()) / prompt_tokens
    assert rate(st_p) == pytest.approx(sum(want) / prompt_tokens)
    assert rate(st_p) > rate(st_l) + 0.15
    assert st_p["routing"] == "prefix" and st_l["routing"] == "load"
    for inst, g in gauge_p.items():
        assert g == pytest.approx(st_p["prefix_cache"][inst]["hit_rate"])

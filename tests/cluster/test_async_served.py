"""Async scheduling in the served workers (a plan's `async_scheduling`): a mixed plan (a
colocated instance beside a prefill/decode pair) with it on streams the in-process engine's
sync tokens through gRPC — max_tokens and stop tokens exact — and both the colocated and the
decode instance really ran steps one ahead."""
import random

from engine.sampling_params import SamplingParams
from model.llm import LLM
from tests.cluster.servers import Server
from tests.cluster.test_roles import _grpc_generate

MODEL = "tiny-llama"


def test_mixed_plan_with_async_scheduling_serves_sync_tokens(ray_session):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.choice([3, 16, 17, 40]))] for _ in range(10)]
    params = [SamplingParams(max_tokens=rng.randint(1, 24), ignore_eos=True) for _ in prompts]
    free = [o.token_ids for o in LLM(MODEL, async_scheduling=False).generate(prompts, params)]
    # Half the requests stop on a token they produce midway: no token may follow it.
    for i in range(0, len(prompts), 2):
        if len(free[i]) > 4:
            params[i] = SamplingParams(max_tokens=params[i].max_tokens, stop_token_ids=[free[i][3]], ignore_eos=True)
    want = [o.token_ids for o in LLM(MODEL, async_scheduling=False).generate(prompts, params)]
    on = {"async_scheduling": True}
    srv = Server({"model": MODEL, "mode": "mixed", "kv_transfer_timeout_s": 20.0, "colocated": on, "decode": on})
    try:
        got = _grpc_generate(srv.port, prompts, params, finish=None)
        got += _grpc_generate(srv.port, prompts, params, finish=None)      # both routes see work
        assert got == want + want
        st = srv.wait_all_free()["workers"]
        for name in ("colocated-0", "decode-0"):
            assert st[name]["async_scheduling"] and st[name]["num_overlapped_steps"] > 0, (name, st[name])
        assert not st["prefill-0"].get("async_scheduling")
    finally:
        srv.close()

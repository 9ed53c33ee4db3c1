"""No token is ever dropped: 500 short requests, arriving while others decode, through a real
local cluster with a small decode cache (so requests wait for blocks and are preempted and
recomputed mid-decode). Every output has exactly the asked length and the in-process engine's
tokens."""
import asyncio
import random

import pytest

from cluster.api import Cluster
from engine.plan import Plan
from engine.sampling_params import SamplingParams
from model.llm import LLM
from tests.cluster.servers import record

MODEL = "tiny-llama"
N = 500


def _workload(seed=7):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 40))] for _ in range(N)]
    # Greedy and seeded sampling alike: a seeded request's tokens do not depend on batching.
    params = [SamplingParams(max_tokens=rng.randint(1, 8), ignore_eos=True,
                             **({"temperature": 0.8, "seed": i} if i % 2 else {})) for i in range(N)]
    return prompts, params


@pytest.mark.timeout(300)
def test_500_short_requests_have_exact_lengths(ray_session):
    prompts, params = _workload()
    want = [o.token_ids for o in LLM(MODEL).generate(prompts, params)]
    assert [len(w) for w in want] == [p.max_tokens for p in params]
    plan = Plan.from_dict({"model": MODEL, "prefill": {"max_batch_tokens": 256},
                           "decode": {"num_kv_blocks": 24, "max_batch_size": 16}})
    with Cluster.start(plan) as c:
        got, reasons, usage = {}, {}, {}

        async def one(i):
            await asyncio.sleep(0.004 * i)          # a stream of arrivals, not one burst
            toks = []
            async for item in c.agenerate(prompts[i], params[i], request_id=f"x{i}"):
                toks += item.token_ids
                if item.finish_reason is not None:
                    reasons[i], usage[i] = item.finish_reason, item.usage["completion_tokens"]
            got[i] = toks

        async def all_of():
            await asyncio.gather(*[one(i) for i in range(N)])
        c._run(all_of(), timeout=240)
        lengths = [len(got[i]) for i in range(N)]
        wrong = [(i, lengths[i], params[i].max_tokens) for i in range(N) if lengths[i] != params[i].max_tokens]
        assert not wrong, f"{len(wrong)} outputs of the wrong length (index, got, asked): {wrong[:10]}"
        assert all(reasons[i] == "length" and usage[i] == lengths[i] for i in range(N))
        assert [got[i] for i in range(N)] == want, "tokens differ from the in-process engine"
        st = c.stats()
        for name, w in st["workers"].items():
            assert w["free_blocks"] == w["num_blocks"], f"{name} leaks blocks: {w}"
        preemptions = st["workers"]["decode-0"]["num_preemptions"]
        assert preemptions > 0, "the small decode cache should preempt and recompute some requests"
        record("exact_lengths", {"requests": N, "wrong_lengths": len(wrong), "tokens": sum(lengths),
                                 "decode_preemptions": preemptions})


@pytest.mark.timeout(180)
def test_first_decode_tokens_before_start_reply_are_kept(ray_session):
    """The race that used to drop a token: the decode instance streams a request's first decode
    tokens before the controller has the reply to start_decode. Here every reply comes 0.3 s
    late, so several steps' tokens always arrive first; none may be lost."""
    from tests.cluster.fault_actors import fault_counts, faulty_actor
    prompts, params = _workload(3)
    prompts, params = prompts[:12], [SamplingParams(max_tokens=6, ignore_eos=True)] * 12
    want = [o.token_ids for o in LLM(MODEL).generate(prompts, params)]
    plan = Plan.from_dict({"model": MODEL})
    with Cluster.start(plan, actor_cls=faulty_actor(start_reply_delay_s=0.3)) as c:
        got = [o.token_ids for o in c.generate(prompts, params, timeout=120)]
        assert fault_counts(c)["start_reply_delay"] == 12, "every start_decode reply was late"
        assert got == want

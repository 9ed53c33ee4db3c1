"""The disaggregated runtime on a local Ray cluster (CPU, gloo): token identity with the
in-process engine under several plans, streaming, block accounting, transfer faults."""
import asyncio
import random
import time

import pytest

from cluster.api import Cluster
from engine.plan import Plan
from engine.sampling_params import SamplingParams
from model.llm import LLM

MODEL = "tiny-llama"
N_REQUESTS = 16


def _prompts(seed=0, n=N_REQUESTS):
    rng = random.Random(seed)
    lengths = [rng.choice([1, 3, 15, 16, 17, 31, 40, 64, 90]) for _ in range(n)]
    return [[rng.randrange(3, 256) for _ in range(k)] for k in lengths]


def _params(n=N_REQUESTS, seed=0):
    rng = random.Random(seed)
    return [SamplingParams(max_tokens=rng.randint(1, 24), ignore_eos=True) for _ in range(n)]


@pytest.fixture(scope="module")
def reference():
    llm = LLM(MODEL)
    return {s: [o.token_ids for o in llm.generate(_prompts(s), _params(seed=s))] for s in (0, 1)}


def _plan(**kw):
    base = {"model": MODEL, "kv_transfer_timeout_s": 20.0}
    base.update(kw)
    return Plan.from_dict(base)


def _all_free(stats):
    for name, w in stats["workers"].items():
        assert w["free_blocks"] == w["num_blocks"], f"{name} leaks blocks: {w}"
        assert w.get("num_held", 0) == 0 and w.get("num_reserved", 0) == 0 and w.get("num_running", 0) == 0


PLANS = {
    "1P+1D": {},
    "1P(TP2)+1D": {"prefill": {"tp": 2}},
    "1P+1D(TP2)": {"decode": {"tp": 2}},
    "2P+1D": {"prefill": {"num_instances": 2}},
}


@pytest.mark.parametrize("name", list(PLANS))
def test_greedy_outputs_match_in_process_engine(ray_session, reference, name):
    with Cluster.start(_plan(**PLANS[name])) as c:
        got = [o.token_ids for o in c.generate(_prompts(0), _params(seed=0), timeout=180)]
        assert got == reference[0]
        stats = c.stats()
        _all_free(stats)
        if name == "2P+1D":
            steps = [w["num_steps"] for k, w in stats["workers"].items() if k.startswith("prefill")]
            assert all(s > 0 for s in steps), f"both prefill instances should have served requests: {steps}"


@pytest.fixture(scope="module")
def cluster(ray_session):
    from tests.cluster.fault_actors import FaultInjectingRankActor
    with Cluster.start(_plan(kv_transfer_timeout_s=3.0), actor_cls=FaultInjectingRankActor) as c:
        yield c


def test_first_token_streams_before_finish_and_cancel_frees_blocks(cluster, reference):
    prompts, params = _prompts(1), [SamplingParams(max_tokens=40, ignore_eos=True) for _ in range(N_REQUESTS)]
    cancel_ids = set(range(0, N_REQUESTS, 4))

    async def one(i):
        arrivals, cancelled = [], False
        async for item in cluster.agenerate(prompts[i], params[i], request_id=f"s{i}"):
            arrivals.append((time.monotonic(), item))
            if i in cancel_ids and len(arrivals) == 3:
                await cluster.acancel(f"s{i}")
                cancelled = True
        return arrivals, cancelled

    async def all_of():
        return await asyncio.gather(*[one(i) for i in range(N_REQUESTS)])
    results = cluster._run(all_of(), timeout=180)
    for i, (arrivals, cancelled) in enumerate(results):
        first_t, first = arrivals[0]
        last_t, last = arrivals[-1]
        assert first.token_ids and first.finish_reason is None, "the first item carries the first token"
        assert first_t < last_t, "the first token reached the caller before the request finished"
        tokens = [t for _, it in arrivals for t in it.token_ids]
        if cancelled:
            assert last.finish_reason == "cancelled" and 3 <= len(tokens) < 40
        else:
            assert last.finish_reason == "length" and len(tokens) == 40
        assert last.usage["completion_tokens"] == len(tokens)
        assert {"ttft_s", "prefill_queue_s", "prefill_compute_s", "kv_transfer_s"} <= set(last.timings)
    deadline = time.monotonic() + 10
    while True:
        try:
            _all_free(cluster.stats())
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_transfer_timeout_retries_and_channel_recovers(cluster):
    import ray
    p = cluster.controller.prefills[0]
    before = dict(cluster.controller.counters)
    ray.get(p.driver.inject_fault.remote("send_delay_s", 6.0))       # longer than the 3 s timeout
    prompt = list(range(5, 45))
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    want = LLM(MODEL).generate([prompt, prompt[::-1]], sp)
    t0 = time.monotonic()
    out = cluster.generate([prompt], sp, timeout=120)[0]
    hang_s = time.monotonic() - t0
    assert out.token_ids == want[0].token_ids and out.finish_reason == "length"
    after = cluster.controller.counters
    assert after["kv_transfer_failures"] > before["kv_transfer_failures"]
    assert after["channel_rebuilds"] > before["channel_rebuilds"]
    nxt = cluster.generate([prompt[::-1]], sp, timeout=60)[0]        # same channel, rebuilt
    assert nxt.token_ids == want[1].token_ids
    time.sleep(7)            # let the delayed sender wake up and find its channel closed
    _all_free(cluster.stats())
    from tests.cluster.servers import record
    record("transfer_hang", {"injected_delay_s": 6.0, "timeout_s": 3.0, "lost": 0, "tokens_identical": True,
                             "request_latency_s": hang_s, "next_request_ok": True,
                             "channel_rebuilds": after["channel_rebuilds"] - before["channel_rebuilds"]})

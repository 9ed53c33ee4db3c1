"""Worker death: requests recomputed elsewhere with identical tokens, instances restarted."""
import asyncio
import random
import time

import pytest
import ray

from cluster.api import Cluster
from engine.plan import Plan
from engine.sampling_params import SamplingParams
from model.llm import LLM
from tests.cluster.servers import record

MODEL = "tiny-llama"


def _workload(seed, n=16, lo=5, hi=90, max_tokens=40):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def _run_with_kill(c: Cluster, prompts, sp, kill, when):
    """Stream every request; call kill() once when(streams) is true. Returns token lists."""
    streams = {i: [] for i in range(len(prompts))}
    killed = {}

    async def one(i):
        async for item in c.agenerate(prompts[i], sp, request_id=f"f{i}"):
            streams[i] += item.token_ids
            if item.finish_reason is not None:
                assert item.finish_reason == "length", item
            if not killed and when(streams):
                killed["t"] = time.monotonic()
                kill()
        return streams[i]

    async def all_of():
        return await asyncio.gather(*[one(i) for i in range(len(prompts))])
    try:
        return c._run(all_of(), timeout=240), killed
    except TimeoutError:
        from cluster.controller import describe
        state = "\n".join(describe(t) for t in c.controller.tracked.values())
        raise AssertionError(f"requests did not finish; stats {c.stats()}\n{state}") from None


def _wait_back(c: Cluster, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = c.stats()
        if all(w.get("alive") and w.get("free_blocks") == w.get("num_blocks") for w in st["workers"].values()) \
                and not st["num_tracked"]:
            return st
        time.sleep(0.5)
    raise AssertionError(f"pool not back to full strength: {c.stats()}")


@pytest.mark.timeout(400)
def test_decode_death_mid_stream(ray_session):
    prompts, sp = _workload(0)
    want = [o.token_ids for o in LLM(MODEL).generate(prompts, sp)]
    plan = Plan.from_dict({"model": MODEL, "decode": {"num_instances": 2}})
    with Cluster.start(plan) as c:
        victim = c.controller.decodes[0]
        got, killed = _run_with_kill(c, prompts, sp, lambda: ray.kill(victim.driver, no_restart=True),
                                     lambda s: sum(len(v) >= 3 for v in s.values()) >= 4)
        assert killed, "the decode actor was killed mid-stream"
        assert got == want, "every request completed with the tokens of an undisturbed run"
        st = _wait_back(c)
        assert st["counters"]["instance_failures"] >= 1 and st["counters"]["instance_restarts"] >= 1
        assert c.controller.decodes[0] is not victim and c.controller.decodes[0].alive
        again = c.generate(prompts[:4], sp, timeout=120)        # the restarted pool serves
        assert [o.token_ids for o in again] == want[:4]
        record("decode_death", {"requests": len(prompts), "lost": 0, "tokens_identical": True,
                                "recovery_s": c.controller.monitor.recovery_s,
                                "retries": st["counters"]["retries"]})


@pytest.mark.timeout(400)
def test_prefill_death_with_queued_requests(ray_session):
    prompts, sp = _workload(1, lo=60, hi=120, max_tokens=8)
    want = [o.token_ids for o in LLM(MODEL).generate(prompts, sp)]
    plan = Plan.from_dict({"model": MODEL, "prefill": {"num_instances": 2, "max_batch_tokens": 32}})
    with Cluster.start(plan) as c:
        victim = c.controller.prefills[0]

        def queued(_):
            return sum(t.phase == "prefill" and t.prefill is victim for t in c.controller.tracked.values()) >= 3
        got, killed = _run_with_kill(c, prompts, sp, lambda: ray.kill(victim.driver, no_restart=True), queued)
        if not killed:             # every request streamed before the queue built up: kill now, rerun
            ray.kill(victim.driver, no_restart=True)
            got = [o.token_ids for o in c.generate(prompts, sp, timeout=240)]
        assert got == want
        st = _wait_back(c)
        assert st["counters"]["instance_restarts"] >= 1 and c.controller.prefills[0].alive
        record("prefill_death", {"requests": len(prompts), "lost": 0, "tokens_identical": True,
                                 "recovery_s": c.controller.monitor.recovery_s,
                                 "retries": st["counters"]["retries"]})


@pytest.mark.timeout(300)
def test_no_instance_left_gives_a_clear_error(ray_session):
    from cluster import health
    plan = Plan.from_dict({"model": MODEL})
    with Cluster.start(plan) as c:
        c.controller.monitor.restarts["decode-0"] = health.MAX_RESTARTS    # the next failure is final
        ray.kill(c.controller.decodes[0].driver, no_restart=True)
        deadline = time.monotonic() + 30
        while c.controller.decodes[0].instance_id not in c.controller.monitor.given_up:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        from engine.errors import RequestFailedError
        t0 = time.monotonic()
        with pytest.raises(RequestFailedError, match="no prefill or decode instance"):
            c.generate([[5, 6, 7]], SamplingParams(max_tokens=4), timeout=30)
        assert time.monotonic() - t0 < 5

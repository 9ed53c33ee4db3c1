"""Worker death: requests recomputed elsewhere with identical tokens, instances restarted
within a restart budget per window. Every fault test checks that its trigger fired: a scenario
that did not happen fails instead of passing as a milder one."""
import asyncio
import random
import time

import pytest
import ray

from cluster.api import Cluster
from engine.plan import Plan
from engine.sampling_params import SamplingParams
from model.llm import LLM
from tests.cluster.fault_actors import faulty_actor
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
    # Slow prefill steps (0.2 s each), so a queue builds on the victim before it is killed.
    with Cluster.start(plan, actor_cls=faulty_actor(prefill_step_delay_s=0.2)) as c:
        victim = c.controller.prefills[0]
        seen = {"queued": 0}

        def queued(_):
            from engine.request import RequestState
            n = sum(t.state is RequestState.PREFILLING and t.prefill is victim for t in c.controller.tracked.values())
            seen["queued"] = max(seen["queued"], n)
            return n >= 3
        got, killed = _run_with_kill(c, prompts, sp, lambda: ray.kill(victim.driver, no_restart=True), queued)
        assert killed, f"the prefill instance was never killed with 3 requests queued (at most {seen['queued']})"
        assert got == want
        st = _wait_back(c)
        assert st["counters"]["instance_restarts"] >= 1 and c.controller.prefills[0].alive
        record("prefill_death", {"requests": len(prompts), "lost": 0, "tokens_identical": True,
                                 "recovery_s": c.controller.monitor.recovery_s,
                                 "retries": st["counters"]["retries"]})


def _wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.mark.timeout(300)
def test_restart_budget_is_per_window_and_a_down_phase_comes_back(ray_session):
    """max_restarts=1 per 15 s: the first death restarts at once; the second, inside the
    window, leaves decode down (health not_serving, requests fail fast and clearly); when the
    window allows, it is restarted and serves again."""
    from engine.errors import RequestFailedError
    plan = Plan.from_dict({"model": MODEL, "max_restarts": 1, "restart_window_s": 15.0, "restart_backoff_s": 0.5})
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    want = [o.token_ids for o in LLM(MODEL).generate([[5, 6, 7]], sp)]
    with Cluster.start(plan) as c:
        ctl = c.controller
        health = lambda: c._run(ctl.health())  # noqa: E731
        ray.kill(ctl.decodes[0].driver, no_restart=True)
        _wait(lambda: ctl.counters["instance_restarts"] == 1 and ctl.decodes[0].alive, 60, "first restart")
        first = time.monotonic()
        assert [o.token_ids for o in c.generate([[5, 6, 7]], sp, timeout=60)] == want
        ray.kill(ctl.decodes[0].driver, no_restart=True)
        _wait(lambda: "decode-0" in ctl.monitor.down, 30, "decode-0 should be down: its budget is spent")
        assert health()["state"] == "not_serving" and health()["roles"]["decode"] == 0
        t0 = time.monotonic()
        with pytest.raises(RequestFailedError, match="no prefill or decode instance"):
            c.generate([[5, 6, 7]], sp, timeout=30)
        assert time.monotonic() - t0 < 5
        _wait(lambda: ctl.decodes[0].alive, 60, "decode-0 should come back when the window allows")
        back = time.monotonic()
        assert back - first >= 15 - 1, "restarted before the window allowed"
        assert health()["state"] == "serving" and ctl.counters["instance_restarts"] == 2
        assert [o.token_ids for o in c.generate([[5, 6, 7]], sp, timeout=60)] == want
        record("restart_budget", {"max_restarts": 1, "restart_window_s": 15.0,
                                  "down_for_s": back - t0, "second_restart_after_first_s": back - first})


def test_restart_budget_backoff_and_window():
    from cluster.health import MAX_BACKOFF_S, RestartBudget
    b = RestartBudget(max_restarts=3, window_s=100.0, backoff_s=1.0)
    assert b.wait_s(0.0) == (0.0, 0.0)              # the first restart: at once
    b.record(0.0)
    assert b.wait_s(1.0) == (0.0, 1.0)              # then backoff, doubling
    b.record(2.0)
    assert b.wait_s(3.0, failed_tries=1) == (0.0, 4.0)
    b.record(8.0)
    room, _ = b.wait_s(10.0)
    assert room == pytest.approx(90.0)              # budget spent until the first leaves the window
    assert b.wait_s(100.0)[0] == 0.0 and len(b.times) == 2
    assert RestartBudget(1, 10.0, 5.0).wait_s(0.0, failed_tries=30) == (0.0, MAX_BACKOFF_S)


@pytest.mark.parametrize("field,value", [("max_restarts", -1), ("max_restarts", 1.5), ("restart_window_s", 0),
                                         ("restart_backoff_s", -1.0)])
def test_restart_fields_are_validated(field, value):
    from engine.errors import ConfigError
    with pytest.raises(ConfigError, match=field):
        Plan.from_dict({field: value})

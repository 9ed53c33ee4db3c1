"""Role change while serving (issue 19): instances flip between prefill, decode and colocated
under load with no request lost and the in-process engine's greedy tokens; a KV transfer in
flight when its prefill or decode instance flips completes (or is retried); weights and KV cache
memory stay where they were (no loader runs); bad input gets clear gRPC/CLI errors.

One cluster for the module: prefill-0 (TP2, so follower ranks switch too), decode-0, decode-1.
"""
import asyncio
import random
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from cluster.roles import RoleChangeError
from engine.request import RequestState
from engine.sampling_params import SamplingParams
from model.llm import LLM
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.cluster.fault_actors import FaultInjectingRankActor
from tests.cluster.serve_proc import ENV
from tests.cluster.servers import Server

MODEL = "tiny-llama"
TOKEN = "role-admin-token"
SEND_DELAY_S = 2.0


@pytest.fixture(scope="module")
def srv(ray_session):
    s = Server({"model": MODEL, "kv_transfer_timeout_s": 20.0,
                "prefill": {"tp": 2, "num_kv_blocks": 96}, "decode": {"num_instances": 2, "num_kv_blocks": 96}},
               auth_token=TOKEN, actor_cls=FaultInjectingRankActor)
    yield s
    s.close()


def _roles(srv) -> dict:
    return srv.run(srv.cluster.controller.health())["instances"]


def _fingerprints(srv) -> dict:
    import ray
    return {(i.instance_id, k): fp for i in srv.cluster.controller.instances
            for k, fp in enumerate(ray.get([r.fingerprint.remote() for r in i.ranks]))}


def _inst(srv, iid):
    return next(i for i in srv.cluster.controller.instances if i.instance_id == iid)


async def _wait_for(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def test_flips_under_load_lose_nothing_and_keep_tokens_and_weights(srv):
    rng = random.Random(7)
    pool = 80
    prompts = [[rng.randrange(3, 256) for _ in range(rng.choice([5, 16, 17, 33, 60]))] for _ in range(pool)]
    params = [SamplingParams(max_tokens=rng.randint(20, 48), ignore_eos=True) for _ in range(pool)]
    c = srv.cluster
    ctl = c.controller
    before = _fingerprints(srv)
    flips = [("decode-1", "prefill"), ("prefill-0", "decode"), ("decode-0", "colocated"), ("decode-0", "decode")]
    done = []

    async def one(i):
        out, last = [], None
        async for item in c.agenerate(prompts[i], params[i], request_id=f"load-{i}"):
            out += item.token_ids
            last = item
        assert last.finish_reason == "length" and not last.error, last
        return out

    async def flip_all():
        for iid, role in flips:
            inst = _inst(srv, iid)
            if inst.role in ("decode", "colocated"):
                # Flip while it decodes, so the hand-over path runs, not an idle switch.
                await _wait_for(lambda: any(t.decode is inst and t.state is RequestState.DECODING
                                            for t in ctl.tracked.values()), 30, f"a request decoding on {iid}")
            t0 = time.monotonic()
            await ctl.change_role(iid, role, reason="test: steady load")
            done.append((iid, role, time.monotonic() - t0))

    async def run():
        # Steady arrivals, from before the first flip until after the last one.
        flipper = asyncio.ensure_future(flip_all())
        tasks = []
        while len(tasks) < pool and (not flipper.done() or len(tasks) < 12):
            tasks.append(asyncio.ensure_future(one(len(tasks))))
            await asyncio.sleep(0.08)
        await flipper
        return await asyncio.gather(*tasks)

    got = srv.run(run(), timeout=240)
    want = [o.token_ids for o in LLM(MODEL).generate(prompts[:len(got)], params[:len(got)])]
    assert [d[:2] for d in done] == flips
    assert got == want, "every request completed with the in-process engine's tokens"
    st = srv.wait_all_free(30)
    assert st["counters"]["instance_failures"] == 0 and st["counters"]["requests_failed_alone"] == 0
    history = st["role_changes"][-len(flips):]
    assert sum(h["handed_over"] for h in history) >= 1, history
    assert _roles(srv) == {"prefill-0": "decode", "decode-0": "decode", "decode-1": "prefill"}
    assert {k: w["role"] for k, w in st["workers"].items()} == _roles(srv)
    # Same processes, same weight and KV cache tensors, no runtime (weight loader) built again.
    assert _fingerprints(srv) == before
    srv.metrics.update_from_stats(st)
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.http.server_port}/metrics", timeout=5).read().decode()
    assert 'disagg_instance_role{instance="decode-1",role="prefill"} 1.0' in text
    assert 'disagg_instance_role{instance="decode-1",role="decode"} 0.0' in text
    assert 'disagg_role_changes_total{from_role="decode",to_role="colocated"} 1.0' in text
    print(f"{len(got)} requests; flip seconds:", [(iid, role, round(s, 3)) for iid, role, s in done])


def _transfer_in_flight_then_flip(srv, pick_instance, role, prompt, sp):
    """Delay every prefill rank's next KV send, submit one request, flip the instance chosen by
    `pick_instance(tracked)` once the request's KV is in flight. Returns (tokens, flip record)."""
    import ray
    c = srv.cluster
    ctl = c.controller
    for p in ctl.prefills:
        ray.get([r.inject_fault.remote("send_delay_s", SEND_DELAY_S) for r in p.ranks])

    async def run():
        t = await c.submit(prompt, sp, request_id=f"inflight-{role}")
        await _wait_for(lambda: t.state is RequestState.TRANSFERRING, 30, "the KV transfer to start")
        target = pick_instance(t)
        flip = asyncio.ensure_future(ctl.roles.change(target.instance_id, role, "test: transfer in flight"))
        out = []
        async for item in ctl.stream(t):
            out += item.token_ids
            assert not item.error, item.error
        return out, await flip, target

    try:
        return srv.run(run(), timeout=120)
    finally:
        for p in ctl.prefills:
            ray.get([r.inject_fault.remote("send_delay_s", 0.0) for r in p.ranks])


def test_flip_while_kv_transfer_in_flight_completes_it(srv):
    ctl = srv.cluster.controller
    srv.run(ctl.change_role("prefill-0", "prefill", "test: two prefill instances"))
    prompt, sp = list(range(5, 45)), SamplingParams(max_tokens=12, ignore_eos=True)
    want = LLM(MODEL).generate([prompt], sp)[0].token_ids
    c0 = dict(srv.stats()["counters"])
    # The prefill instance whose KV is leaving becomes a decode instance: its transfer finishes first.
    got, change, flipped = _transfer_in_flight_then_flip(srv, lambda t: t.prefill, "decode", prompt, sp)
    assert got == want
    c1 = srv.stats()["counters"]
    assert c1["kv_transfer_failures"] == c0["kv_transfer_failures"] and c1["retries"] == c0["retries"], \
        "the in-flight transfer completed (no retry)"
    assert change.drain_s >= SEND_DELAY_S * 0.5, f"the flip waited for the transfer: {change}"
    assert flipped.role == "decode"
    # The decode instance receiving the KV becomes a prefill instance: the KV lands, then the
    # request is handed over (recomputed elsewhere) and its stream goes on.
    got, change, flipped = _transfer_in_flight_then_flip(srv, lambda t: t.decode, "prefill", prompt, sp)
    assert got == want
    assert change.handed_over == 1 and flipped.role == "prefill", change
    srv.wait_all_free(30)


def _admin(port, token=TOKEN):
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    return ch, pb_grpc.AdminStub(ch), (("authorization", f"Bearer {token}"),) if token else None


def _cli(srv, *args):
    return subprocess.run([sys.executable, "-m", "cluster.cli", "roles", "--server", f"127.0.0.1:{srv.auth_port}",
                           *args], env=dict(ENV, DISAGG_TOKEN=TOKEN), capture_output=True, text=True, timeout=120)


def test_admin_rpc_and_cli_refuse_bad_input_clearly(srv):
    ctl = srv.cluster.controller
    ch, stub, md = _admin(srv.auth_port)
    with ch:
        with pytest.raises(grpc.RpcError) as e:
            stub.ListInstances(pb.ListInstancesRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = {i.instance_id: i.role for i in stub.ListInstances(pb.ListInstancesRequest(), metadata=md).instances}
        assert listed == _roles(srv)
        # One decode instance is left after the tests above; it cannot become a prefill one
        # (no colocated instance either).
        assert len(ctl.decodes) == 1 and not ctl.colocated, listed
        last_decode = ctl.decodes[0].instance_id
        cases = [("nope-3", "decode", grpc.StatusCode.NOT_FOUND, "unknown instance 'nope-3'"),
                 (last_decode, "verifier", grpc.StatusCode.INVALID_ARGUMENT, "role must be one of"),
                 (last_decode, "decode", grpc.StatusCode.FAILED_PRECONDITION, f"{last_decode} is already decode"),
                 (last_decode, "prefill", grpc.StatusCode.FAILED_PRECONDITION, "would leave no live decode")]
        for iid, role, code, words in cases:
            with pytest.raises(grpc.RpcError) as e:
                stub.ChangeRole(pb.ChangeRoleRequest(instance_id=iid, role=role), metadata=md, timeout=30)
            assert e.value.code() == code and words in e.value.details(), (iid, role, e.value.details())
    with pytest.raises(RoleChangeError, match="would leave no live decode"):
        srv.run(ctl.change_role(last_decode, "prefill"))
    assert _roles(srv) == listed, "refused changes changed nothing"
    r = _cli(srv)
    assert r.returncode == 0 and all(f"{iid:<16} {role:<10}" in r.stdout for iid, role in listed.items()), r
    r = _cli(srv, "--set", "nope-3=decode")
    assert r.returncode == 2 and "NOT_FOUND: unknown instance 'nope-3'" in r.stderr and "Traceback" not in r.stderr, r
    r = _cli(srv, "--set", f"{last_decode}=verifier")
    assert r.returncode == 2 and "role must be one of prefill, decode, colocated" in r.stderr, r
    victim = ctl.prefills[0].instance_id
    r = _cli(srv, "--set", f"{victim}=colocated", "--reason", "test: cli")
    assert r.returncode == 0 and f"{victim}: prefill -> colocated in" in r.stdout, r
    assert _roles(srv)[victim] == "colocated"
    prompts, sp = [list(range(3, 20 + k)) for k in range(6)], SamplingParams(max_tokens=6, ignore_eos=True)

    async def gen(prompt):
        return [tok for item in [x async for x in srv.cluster.agenerate(prompt, sp)] for tok in item.token_ids]

    async def all_of():
        return await asyncio.gather(*[gen(p) for p in prompts])
    want = [o.token_ids for o in LLM(MODEL).generate(prompts, sp)]
    assert srv.run(all_of()) == want
    # A restart after a failure keeps the id and the role it has now.
    import ray
    old = _inst(srv, victim)
    ray.kill(old.driver, no_restart=True)
    deadline = time.monotonic() + 120
    while not (_inst(srv, victim) is not old and _inst(srv, victim).alive):
        assert time.monotonic() < deadline, f"{victim} was not restarted"
        time.sleep(0.2)
    assert _roles(srv)[victim] == "colocated" and _inst(srv, victim) in ctl.colocated
    assert srv.run(all_of()) == want
    srv.wait_all_free(30)


def test_rank_actor_switches_role_over_the_same_runtime_without_ray():
    """The actor class itself (no Ray): pause refuses while anything is held and refuses new
    work once paused; change_role keeps the runtime and serves in the new role."""
    from cluster.actors import RankActor, role_class
    from decode_worker.worker import DecodeWorker
    from model.instance import ColocatedWorker, RequestSpec
    from model.rank_runtime import RankRuntime, WorkerConfig
    from prefill_worker.worker import PrefillWorker

    events = []
    actor = RankActor("decode", WorkerConfig("decode-9", model=MODEL, num_kv_blocks=32))
    actor._emit = events.append
    actor.worker = role_class("decode")(actor.cfg, emit=actor._emit)      # what init() does, without Ray
    actor.start_loop()
    try:
        before, built = actor.fingerprint(), RankRuntime.num_built
        assert actor.reserve("r#0", 20) is not None
        assert actor.pause() == "0 requests, 1 reservations", "a reservation is still held: no pause"
        assert actor.worker.release("r#0") and actor.pause() == ""
        assert actor.reserve("late#0", 20) is None, "paused: no blocks for new work"
        with pytest.raises(RuntimeError, match="changing role"):
            actor.add_request(RequestSpec("late#0", [5, 6, 7]))
        info = actor.change_role("prefill")
        assert isinstance(actor.worker, PrefillWorker) and not isinstance(actor.worker, DecodeWorker)
        assert info["seconds"] < 5 and actor.fingerprint() == before and RankRuntime.num_built == built
        assert actor.worker.bm.num_free_blocks == 32 and actor.ping()
        assert actor.pause() == "" and actor.change_role("colocated")["kv_cache_ptr"] == before["kv_cache_ptr"]
        assert type(actor.worker) is ColocatedWorker
        sp = SamplingParams(max_tokens=5, ignore_eos=True)
        actor.add_request(RequestSpec("c#0", list(range(3, 20)), sp))
        deadline = time.monotonic() + 30
        while actor.worker.busy():
            assert time.monotonic() < deadline, "the colocated loop did not finish the request"
            time.sleep(0.01)
        got = [t for batch in events for ev in batch for t in getattr(ev, "tokens", {}).get("c#0", [])]
        assert got == LLM(MODEL).generate([list(range(3, 20))], sp)[0].token_ids
    finally:
        actor.shutdown()

"""Chaos, bounded for CI: 60 s of steady small requests over gRPC against 2 prefill + 2 decode
instances, while an instance of a random phase is killed every 10-15 s and 20 fuzzed or poison
requests are mixed in. A killed instance is back in seconds on a quiet machine (20-45 s on a
loaded one); the pool serves on meanwhile. The load draws from 48 distinct requests (greedy and
seeded), so the in-process reference costs 48 generations, not one per request sent. Then: no
accepted request is lost, every completed stream has exactly the asked length and the
in-process engine's tokens, every poison failed alone, every killed instance came back, every
KV block is free and gRPC health says SERVING."""
import random
import threading
import time

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.grpc_client import make_request
from engine.sampling_params import SamplingParams
from model.llm import LLM
from protos import inference_pb2 as pb
from tests.cluster.fault_actors import POISON_DECODE, POISON_PREFILL, faulty_actor
from tests.cluster.servers import Server, record

MODEL = "tiny-llama"
LOAD_S = 60.0
NUM_CLIENTS = 4
NUM_DISTINCT = 48
PLAN = {"model": MODEL, "prefill": {"num_instances": 2}, "decode": {"num_instances": 2}, "max_restarts": 20, "restart_backoff_s": 0.2, "kv_transfer_timeout_s": 10.0}
GENERATE = "/disagg.v1.Inference/Generate"


def _stream(ch, raw: bytes):
    """(status, token ids, finish reason or error details) of one Generate sent as raw bytes."""
    call = ch.unary_stream(GENERATE, request_serializer=None, response_deserializer=pb.GenerateResponse.FromString)
    toks, last = [], None
    try:
        for r in call(raw, timeout=120):
            toks += r.token_ids
            last = r
    except grpc.RpcError as e:
        return e.code().name, toks, e.details()
    return "OK", toks, last.finish_reason if last else ""


def _distinct():
    rng = random.Random(5)
    out = []
    for i in range(NUM_DISTINCT):
        prompt = [rng.randrange(3, 250) for _ in range(rng.randint(3, 24))]
        extra = {"temperature": 0.7, "seed": i} if i % 2 else {}
        out.append((prompt, SamplingParams(max_tokens=rng.randint(2, 10), ignore_eos=True, **extra)))
    return out


def _special(rng: random.Random, k: int):
    """The k-th of 20 fuzzed or poison requests: (kind, raw bytes, prompt, params)."""
    kind = ("tiny_temperature", "poison_prefill", "poison_decode", "fuzz")[k % 4]
    if kind == "fuzz":
        if k % 8 == 3:
            return kind, rng.randbytes(rng.randint(1, 200)), None, None
        bad = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 300, -2]),
                                 sampling=pb.SamplingOptions(max_tokens=-5, temperature=float("nan"), top_p=7.0))
        return kind, bad.SerializeToString(), None, None
    if kind == "tiny_temperature":
        prompt, sp = [rng.randrange(3, 250) for _ in range(6)], SamplingParams(max_tokens=5, temperature=1e-40,
                                                                               ignore_eos=True)
    else:
        marker = POISON_PREFILL if kind == "poison_prefill" else POISON_DECODE
        prompt, sp = marker + [rng.randrange(3, 250) for _ in range(4)], SamplingParams(max_tokens=6, ignore_eos=True)
    return kind, make_request(prompt, sp).SerializeToString(), prompt, sp


@pytest.mark.timeout(400)
def test_chaos(ray_session):
    s = Server(PLAN, actor_cls=faulty_actor(poison_prefill=POISON_PREFILL, poison_decode=POISON_DECODE),
               max_pending=256)
    try:
        _run_chaos(s)
    finally:
        s.close()


def _run_chaos(s: Server):
    addr, ctl = f"127.0.0.1:{s.port}", s.cluster.controller
    t_end = time.monotonic() + LOAD_S
    normal, specials, kills, lock = [], [], [], threading.Lock()

    jobs = _distinct()

    def client(c):
        rng = random.Random(c)
        with grpc.insecure_channel(addr) as ch:
            while time.monotonic() < t_end:
                k = rng.randrange(NUM_DISTINCT)
                prompt, sp = jobs[k]
                res = _stream(ch, make_request(prompt, sp).SerializeToString())
                with lock:
                    normal.append((k, sp, res))

    def mixer():
        rng = random.Random(99)
        with grpc.insecure_channel(addr) as ch:
            for k in range(20):
                time.sleep(LOAD_S / 21)
                kind, raw, prompt, sp = _special(rng, k)
                specials.append((kind, prompt, sp, _stream(ch, raw)))

    def killer():
        rng = random.Random(7)
        while True:
            time.sleep(rng.uniform(10, 15))
            live = []
            while not live:             # all may be restarting: kill the first one back
                if time.monotonic() > t_end - 5:
                    return
                live = [i for i in ctl.prefills + ctl.decodes if i.alive]
                time.sleep(0 if live else 0.2)
            victim = rng.choice(live)
            ray.kill(victim.driver, no_restart=True)
            kills.append((victim.instance_id, time.monotonic()))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(NUM_CLIENTS)]
    threads += [threading.Thread(target=mixer), threading.Thread(target=killer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=LOAD_S + 150)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert len(kills) >= 4, f"only {len(kills)} kills happened: the scenario did not run"

    lost = [(p, sp.max_tokens, r) for p, sp, r in normal if r[0] != "OK"]
    assert not lost, f"{len(lost)} of {len(normal)} accepted requests did not complete: {lost[:5]}"
    wrong = [(len(r[1]), sp.max_tokens) for _, sp, r in normal if len(r[1]) != sp.max_tokens or r[2] != "length"]
    assert not wrong, f"outputs of the wrong length (got, asked): {wrong[:10]}"
    by_kind = {}
    for kind, prompt, sp, res in specials:
        by_kind.setdefault(kind, []).append((prompt, sp, res))
    for _, _, (code, _, details) in by_kind["poison_prefill"] + by_kind["poison_decode"]:
        assert code == "INTERNAL" and "injected fault" in details, (code, details)
    assert all(res[0] in ("INVALID_ARGUMENT", "OK") for _, _, res in by_kind["fuzz"]), by_kind["fuzz"]
    assert all(res[0] == "OK" for _, _, res in by_kind["tiny_temperature"]), by_kind["tiny_temperature"]

    # Every completed stream against the in-process engine (1e-40 samples greedily there too).
    tiny = by_kind["tiny_temperature"]
    want = [o.token_ids for o in LLM(MODEL).generate([p for p, _ in jobs] + [p for p, _, _ in tiny],
                                                     [sp for _, sp in jobs] + [sp for _, sp, _ in tiny])]
    got = [(k, r[1]) for k, _, r in normal] + [(NUM_DISTINCT + j, r[1]) for j, (_, _, r) in enumerate(tiny)]
    differ = [k for k, toks in got if toks != want[k]]
    assert not differ, f"{len(differ)} of {len(got)} streams differ from the in-process engine"

    deadline = time.monotonic() + 120
    while not all(i.alive for i in ctl.prefills + ctl.decodes):
        assert time.monotonic() < deadline, "killed instances did not all come back"
        time.sleep(0.5)
    st = s.wait_all_free(60)
    c = st["counters"]
    assert c["requests_failed_alone"] == 10, c          # each step poison failed alone, once
    assert c["instance_failures"] == len(kills) and c["instance_restarts"] == len(kills), (c, kills)
    with grpc.insecure_channel(addr) as ch:
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert h.status == health_pb2.HealthCheckResponse.SERVING
    record("chaos", {"load_s": LOAD_S, "requests": len(normal), "lost": len(lost), "wrong_lengths": len(wrong),
                     "tokens_differ": len(differ), "kills": len(kills), "specials": len(specials),
                     "poisons_failed_alone": c["requests_failed_alone"], "retries": c["retries"],
                     "recovery_s": s.cluster.controller.monitor.recovery_s})

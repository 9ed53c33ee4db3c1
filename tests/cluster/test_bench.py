"""`disagg bench` against a real `disagg serve` subprocess on loopback: its JSON holds every figure
the issue lists, with sane values; overload statuses are counted, not raised; CLI errors are
one line with exit code 2."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

PLAN = {"model": "tiny-llama", "prefill": {"num_kv_blocks": 256}, "decode": {"num_kv_blocks": 40}}
ENV = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
ENV.pop("RAY_ADDRESS", None)
STATS = ("mean", "p50", "p90", "p99")


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`disagg serve` with its own local Ray; max_pending 1 and 40 decode blocks, so a burst
    overflows into RESOURCE_EXHAUSTED while a modest rate does not."""
    d = tmp_path_factory.mktemp("serve")
    (d / "plan.json").write_text(json.dumps(PLAN))
    ready = d / "ready.json"
    log = open(d / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--plan", str(d / "plan.json"), "--port", "0",
                             "--metrics-port", "-1", "--http-port", "0", "--max-pending", "1", "--ready-file", str(ready)],
                            env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ready.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, (d / "serve.log").read_text()
        time.sleep(0.2)
    yield f"127.0.0.1:{json.loads(ready.read_text())['port']}", d
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def _check_stats(st, n):
    assert st["n"] == n and all(st[k] is not None and st[k] >= 0 for k in STATS), st
    assert st["p50"] <= st["p90"] <= st["p99"], st


@pytest.mark.timeout(120)
def test_bench_json_holds_every_figure(server):
    addr, d = server
    out = d / "bench.json"
    p = _cli("bench", "--server", addr, "--workload", "sharegpt", "--rate", "8", "--num-requests", "20",
             "--max-prompt-len", "64", "--max-output-len", "8", "--seed", "1", "--ttft-slo-s", "1.0",
             "--tpot-slo-s", "0.2", "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "TTFT" in p.stdout and "attainment" in p.stdout
    r = json.loads(out.read_text())
    assert r["num_sent"] == r["num_completed"] == 20 and r["num_failed"] == 0
    assert r["status_counts"] == {"OK": 20} and r["finish_reasons"] == {"length": 20}
    # Clipped to the caps, and the server generated exactly the asked lengths.
    assert r["workload"]["num_prompts_clipped"] > 0 and r["workload"]["max_prompt_len"] == 64
    rows = r["requests"]
    assert all(1 <= x["prompt_len"] <= 64 and 1 <= x["output_len"] <= 8 for x in rows)
    # The server generates exactly the asked lengths: no token is ever dropped on the way.
    wrong = [x for x in rows if x["num_tokens"] != x["output_len"]]
    assert r["num_short_outputs"] == 0 and not wrong, wrong
    assert r["total_output_tokens"] == sum(x["num_tokens"] for x in rows)
    for key in ("ttft_s", "e2e_s", "server_ttft_s"):
        _check_stats(r[key], 20)
    multi = sum(x["output_len"] > 1 for x in rows)
    _check_stats(r["tpot_s"], multi)
    # One gap per token-bearing message after the first; a message may carry several tokens
    # (deltas that queued while the stream's writer was busy leave together).
    assert all(1 <= x["num_messages"] <= x["num_tokens"] for x in rows)
    _check_stats(r["itl_s"], sum(x["num_messages"] - 1 for x in rows))
    # Client TTFT includes the server's and every end-to-end latency its TTFT.
    assert r["ttft_s"]["mean"] >= r["server_ttft_s"]["mean"] and r["e2e_s"]["p50"] >= r["ttft_s"]["p50"]
    for stage in ("prefill_queue", "prefill_compute", "kv_transfer", "decode_queue"):
        st = r["ttft_breakdown_s"][stage]
        assert st["mean"] is not None and st["mean"] >= 0 and st["p90"] >= 0, (stage, st)
    assert r["ttft_breakdown_s"]["prefill_compute"]["mean"] > 0
    assert 0 <= r["attainment"] <= min(r["ttft_attainment"], r["tpot_attainment"]) <= 1
    met = sum(x["status"] == "OK" and x["ttft_s"] <= 1.0 and x["tpot_s"] <= 0.2 for x in rows)
    assert r["attainment"] == pytest.approx(met / 20)
    assert r["goodput_rps"] == pytest.approx(met / r["duration_s"]) and "per second" in r["goodput_definition"]
    assert r["request_throughput_rps"] == pytest.approx(20 / r["duration_s"])
    assert r["output_token_throughput_tps"] > 0 and r["total_token_throughput_tps"] > r["output_token_throughput_tps"]
    # Poisson arrivals rescaled to 8 req/s: 19 gaps span 19 / 8 s, and sends keep to schedule.
    assert r["workload"]["offered_rate_rps"] == pytest.approx(8)
    # How well the client kept to schedule is recorded, not asserted: it depends on the machine's load.
    assert max(x["sent_s"] for x in rows) >= 19 / 8 - 0.3
    assert r["send_lag_s"]["p99"] >= 0


@pytest.mark.timeout(120)
def test_burst_overload_is_counted_not_raised(server):
    addr, d = server
    out = d / "burst.json"
    p = _cli("bench", "--server", addr, "--workload", "random:64,8", "--rate", "inf", "--num-requests", "30",
             "--num-warmups", "0", "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(out.read_text())
    counts = r["status_counts"]
    assert counts.get("RESOURCE_EXHAUSTED", 0) > 0 and counts.get("OK", 0) > 0, counts
    assert sum(counts.values()) == r["num_sent"] == 30
    assert r["num_failed"] == 30 - r["num_completed"] == counts["RESOURCE_EXHAUSTED"]
    # No SLO given: a target left out is unbounded, so attainment = completed / sent.
    assert r["attainment"] == pytest.approx(r["num_completed"] / 30)


@pytest.mark.timeout(240)
def test_openai_backend_matches_grpc_backend(server):
    """The same seed through our HTTP front (--backend openai) and through gRPC: the same
    requests, the same token totals, every figure of the report."""
    addr, d = server
    http = json.loads((d / "ready.json").read_text())["http_port"]
    common = ["--workload", "sharegpt", "--rate", "6", "--num-requests", "12", "--max-prompt-len", "48",
              "--max-output-len", "8", "--seed", "5", "--max-concurrency", "1"]
    res = {}
    for name, target in (("grpc", ["--server", addr]),
                         ("openai", ["--backend", "openai", "--base-url", f"http://127.0.0.1:{http}/v1"])):
        out = d / f"same-seed-{name}.json"
        p = _cli("bench", *target, *common, "--out", str(out), timeout=200)
        assert p.returncode == 0, p.stdout + p.stderr
        res[name] = json.loads(out.read_text())
    g, o = res["grpc"], res["openai"]
    assert o["server"]["backend"] == "openai" and o["server"]["model"] == "tiny-llama"
    assert g["num_completed"] == o["num_completed"] == 12 and o["status_counts"] == {"OK": 12}
    assert (g["total_prompt_tokens"], g["total_output_tokens"]) == (o["total_prompt_tokens"], o["total_output_tokens"])
    assert [(x["prompt_len"], x["output_len"], x["num_tokens"]) for x in g["requests"]] == \
        [(x["prompt_len"], x["output_len"], x["num_tokens"]) for x in o["requests"]]
    assert o["finish_reasons"] == {"length": 12}
    for key in ("ttft_s", "e2e_s"):
        _check_stats(o[key], 12)
    assert o["itl_s"]["n"] > 0 and o["tpot_s"]["n"] > 0 and o["goodput_rps"] > 0


def test_cli_errors_are_one_line():
    p = _cli("bench", "--server", "127.0.0.1:1", "--connect-timeout-s", "2", "--num-requests", "1", timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "UNAVAILABLE" in p.stderr, p.stderr
    p = _cli("bench", "--server", "127.0.0.1:1", "--workload", "random:x", timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("disagg bench: error: workload"), p.stderr
    p = _cli("bench", "--server", "127.0.0.1:1", "--workload", "no-such-trace", timeout=60)
    assert p.returncode == 2 and "neither a known name" in p.stderr and "Traceback" not in p.stderr


def _args(*extra):
    import argparse

    from cluster.bench import add_bench_args
    p = argparse.ArgumentParser()
    add_bench_args(p)
    return p.parse_args(["--server", "x:1", *extra])


def test_arrivals_replay_scale_duration_and_bursts():
    from cluster.bench import build_workload
    from placement.workload import load_trace
    trace = load_trace("azure-code").timestamps_s
    wl = build_workload(_args("--workload", "azure-code", "--replay", "--num-requests", "50"))
    assert list(wl.arrival_s) == pytest.approx(list(trace[:50] - trace[0]))       # the trace's own times
    half = build_workload(_args("--workload", "azure-code", "--replay", "--num-requests", "50", "--time-scale", "0.5"))
    assert list(half.arrival_s) == pytest.approx(list(wl.arrival_s * 0.5))
    timed = build_workload(_args("--workload", "azure-conv", "--replay", "--duration-s", "30"))
    conv = load_trace("azure-conv").timestamps_s
    assert timed.num_requests == (conv < 30).sum() > 10 and timed.arrival_s.max() < 30
    g = build_workload(_args("--workload", "sharegpt", "--rate", "4", "--arrival", "gamma", "--cv", "3",
                             "--duration-s", "60"))
    assert g.arrival_s.max() < 60 and g.rate == pytest.approx(4, rel=0.5)
    burst = build_workload(_args("--workload", "random:100,10,0.5", "--num-requests", "7"))
    assert (burst.arrival_s == 0).all() and ((50 <= burst.prompt_lens) & (burst.prompt_lens <= 150)).all()
    with pytest.raises(Exception, match="finite --rate"):
        build_workload(_args("--workload", "sharegpt", "--duration-s", "5"))


def test_mooncake_hash_ids_become_shared_prompt_prefixes_at_any_block_size():
    """--hash-block-tokens 16: prompt lengths scale by 16/512 and each hash id is one block of 16
    token ids, so two requests share exactly their common leading hash ids as a token prefix."""
    from types import SimpleNamespace

    from cluster.bench import build_workload, plan_requests
    from placement.workload import load_trace
    args = _args("--workload", "mooncake-conv", "--replay", "--num-requests", "40", "--hash-block-tokens", "16")
    wl = build_workload(args)
    trace = load_trace("mooncake-conv")
    assert list(wl.prompt_lens) == [-(-n * 16 // 512) for n in trace.prompt_lens[:40]]
    info = SimpleNamespace(max_model_len=4096, max_prompt_tokens=0, max_tokens_limit=0, vocab_size=259)
    _, ids, _, _ = plan_requests(wl, info, args)
    a, b = 0, 1                                   # both start with hash id 0, then differ
    common = next(k for k, (x, y) in enumerate(zip(wl.hash_ids[a], wl.hash_ids[b])) if x != y)
    assert common >= 1
    assert ids[a][:16 * common] == ids[b][:16 * common] and ids[a][16 * common:][:16] != ids[b][16 * common:][:16]
    with pytest.raises(Exception, match="hash-block-tokens"):
        build_workload(_args("--workload", "mooncake-conv", "--replay", "--num-requests", "5",
                             "--hash-block-tokens", "0"))

"""`disagg serve --replan auto` beats the fixed starting plan on a replay whose mix shifts
(issue 19), on a real local Ray cluster with the embedded CPU model, end to end through the CLI.

The plan: 1 prefill + 2 decode instances (embedded model, CPU). The replay (`disagg bench
--replay A.csv,B.csv --time-scale 0.1`: two Azure-format traces back to back, written at 10x
their replay time and compressed 10x) is first decode-heavy (short prompts, 32-token outputs:
the starting split serves it), then prefill-heavy (~1024-token prompts, 4-token outputs) at a
rate between what one prefill instance and what two serve: one instance's queue (hence TTFT)
grows without end, two keep up. So the right split really differs between the two halves.

Why the SLOs, the rate and the latency model come from measurements: this 2-core machine is
shared and its speed varies several-fold with load, and what a second prefill instance adds
depends on what else holds the two vCPUs. The test sends 12 1024-token prompts at once through
the server and takes the prefill's time per prompt from the spread of their first tokens over
the prompts after the first; then sets a decode instance to prefill by hand (`disagg roles
--set`), does the same with 24 prompts over the two, and sets it back. The rate is the
geometric mean of the two capacities; TTFT SLO = 8x one instance's time per prompt, TPOT SLO =
1 s (loose: decode is not what shifts here). The re-planner gets the committed CPU profile
scaled to the measured time (`--replan-latency-model`), so its simulation sees this run's speed.

History: 512-token prompts at a fixed 1.3x one instance's capacity passed here (two instances
gave 1.5x one) and failed in CI on 2026-12-02 (both splits ~0% on the prefill-heavy half: two
instances gave too little more). With 1024-token prompts the per-request costs outside the
prefill (controller, client, hand-over, decode) weigh less and two instances measure 1.75-1.87x
one here; the test now measures that factor and fails with it named if it is below 1.3x.

Where the fixed split kept up with the prefill-heavy half after all (attainment >= 0.8 there:
this VM's speed drifts by 25-100% between minutes, and a CI run on 2026-12-03 replayed at a rate
the lone instance served at 92%), the rate goes up 1.25x and the fixed split replays again (at
most three times); the auto run replays what the last fixed run did.

Both runs replay the same requests; both must complete every request with exactly the tokens
asked (no lost request); the auto run must score higher attainment on the whole replay and on
the prefill-heavy part, log its flip with the figures compared, and show it in the Prometheus
metrics (`disagg_replan_total{outcome="flip"}`, `disagg_instance_role`).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from placement.latency_profile import PROFILES_DIR, ProfiledModel, load_profile

ENV = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
ENV.pop("RAY_ADDRESS", None)
ENV.pop("DISAGG_AUTH_TOKEN", None)
PROFILE = PROFILES_DIR / "cpu_embedded.json"
PROMPT, OUT = 1024, 4                   # the prefill-heavy half
PHASE1_S, PHASE2_S = 6.0, 22.0
COMPRESS = 10.0
CAL_PROMPTS = 12
MIN_SPEEDUP = 1.3                       # two prefill instances against one, measured
KEPT_UP, RATE_STEP, OFF_ATTEMPTS = 0.8, 1.25, 3     # the fixed split's replay at a higher rate if it kept up


def cli(*args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def start(d, name, *flags):
    ready = d / f"{name}.ready"
    log = open(d / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--plan", str(d / "plan.json"), "--port", "0",
                             "--http-port", "-1", "--metrics-port", "0", "--ready-file", str(ready), *map(str, flags)],
                            env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not ready.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, (d / f"{name}.log").read_text()[-3000:]
        time.sleep(0.2)
    return proc, json.loads(ready.read_text())


def stop(proc):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def write_trace(path, arrivals_s, prompts, outputs):
    """An Azure LLM 2023 CSV (what placement.workload reads), timestamps `arrivals_s` apart."""
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for a, p, o in zip(arrivals_s, prompts, outputs):
        sec = 1_700_000_000 + a
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(sec))) + f".{int(round((sec % 1) * 1e6)):06d}"
        rows.append(f"{stamp},{p},{o}")
    path.write_text("\n".join(rows) + "\n")


def calibrate(d, info, name, n, seed) -> float:
    """Seconds per 512-token prompt when `n` arrive at once: the spread of their first tokens over
    the prompts after the first. A new `seed` per call, so no prompt hits the prefix cache."""
    out = d / f"{name}.json"
    r = cli("bench", "--server", f"127.0.0.1:{info['port']}", "--workload", f"random:{PROMPT},2", "--rate", "inf",
            "--num-requests", n, "--seed", seed, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    ttfts = [x["ttft_s"] for x in json.loads(out.read_text())["requests"]]
    return (max(ttfts) - min(ttfts)) / (n - 1)


def set_role(info, instance, role):
    r = cli("roles", "--server", f"127.0.0.1:{info['port']}", "--set", f"{instance}={role}", "--reason", "calibration")
    assert r.returncode == 0, r.stderr[-2000:]


def bench(d, info, name, ttft_slo, traces, seed):
    """The replay; `seed` picks the prompts' token ids (a replay on a server that served another one
    takes a new seed, or its prompts would hit the prefix cache the earlier one filled)."""
    out = d / f"{name}.json"
    r = cli("bench", "--server", f"127.0.0.1:{info['port']}", "--replay", traces, "--time-scale", 1 / COMPRESS,
            "--seed", seed,
            "--ttft-slo-s", ttft_slo, "--tpot-slo-s", 1.0, "--window-s", 4, "--num-warmups", 0,
            "--request-timeout-s", 120, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def scaled_profile(d, factor: float):
    """The committed CPU profile with every time coefficient multiplied by `factor`."""
    from benchmarks.fidelity_calibration import at_speed
    prof = at_speed(json.loads(PROFILE.read_text()), factor, factor)
    path = d / "profile-now.json"
    path.write_text(json.dumps(prof))
    return path


@pytest.mark.timeout(600)
def test_replan_auto_beats_the_fixed_start_on_a_shifting_replay(tmp_path):
    d = tmp_path
    plan = {"model": "embedded", "prefill": {"num_instances": 1, "torch_threads": 1, "max_batch_tokens": 2048},
            "decode": {"num_instances": 2, "torch_threads": 1, "max_batch_tokens": 2048}}
    (d / "plan.json").write_text(json.dumps(plan))
    proc, info = start(d, "off", "--replan", "off")
    try:
        # Calibrate, as this machine runs now: prompts sent at once, so the prefill instance batches
        # them (two per 2048-token batch) and hands each batch over while it computes the next, as
        # in the replay. A few first, untimed: the first prefills of a process run slow.
        calibrate(d, info, "warm1", 4, seed=1)
        t_prefill = calibrate(d, info, "cal1", CAL_PROMPTS, seed=2)
        # The same with the second prefill instance this split would flip to (a decode instance set
        # to prefill by hand, then back): what two prefill instances really give here, beside the
        # controller, the decode worker, Ray and the client on two vCPUs.
        set_role(info, "decode-0", "prefill")
        calibrate(d, info, "warm2", 4, seed=3)
        t_prefill2 = calibrate(d, info, "cal2", 2 * CAL_PROMPTS, seed=4)
        set_role(info, "decode-0", "decode")
        speedup = t_prefill / t_prefill2
        print(f"prefill per prompt: {t_prefill * 1e3:.1f} ms with one instance, {t_prefill2 * 1e3:.1f} ms with two "
              f"({speedup:.2f}x)")
        assert speedup >= MIN_SPEEDUP, (
            f"two prefill instances serve only {speedup:.2f}x the prompts of one on this machine "
            f"({t_prefill * 1e3:.0f} vs {t_prefill2 * 1e3:.0f} ms per prompt): no split of these instances "
            f"can beat another by enough to show (needs >= {MIN_SPEEDUP}x; is another process holding a core?)")
        ttft_slo = 8 * t_prefill
        rng = np.random.default_rng(7)
        n1 = int(PHASE1_S * 2)
        write_trace(d / "decode_heavy.csv", np.cumsum(rng.exponential(COMPRESS / 2, n1)),
                    rng.integers(16, 48, n1), rng.integers(24, 40, n1))
        # Arrivals between one instance's capacity and two's, as far from each in ratio (the
        # geometric mean): at 1.8x, one instance is 1.34x loaded and two are 0.75x.
        rate2 = speedup ** 0.5 / t_prefill
        traces = f"{d / 'decode_heavy.csv'},{d / 'prefill_heavy.csv'}"
        # This VM's speed drifts by 25-100% from one minute to the next (docs/benchmarks.md, CPU
        # fidelity runs 9 and 10): where the lone prefill instance kept up with the prefill-heavy
        # half after all (the machine ran faster than when calibrated), that replay shows no
        # split's gain, so the rate goes up by the slack and the fixed split replays again.
        for attempt in range(OFF_ATTEMPTS):
            n2 = int(PHASE2_S * rate2)
            write_trace(d / "prefill_heavy.csv", np.cumsum(np.random.default_rng(8).exponential(COMPRESS / rate2, n2)),
                        rng.integers(PROMPT * 3 // 4, PROMPT * 5 // 4, n2), np.full(n2, OUT))
            seed = 100 + attempt
            off = bench(d, info, f"off{attempt}", ttft_slo, traces, seed)
            if off["segments"][1]["attainment"] < KEPT_UP:
                break
            print(f"the lone prefill instance kept up at {rate2:.2f} req/s "
                  f"({off['segments'][1]['attainment']:.2f} attainment): replaying at {rate2 * RATE_STEP:.2f}")
            rate2 *= RATE_STEP
        assert off["segments"][1]["attainment"] < KEPT_UP, (
            f"one prefill instance kept up with the prefill-heavy half even at {rate2 / RATE_STEP:.2f} req/s "
            f"({RATE_STEP}x a rate {OFF_ATTEMPTS - 1} times): the calibration ({t_prefill * 1e3:.0f} ms per prompt) "
            f"is far from what the machine runs now")
    finally:
        stop(proc)
    factor = t_prefill / ProfiledModel(load_profile(str(PROFILE)), 1, 1).prefill_time([PROMPT])
    plan.update(slo_ttft_s=ttft_slo, slo_tpot_s=1.0)
    (d / "plan.json").write_text(json.dumps(plan))
    proc, info = start(d, "auto", "--replan", "auto", "--replan-interval-s", 1, "--replan-window-s", 8, "--replan-min-requests", 6,
                       "--replan-confirmations", 2, "--replan-dwell-s", 10, "--replan-margin", 0.05,
                       "--replan-latency-model", scaled_profile(d, factor))
    try:
        auto = bench(d, info, "auto", ttft_slo, traces, seed)      # a fresh server: the last fixed run's prompts
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/metrics", timeout=10).read().decode()
    finally:
        stop(proc)
    log = (d / "auto.log").read_text()
    summary = {k: {"attainment": r["attainment"], "segments": [(s["name"].rsplit("/", 1)[-1], s["attainment"])
                                                                for s in r["segments"]],
                   "windows": [(w["start_s"], round(w["attainment"], 2)) for w in r["windows"]]}
               for k, r in (("off", off), ("auto", auto))}
    print(json.dumps({"t_prefill_s": t_prefill, "t_prefill2_s": t_prefill2, "ttft_slo_s": ttft_slo, "rate2": rate2, **summary}, indent=1))
    for r in (off, auto):           # nothing lost, every token there
        assert r["num_completed"] == r["num_sent"] == n1 + n2, r["status_counts"]
        assert r["num_short_outputs"] == 0 and r["finish_reasons"] == {"length": n1 + n2}
    flips = [line for line in log.splitlines() if "re-planner flip" in line]
    assert flips, log[-4000:]
    assert "decode->prefill" in flips[0] and "2P+1D" in flips[0] and "1P+2D" in flips[0], flips[0]
    assert re.search(r'disagg_replan_total\{from_role="decode",outcome="flip",to_role="prefill"\} [1-9]', metrics), \
        [m for m in metrics.splitlines() if "replan" in m]
    assert re.search(r'disagg_instance_role\{instance="decode-\d",role="prefill"\} 1\.0', metrics)
    # The flip comes a few seconds into the prefill-heavy half (window, confirmations, drain), and
    # the requests queued on the lone prefill instance by then still wait: the gain is the rest.
    assert auto["segments"][1]["attainment"] >= off["segments"][1]["attainment"] + 0.1, summary
    assert auto["attainment"] > off["attainment"] + 0.05, summary

"""Simulator fidelity: for one plan and one workload, measured beside predicted at several rates.

    python -m benchmarks.fidelity --profile placement/profiles/cpu_embedded.json \
        --ray-worker-niceness 0 --out runs/fidelity          # CPU defaults: embedded model, 1P+1D

1. Starts the real cluster (`disagg serve --plan`, a subprocess with its own local Ray).
2. Calibrates at zero load what a serving step costs beyond the engine profile: serving step =
   scale x engine step + overhead (the worker's scheduling, KV sender threads, Ray messages),
   the KV hand-over (first to second token less one decode step: transfer, start of decode)
   as the KV link's latency and bandwidth, and the TTFT spent outside the workers (routing,
   Ray hops, gRPC), which this script adds to simulated TTFTs since the simulator's clock
   starts at the controller and stops at the prefill worker. The result is a calibrated copy
   of the profile in placement's format (profile-serving.json).
3. Runs `disagg bench` (a subprocess, as a user would) at each rate, and counts the cores each
   part used meanwhile (/proc): the serve process, the worker actors, the rest of Ray, the
   client, and everyone else on the machine.
4. Simulates the very requests each run sent (their lengths, their send times) with placement's
   simulator, the plan's batching and KV blocks, and the engine-only or calibrated profile;
   where the plan's prefill and decode share a GPU, also as if they did not (the simulator
   time-slices shared GPUs, placement/simulator.py).
   `disagg simulate` (placement/commands.py) takes a named workload redrawn at each rate, not a
   run's exact sample (clipped lengths, actual send times), so this is a small adapter over
   placement's Python API (deployment_from_plan, simulate).
5. Prints attainment, p90 TTFT and p90 TPOT measured beside predicted and writes JSON, with a
   verdict against the issue's targets (2 points of attainment, 10% on p90 TTFT and TPOT).
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CPU_PHASE = {"num_cpus_per_rank": 1, "torch_threads": 1, "num_kv_blocks": 1024}
CPU_PLAN = {"model": "embedded", "prefill": dict(CPU_PHASE), "decode": dict(CPU_PHASE)}
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
       "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


def start_server(plan_path: Path, workdir: Path, timeout_s: float = 240.0, env=None):
    """`disagg serve` as a subprocess; returns (process, "127.0.0.1:PORT") once it is ready."""
    ready = workdir / "serve-ready.json"
    ready.unlink(missing_ok=True)
    log = open(workdir / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--plan", str(plan_path), "--port", "0",
                             "--metrics-port", "-1", "--http-port", "-1", "--ready-file", str(ready)], cwd=REPO, env=env or ENV,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while not ready.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"disagg serve did not become ready; see {workdir / 'serve.log'}")
        time.sleep(0.5)
    return proc, f"127.0.0.1:{json.loads(ready.read_text())['port']}"


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# CPU accounting (Linux /proc): who used the cores during a run -------------------------------
def _proc_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds so far, command line) for every live process."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                f = stat[stat.rindex(")") + 2:].split()
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out[int(d.name)] = (int(f[1]), (int(f[11]) + int(f[12])) / tick, cmd)
            except (OSError, ValueError, IndexError):
                pass
    return out


def _tree(table: dict, root: int) -> set[int]:
    kids, todo = {root}, [root]
    while todo:
        p = todo.pop()
        for pid, (ppid, _, _) in table.items():
            if ppid == p and pid not in kids:
                kids.add(pid)
                todo.append(pid)
    return kids


def cpu_snapshot(serve_pid: int) -> dict:
    """CPU seconds so far: the serve process (controller, gRPC), its worker actors, the rest of
    its Ray, the client (this script and its finished children), and the whole machine."""
    import resource
    table = _proc_table()
    kids = _tree(table, serve_pid) - {serve_pid}
    ru = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    f = Path("/proc/stat").read_text().split("\n")[0].split()[1:]
    return {"serve": table.get(serve_pid, (0, 0.0, ""))[1],
            "workers": sum(table[p][1] for p in kids if "RankActor" in table[p][2]),
            "ray": sum(table[p][1] for p in kids if "RankActor" not in table[p][2]),
            "client": sum(r.ru_utime + r.ru_stime for r in ru),
            "machine": (sum(int(x) for x in f[:8]) - int(f[3]) - int(f[4])) / os.sysconf("SC_CLK_TCK"),
            "wall": time.monotonic()}


def cpu_usage(before: dict, after: dict) -> dict:
    """Cores used on average between two snapshots, per group; "other" is everyone else's."""
    dt = max(after["wall"] - before["wall"], 1e-9)
    use = {k: (after[k] - before[k]) / dt for k in ("serve", "workers", "ray", "client", "machine")}
    use["other"] = use["machine"] - use["serve"] - use["workers"] - use["ray"] - use["client"]
    return {k: round(v, 3) for k, v in use.items()}


_SEEDS = iter(range(10_000, 1 << 30))


def bench_args(server: str, workload: str, **kw) -> argparse.Namespace:
    """`disagg bench`'s arguments with its defaults, for in-process calibration runs; each run
    gets a seed of its own, so no run's prompts hit the prefix cache another run filled."""
    from cluster.bench import add_bench_args
    p = argparse.ArgumentParser()
    add_bench_args(p)
    a = p.parse_args(["--server", server, "--workload", workload, "--seed", str(next(_SEEDS))])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


# Calibration ------------------------------------------------------------------------------
def _lstsq_nonneg(x, y, scale=None):
    """Coefficients >= 0 minimising error relative to `scale` (default y), as placement's
    profile fit does."""
    from placement.latency_profile import _nonneg_lstsq
    x, y = np.asarray(x, float), np.asarray(y, float)
    w = 1 / np.maximum(np.abs(np.asarray(scale if scale is not None else y, float)), 1e-6)
    return _nonneg_lstsq(x * w[:, None], y * w)


def calibrate(server: str, serve_pid: int, engine, prompt_lens=(16, 128, 512), batches=(1, 4, 16),
              repeats: int = 7, shared: bool = False) -> dict:
    """Zero-load measurements against the running server, each beside the engine model's time:
    prefill steps one request at a time, decode steps of b requests decoding together (median
    inter-token gap in the middle of 64 tokens), the first-to-second-token gap, the TTFT
    outside the workers; the CPU the frontend and client spend per token; the cores the rest of
    the machine used meanwhile; with `shared` (prefill and decode on one GPU), how they slow
    each other (`interference`)."""
    from cluster.bench import replay
    out = {"prefill": [], "decode": [], "handover": [], "ttft_offset": []}
    start = cpu_snapshot(serve_pid)
    for n in prompt_lens:
        a = bench_args(server, f"random:{n},2,0", num_requests=repeats, max_concurrency=1, num_warmups=1)
        recs = [r for r in asyncio.run(replay(a))[0] if r.ok and r.num_tokens == 2]
        out["prefill"].append((n, float(np.median([r.timings["prefill_compute_s"] for r in recs])),
                               engine.prefill_time([n])))
        out["ttft_offset"] += [r.ttft_s - r.timings["prefill_queue_s"] - r.timings["prefill_compute_s"] for r in recs]
        out["handover"].append((n, float(np.median([r.itl_s[0] for r in recs]))))
    before, tokens = cpu_snapshot(serve_pid), 0
    for n in (64, 448):
        for b in batches:
            a = bench_args(server, f"random:{n},64,0", num_requests=b, num_warmups=0)
            recs = [r for r in asyncio.run(replay(a))[0] if r.ok]
            tokens += sum(r.num_tokens for r in recs)
            itl = float(np.median([g for r in recs for g in r.itl_s[20:50]]))
            ctx = b * (n + 36)                  # context of the middle steps
            out["decode"].append((b, ctx, itl, engine.decode_time(b, ctx)))
    after = cpu_snapshot(serve_pid)
    out["frontend_cpu_s_per_token"] = sum(after[k] - before[k] for k in ("serve", "ray", "client")) / max(1, tokens)
    out["other_cores"] = cpu_usage(start, after)["other"]
    if shared:
        out["interference"] = interference(server)
    return out


def _token_times(rec, start_unix_s: float) -> np.ndarray:
    """Unix times at which a record's tokens arrived."""
    return start_unix_s + rec.first_token_s + np.concatenate([[0.0], np.cumsum(rec.itl_s)])


def interference(server: str, prompt_len: int = 256, decode_batch: int = 16, decode_tokens: int = 500,
                 num_prefills: int = 40) -> dict:
    """How a prefill and a decode instance sharing a GPU slow each other. Alone: prefill-only
    requests (1 output token) of `prompt_len` tokens one at a time with the decode idle, and
    `decode_batch` requests decoding together with the prefill idle. Together: the same decode
    load while the same prefills run one after another. The prefill's speed while the decode
    is busy (it always is here) = its compute time alone / together; the decode's = f /
    (ITL together / ITL alone - 1 + f), f being the share of the window the prefill worker
    was computing (a step overlaps a prefill for that share of the time). ITLs are compared at
    the same token positions (the decode's step time grows with its context)."""
    from cluster.bench import replay

    def prefill_times(recs):
        return [r.timings["prefill_compute_s"] for r in recs if r.ok]
    alone_p = prefill_times(asyncio.run(replay(bench_args(
        server, f"random:{prompt_len},1,0", num_requests=num_prefills // 2, max_concurrency=1, num_warmups=0)))[0])
    dec_spec = f"random:64,{decode_tokens},0"
    drecs = asyncio.run(replay(bench_args(server, dec_spec, num_requests=decode_batch, num_warmups=0)))[0]
    alone_gaps = np.array([r.itl_s for r in drecs if r.ok and len(r.itl_s) == decode_tokens - 1])

    async def together():
        dec = asyncio.create_task(replay(bench_args(server, dec_spec, num_requests=decode_batch, num_warmups=0)))
        await asyncio.sleep(0.5)                    # the decode batch is running
        pre = await replay(bench_args(server, f"random:{prompt_len},1,0", num_requests=num_prefills,
                                      max_concurrency=1, num_warmups=0))
        return pre, await dec
    (precs, _, _, pnotes), (drecs, _, _, dnotes) = asyncio.run(together())
    ok_p = [r for r in precs if r.ok]
    lo = pnotes["start_unix_s"] + min(r.sent_s for r in ok_p)
    hi = pnotes["start_unix_s"] + max(r.done_s for r in ok_p)
    ratios = []
    for r in drecs:
        if not (r.ok and len(r.itl_s) == decode_tokens - 1) or not len(alone_gaps):
            continue
        t = _token_times(r, dnotes["start_unix_s"])[1:]      # when each gap ended
        inside = (t > lo) & (t < hi)
        if inside.sum() >= 5:
            ratios.append(np.median(np.array(r.itl_s)[inside]) / np.median(alone_gaps[:, inside]))
    busy = sum(prefill_times(ok_p)) / max(hi - lo, 1e-9)
    slow_p = float(np.median(prefill_times(ok_p)) / np.median(alone_p))
    slow_d = float(np.median(ratios)) if ratios else 1.0
    speed_d = busy / (slow_d - 1 + busy) if slow_d > 1 and busy > 0 else 1.0
    return {"prompt_len": prompt_len, "decode_batch": decode_batch, "prefill_alone_s": float(np.median(alone_p)),
            "prefill_together_s": float(np.median(prefill_times(ok_p))), "prefill_busy_share": float(busy),
            "decode_itl_ratio": slow_d, "window_s": hi - lo,
            "shared_speeds": [float(min(1.0, 1 / slow_p)), float(min(1.0, speed_d))]}



def fit_calibration(cal: dict, kv_bytes_per_token: int, gpu: bool = False) -> dict:
    """serving step = scale * engine step + overhead (+ per request, decode). On CPU `scale` is
    1 / the share of a core a worker gets (fitted on prefill steps, whose lengths separate it
    from the overhead; the same for decode, one core each); on a GPU the device is the
    worker's own, scale is 1 and the overheads are the median excess over the engine's times.
    The overheads are what a step costs beyond the forward pass. The hand-over (first to second token, less one decode step) becomes the KV
    link's latency + bytes / bandwidth."""
    pre, dec = cal["prefill"], cal["decode"]
    if gpu:
        p_scale = d_scale = 1.0
        p_o = max(0.0, float(np.median([m - e for _, m, e in pre])))
        d_o, d_s = max(0.0, float(np.median([m - e for _, _, m, e in dec]))), 0.0
    else:
        p_scale, p_o = _lstsq_nonneg([[e, 1] for _, _, e in pre], [m for _, m, _ in pre])
        d_scale = p_scale
        d_o, d_s = _lstsq_nonneg([[1, b] for b, _, _, _ in dec], [m - d_scale * e for _, _, m, e in dec],
                                 [m for _, _, m, _ in dec])
    fit = {"prefill_scale": float(p_scale), "prefill_overhead_s": float(p_o), "decode_scale": float(d_scale),
           "decode_overhead_s": float(d_o), "decode_overhead_s_per_request": float(d_s)}
    step1 = [d_scale * e + d_o + d_s for b, _, _, e in dec if b == 1]
    step = float(np.mean(step1)) if step1 else 0.0
    ho = [(n * kv_bytes_per_token, g - step) for n, g in cal["handover"]]
    lat, per_byte = _lstsq_nonneg([[1, nb] for nb, _ in ho], [g for _, g in ho])
    fit.update({"kv_latency_s": float(lat), "kv_bandwidth": float(1 / per_byte) if per_byte > 0 else 3.5e9,
                "ttft_offset_s": float(np.median(cal["ttft_offset"])),
                "frontend_cpu_s_per_token": cal["frontend_cpu_s_per_token"],
                "other_cores": cal["other_cores"]})
    if "interference" in cal:
        fit["shared_speeds"] = cal["interference"]["shared_speeds"]
    return fit


def calibrated_profile(profile: dict, fit: dict, tp: int = 1) -> dict:
    """The engine profile with the serving step model folded into its coefficients."""
    p = copy.deepcopy(profile)
    e = p["tp"][str(tp)]
    for k in "abc":
        e["prefill"][k] *= fit["prefill_scale"]
        e["decode"][k] *= fit["decode_scale"]
    e["prefill"]["a"] += fit["prefill_overhead_s"]
    if e.get("prefill_floor_s"):
        e["prefill_floor_s"] = e["prefill_floor_s"] * fit["prefill_scale"] + fit["prefill_overhead_s"]
    e["decode"]["a"] += fit["decode_overhead_s"]
    e["decode"]["c"] += fit["decode_overhead_s_per_request"]
    e["serving_calibration"] = fit
    p["kv_transfer"] = {"intra_node": {"bandwidth": fit["kv_bandwidth"], "latency_s": fit["kv_latency_s"]}}
    return p


# Simulation of a measured run ---------------------------------------------------------------
def _workload(run: dict):
    from placement.workload import Workload
    rows = sorted((r for r in run["requests"] if r["sent_s"] is not None), key=lambda r: r["sent_s"])
    arr = np.array([r["sent_s"] for r in rows])
    return Workload("bench", arr - arr[0], np.array([r["prompt_len"] for r in rows]),
                    np.array([r["output_len"] for r in rows]))


def simulate_run(plan, profile: dict, run: dict, ttft_offset_s: float, slo, shared: bool = True,
                 shared_speeds=None) -> dict:
    """Simulate the requests a bench run sent, at the times it sent them, with `profile`;
    `ttft_offset_s` (the TTFT outside the workers) is added to every simulated TTFT.
    `shared=False` ignores that the plan's prefill and decode instances share GPUs;
    `shared_speeds` (prefill, decode) replaces the deployment's default even split."""
    from placement.deployment import deployment_from_plan
    from placement.latency_profile import ProfiledModel
    from placement.simulator import simulate
    wl = _workload(run)
    dep = deployment_from_plan(plan, latency="roofline")    # KV blocks and batching from the plan
    dep.prefill.latency = dep.decode.latency = ProfiledModel(profile)
    if not shared:
        dep.shared = []
    elif shared_speeds is not None:
        dep.shared_speeds = tuple(shared_speeds)
    res = simulate(dep, wl)
    ttft, tpot = res.ttft_s + ttft_offset_s, res.tpot_s
    multi = wl.output_lens > 1
    return {"attainment": float(((ttft <= slo[0]) & (tpot <= slo[1])).mean()),
            "ttft_p90_s": float(np.percentile(ttft, 90)), "ttft_p50_s": float(np.percentile(ttft, 50)),
            "tpot_p90_s": float(np.percentile(tpot[multi], 90)) if multi.any() else 0.0,
            "tpot_p50_s": float(np.percentile(tpot[multi], 50)) if multi.any() else 0.0}


def measured(run: dict) -> dict:
    return {"attainment": run["attainment"], "ttft_p90_s": run["ttft_s"]["p90"], "tpot_p90_s": run["tpot_s"]["p90"],
            "ttft_p50_s": run["ttft_s"]["p50"], "tpot_p50_s": run["tpot_s"]["p50"],
            "num_failed": run["num_failed"], "status_counts": run["status_counts"]}


def verdict(meas: dict, pred: dict) -> dict:
    """The issue's targets: attainment within 2 points, p90 TTFT and TPOT within 10%."""
    def rel(k):
        return (pred[k] - meas[k]) / meas[k] if meas[k] else float("nan")
    d = {"attainment_pp": 100 * (pred["attainment"] - meas["attainment"]), "ttft_p90_rel": rel("ttft_p90_s"),
         "tpot_p90_rel": rel("tpot_p90_s")}
    d["ok"] = bool(abs(d["attainment_pp"]) <= 2 and abs(d["ttft_p90_rel"]) <= 0.10 and abs(d["tpot_p90_rel"]) <= 0.10)
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", default=None, help="plan file (default: embedded model, 1P+1D on CPU, 1 core each)")
    ap.add_argument("--workload", default="azure-conv")
    ap.add_argument("--rates", default="1,2,3,4")
    ap.add_argument("--num-requests", type=int, default=60)
    ap.add_argument("--max-prompt-len", type=int, default=512)
    ap.add_argument("--max-output-len", type=int, default=64)
    ap.add_argument("--ttft-slo-s", type=float, default=1.0)
    ap.add_argument("--tpot-slo-s", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default=None, help="engine profile (default: measured now with `disagg profile`)")
    ap.add_argument("--ray-worker-niceness", type=int, default=None,
                    help="RAY_worker_niceness for the cluster (Ray's default 15 makes the workers yield the "
                         "CPU to every nice-0 process: the frontend, the client, neighbours)")
    ap.add_argument("--out", default="fidelity-out")
    args = ap.parse_args(argv)
    from engine.model_config import load_model_config
    from engine.plan import Plan
    from model.embedded import resolve_model_source
    from placement.latency_profile import ProfiledModel, load_profile, save_profile
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan.load(args.plan) if args.plan else Plan.from_dict(CPU_PLAN)
    plan.save(out / "plan.json")
    threads = plan.prefill.torch_threads
    prof_path = Path(args.profile) if args.profile else out / "profile-engine.json"
    if not args.profile:
        subprocess.run([sys.executable, "-m", "cluster.cli", "profile", "--model", plan.model, "--device",
                        plan.prefill.device, "--torch-threads", str(threads), "--out", str(prof_path), "--quiet"],
                       cwd=REPO, env=ENV, check=True)
    engine_profile = load_profile(prof_path)
    engine = ProfiledModel(engine_profile)
    mc = load_model_config(resolve_model_source(plan.model))
    slo = (args.ttft_slo_s, args.tpot_slo_s)
    from placement.deployment import shared_pairs
    shared_gpu = bool(shared_pairs(plan))
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "device": f"{platform.machine()} CPU x{os.cpu_count()}" if plan.prefill.device == "cpu" else "cuda",
              "args": vars(args), "plan": plan.to_dict(), "engine_profile": str(prof_path), "runs": []}
    env = dict(ENV, **({"RAY_worker_niceness": str(args.ray_worker_niceness)}
                       if args.ray_worker_niceness is not None else {}))
    proc, server = start_server(out / "plan.json", out, env=env)
    try:
        t0 = time.monotonic()
        cal = calibrate(server, proc.pid, engine, shared=shared_gpu)
        kv_bytes = mc.kv_bytes_per_token("float32" if plan.prefill.device == "cpu" else None)
        fit = fit_calibration(cal, kv_bytes, gpu=plan.prefill.device == "cuda")
        serving = calibrated_profile(engine_profile, fit)
        save_profile(serving, out / "profile-serving.json")
        result["calibration"] = {"raw": cal, "fit": fit, "seconds": time.monotonic() - t0}
        print(f"calibration: {json.dumps(fit)}", file=sys.stderr)
        for rate in [float(x) for x in args.rates.split(",")]:
            path = out / f"bench-rate{rate:g}.json"
            snap = cpu_snapshot(proc.pid)
            # A seed per rate: the same trace rows, other arrivals and prompt ids, so no run hits the
            # prefix cache that the runs before it filled (the simulator has no cache to hit).
            subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--server", server, "--workload", args.workload,
                            "--rate", str(rate), "--num-requests", str(args.num_requests),
                            "--seed", str(args.seed + len(result["runs"])),
                            "--max-prompt-len", str(args.max_prompt_len), "--max-output-len", str(args.max_output_len),
                            "--ttft-slo-s", str(slo[0]), "--tpot-slo-s", str(slo[1]), "--out", str(path)],
                           cwd=REPO, env=ENV, check=True, stdout=subprocess.DEVNULL)
            cpu = cpu_usage(snap, cpu_snapshot(proc.pid))
            run = json.loads(path.read_text())
            meas = measured(run)
            speeds = fit.get("shared_speeds")
            preds = {"engine": simulate_run(plan, engine_profile, run, 0.0, slo),
                     "calibrated": simulate_run(plan, serving, run, fit["ttft_offset_s"], slo, shared_speeds=speeds)}
            if shared_gpu:
                preds["calibrated, even split"] = simulate_run(plan, serving, run, fit["ttft_offset_s"], slo)
                preds["calibrated, GPU not shared"] = simulate_run(plan, serving, run, fit["ttft_offset_s"], slo,
                                                                   shared=False)
            result["runs"].append({"rate": rate, "cpu_cores": cpu, "measured": meas,
                                   "predicted": preds, "verdict": {k: verdict(meas, v) for k, v in preds.items()}})
            print(_row(result["runs"][-1]), flush=True)
    finally:
        stop_server(proc)
    (out / "fidelity.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {out / 'fidelity.json'}", file=sys.stderr)
    return 0


def _row(r: dict) -> str:
    m = r["measured"]
    lines = [f"rate {r['rate']:g} req/s (cores used: {r['cpu_cores']})",
             f"  {'measured':<28} attainment {m['attainment']:.3f}  p90 TTFT {m['ttft_p90_s'] * 1e3:7.1f} ms  "
             f"p90 TPOT {m['tpot_p90_s'] * 1e3:6.1f} ms"]
    for k, p in r["predicted"].items():
        v = r["verdict"][k]
        lines.append(f"  {k:<28} attainment {p['attainment']:.3f}  p90 TTFT {p['ttft_p90_s'] * 1e3:7.1f} ms  "
                     f"p90 TPOT {p['tpot_p90_s'] * 1e3:6.1f} ms  {'ok' if v['ok'] else 'miss'} ({v['attainment_pp']:+.1f} pp, "
                     f"TTFT {v['ttft_p90_rel']:+.0%}, TPOT {v['tpot_p90_rel']:+.0%})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

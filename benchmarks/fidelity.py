"""Simulator fidelity: for one plan and one workload, measured beside predicted at several rates.

    python -m benchmarks.fidelity --profile placement/profiles/cpu_embedded.json \
        --ray-worker-niceness 0 --out runs/fidelity          # CPU defaults: embedded model, 1P+1D
    python -m benchmarks.fidelity --from-dir runs/fidelity --out runs/again   # re-predict, no cluster

1. Starts the real cluster (`disagg serve --plan`, a subprocess with its own local Ray).
2. Calibrates at zero load what a serving step costs beyond the engine profile (serving step =
   scale x engine step + overhead), the KV hand-over (first to second token less one decode
   step) as the KV link's latency and bandwidth, the TTFT spent outside the workers (routing,
   Ray hops, gRPC), the frontend's CPU per token, and on a shared GPU how prefill and decode
   slow each other (benchmarks/fidelity_calibration.py). The result is a calibrated copy of the
   profile in placement's format with a "serving" section (placement/serving.py).
3. Runs `disagg bench` (a subprocess, as a user would) at each rate, and counts the cores each
   part used meanwhile (/proc): the serve process, the worker actors, the rest of Ray, the
   client, and everyone else on the machine.
4. Fits the serving terms that only show under load (hand-over hops and decode host time per
   request in flight; on CPU the share of the neighbours' cores that competes) on some rates
   and checks them on the others (benchmarks/fidelity_predict.py), then simulates the very
   requests each run sent (their lengths, their send times) with placement's simulator three
   ways: the engine profile alone, the zero-load calibration, and with the load terms.
   profile-serving.json gets the load terms too: `disagg simulate --latency-model` takes it.
5. Prints attainment, p90 TTFT and p90 TPOT measured beside predicted and writes
   fidelity.json, with a verdict against issue 15's targets (3 points of attainment, 15% on
   p90 TTFT and TPOT, at every rate up to where measured attainment falls to 50%).

`--from-dir DIR` redoes 4-5 from a recorded folder (fidelity.json with the calibration's raw
measurements, plan.json, bench-rate*.json) with the current simulator: a GPU run re-predicted
on a CPU machine.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CPU_PHASE = {"num_cpus_per_rank": 1, "torch_threads": 1, "num_kv_blocks": 1024}
CPU_PLAN = {"model": "embedded", "prefill": dict(CPU_PHASE), "decode": dict(CPU_PHASE)}
# Decode lengths per batch so that each batch decodes for ~1.5 s on the 2-core machine (steps of
# ~3, 5, 9, 14, 25 ms), three measurements each (one varies by +-0.15 in speed): ~30 s.
CPU_INTERFERENCE = {"decode_batches": (1, 4, 16, 32, 64), "decode_tokens": (512, 320, 160, 112, 64),
                    "num_prefills": 16, "repeats": 3}
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


from benchmarks.fidelity_calibration import calibrate, calibrated_profile, cpu_snapshot, cpu_usage, fit_calibration, speed_probe  # noqa: E402,F401
from benchmarks.fidelity_predict import format_row, predict_runs  # noqa: E402


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
    ap.add_argument("--speed-probes", choices=["auto", "on", "off"], default="auto",
                    help="a zero-load speed probe (7 prefills, one decode batch: a few seconds) before every "
                         "rate and after the last, and each run predicted at the speed they measured against "
                         "the calibration's (auto: on CPU, whose speed drifts by 25-100%% minute to minute)")
    ap.add_argument("--profile", default=None, help="engine profile (default: measured now with `disagg profile`)")
    ap.add_argument("--ray-worker-niceness", type=int, default=None,
                    help="RAY_worker_niceness for the cluster (Ray's default 15 makes the workers yield the "
                         "CPU to every nice-0 process: the frontend, the client, neighbours)")
    ap.add_argument("--fit-rates", default=None,
                    help="rates whose runs fit the load terms (default: every second rate up to the one where "
                         "measured attainment falls under 50%%, starting with the second); the others check them")
    ap.add_argument("--load-terms-from", default=None,
                    help="take the load terms from an earlier fit (its fidelity.json or profile-serving.json) "
                         "instead of fitting them here: every rate then checks them")
    ap.add_argument("--from-dir", default=None,
                    help="re-predict a recorded run (a previous --out folder) with the current simulator; no cluster")
    ap.add_argument("--out", default="fidelity-out")
    args = ap.parse_args(argv)
    try:
        fit_rates = [float(x) for x in args.fit_rates.split(",")] if args.fit_rates else None
    except ValueError:
        ap.error(f"--fit-rates takes rates separated by commas (e.g. 16,32,64), got {args.fit_rates!r}")
    from benchmarks.fidelity_predict import load_terms_from
    load_terms = load_terms_from(args.load_terms_from) if args.load_terms_from else None
    if args.from_dir:
        return offline(Path(args.from_dir), Path(args.out), fit_rates, load_terms)
    return online(args, fit_rates, load_terms)


def online(args, fit_rates, load_terms=None) -> int:
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
    if prof_path.resolve() != (out / prof_path.name).resolve():
        # The folder then holds all that `--from-dir` needs, wherever it is re-predicted.
        (out / prof_path.name).write_bytes(prof_path.read_bytes())
    engine = ProfiledModel(engine_profile)
    mc = load_model_config(resolve_model_source(plan.model))
    slo = (args.ttft_slo_s, args.tpot_slo_s)
    from placement.deployment import shared_pairs
    shared_gpu = bool(shared_pairs(plan))
    cpu = plan.prefill.device == "cpu"
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "device": f"{platform.machine()} CPU x{os.cpu_count()}" if cpu else "cuda",
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
              "args": vars(args), "plan": plan.to_dict(), "engine_profile": str(prof_path), "runs": []}
    env = dict(ENV, **({"RAY_worker_niceness": str(args.ray_worker_niceness)}
                       if args.ray_worker_niceness is not None else {}))
    kv_bytes = mc.kv_bytes_per_token("float32" if cpu else None)
    cores = float(os.cpu_count()) if cpu else 0.0
    proc, server = start_server(out / "plan.json", out, env=env)
    runs = []
    try:
        t0 = time.monotonic()
        # On CPU too: the two workers slow each other on the host's cores beyond a share of them
        # (placement/serving.py, CoreShare); decode batches as large as these runs reach.
        cal = calibrate(server, proc.pid, engine, shared=shared_gpu or cpu,
                        interference_kw=CPU_INTERFERENCE if cpu else None, decode_rounds=3 if cpu else 1)
        fit = fit_calibration(cal, kv_bytes, gpu=not cpu)
        save_profile(calibrated_profile(engine_profile, fit, cpu_cores=cores), out / "profile-serving.json")
        result["calibration"] = {"raw": cal, "fit": fit, "seconds": time.monotonic() - t0}
        print(f"calibration: {json.dumps(fit)}", file=sys.stderr)
        probes = args.speed_probes == "on" or (args.speed_probes == "auto" and cpu)
        probe = speed_probe(server) if probes else None
        for rate in [float(x) for x in args.rates.split(",")]:
            path = out / f"bench-rate{rate:g}.json"
            snap = cpu_snapshot(proc.pid)
            # A seed per rate: the same trace rows, other arrivals and prompt ids, so no run hits the
            # prefix cache that the runs before it filled (the simulator has no cache to hit).
            subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--server", server, "--workload", args.workload,
                            "--rate", str(rate), "--num-requests", str(args.num_requests),
                            "--seed", str(args.seed + len(runs)),
                            "--max-prompt-len", str(args.max_prompt_len), "--max-output-len", str(args.max_output_len),
                            "--ttft-slo-s", str(slo[0]), "--tpot-slo-s", str(slo[1]), "--out", str(path)],
                           cwd=REPO, env=ENV, check=True, stdout=subprocess.DEVNULL)
            runs.append({"rate": rate, "cpu_cores": cpu_usage(snap, cpu_snapshot(proc.pid)),
                         "run": json.loads(path.read_text())})
            if probes:      # after this run, before the next: the next run's probe_before
                runs[-1]["probe_before"], probe = probe, speed_probe(server)
                runs[-1]["probe_after"] = probe
            r = runs[-1]
            print(f"rate {rate:g} req/s: measured attainment {r['run']['attainment']:.3f}, p90 TTFT "
                  f"{r['run']['ttft_s']['p90'] * 1e3:.1f} ms, p90 TPOT {r['run']['tpot_s']['p90'] * 1e3:.1f} ms; "
                  f"cores used {r['cpu_cores']}; load average {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        stop_server(proc)
    # Written before the prediction so that `--from-dir` can redo it from the same folder.
    result["runs"] = [{k: r[k] for k in ("rate", "cpu_cores", "probe_before", "probe_after") if k in r} for r in runs]
    (out / "fidelity.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    return _predict_and_write(result, plan, engine_profile, cal, kv_bytes, runs, slo, cores, fit_rates, out, load_terms)


def read_bench(folder: Path, rate: float) -> dict:
    """One rate's bench JSON of a recorded run: bench-rate<R>.json, or .json.gz (the recordings
    committed under benchmarks/recorded/ are gzipped: the GPU device copies at most 64 MiB)."""
    import gzip
    path = Path(folder) / f"bench-rate{rate:g}.json"
    if path.is_file():
        return json.loads(path.read_text())
    gz = path.with_name(path.name + ".gz")
    if gz.is_file():
        with gzip.open(gz, "rt") as f:
            return json.load(f)
    raise SystemExit(f"--from-dir {folder}: {path.name} (or .gz) is missing")


def offline(src: Path, out: Path, fit_rates, load_terms=None) -> int:
    """Re-predict a recorded run: its calibration measurements, plan and bench runs, with the
    current simulator and fit. Writes fidelity.json and profile-serving.json under `out`."""
    from engine.errors import ConfigError
    from engine.model_config import load_model_config
    from engine.plan import Plan
    from model.embedded import resolve_model_source
    from placement.latency_profile import load_profile
    rec_path = src / "fidelity.json"
    if not rec_path.is_file():
        raise SystemExit(f"--from-dir {src}: no fidelity.json there (a benchmarks.fidelity --out folder has one)")
    rec = json.loads(rec_path.read_text())
    plan = Plan.load(src / "plan.json")
    prof = Path(rec["engine_profile"])
    for cand in (prof, REPO / prof, src / prof.name):
        if cand.is_file():
            prof = cand
            break
    else:
        raise ConfigError(f"the recorded engine profile {rec['engine_profile']} is neither in the repo nor in {src}")
    engine_profile = load_profile(prof)
    cpu = plan.prefill.device == "cpu"
    mc = load_model_config(resolve_model_source(plan.model))
    kv_bytes = mc.kv_bytes_per_token("float32" if cpu else None)
    args = rec["args"]
    slo = (args["ttft_slo_s"], args["tpot_slo_s"])
    runs = []
    for r in rec["runs"]:
        runs.append({**{k: r[k] for k in ("rate", "cpu_cores", "probe_before", "probe_after") if k in r},
                     "run": read_bench(src, r["rate"])})
    cores = float(rec.get("cpu_count") or (2 if cpu else 0)) if cpu else 0.0
    out.mkdir(parents=True, exist_ok=True)
    result = dict(rec, recorded_in=str(src), repredicted=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return _predict_and_write(result, plan, engine_profile, rec["calibration"]["raw"], kv_bytes, runs, slo, cores,
                              fit_rates, out, load_terms)


def _predict_and_write(result, plan, engine_profile, cal, kv_bytes, runs, slo, cores, fit_rates, out: Path,
                       load_terms=None) -> int:
    from placement.latency_profile import save_profile
    pred = predict_runs(plan, engine_profile, cal, kv_bytes, plan.prefill.device == "cuda", runs, slo,
                        cpu_cores=cores, fit_rates=fit_rates, load_terms=load_terms)
    for r in pred["runs"]:
        print(format_row(r))
    s = pred["summary"]
    where = f"fitted on rates {s['fit_rates']}" if s["load_terms_from"] != "another recording" else "from another recording"
    print(f"load terms {s['load_terms']} {where}; rates up to the 50% point "
          f"{s['range_rates']}: all within target: {s['all_in_range_ok']}, the checked ones: {s['checked_in_range_ok']}")
    save_profile(pred["profile"], out / "profile-serving.json")
    result.update(fit=pred["fit"], summary=s, runs=pred["runs"])
    (out / "fidelity.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {out / 'fidelity.json'} and {out / 'profile-serving.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

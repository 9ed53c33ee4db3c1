"""The OpenAI HTTP front against the gRPC front of the same `disagg serve`: one workload, one
seed, alternating backends (`disagg bench --backend grpc|openai`), so the difference is what
the HTTP path (FastAPI/uvicorn, SSE, JSON, the openai client) costs. The gRPC front is the
ceiling it is judged against.

    python -m benchmarks.http_front --rate 4 --num-requests 40 --rounds 2 --out /tmp/http_front
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.fidelity import CPU_PLAN, ENV, REPO

FIGURES = (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("inter-token", "itl_s"), ("end-to-end", "e2e_s"))


def start(workdir: Path, plan: dict):
    (workdir / "plan.json").write_text(json.dumps(plan))
    ready = workdir / "ready.json"
    ready.unlink(missing_ok=True)
    log = open(workdir / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--plan", str(workdir / "plan.json"),
                             "--port", "0", "--http-port", "0", "--metrics-port", "-1", "--ready-file", str(ready)],
                            cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not ready.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"disagg serve did not become ready; see {workdir / 'serve.log'}")
        time.sleep(0.5)
    return proc, json.loads(ready.read_text())


def bench(target: list[str], args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "cluster.cli", "bench", *target, "--workload", args.workload, "--rate", str(args.rate),
           "--num-requests", str(args.num_requests), "--seed", str(args.seed), "--max-prompt-len", "256",
           "--max-output-len", "32", "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    if p.returncode:
        raise RuntimeError(p.stdout + p.stderr)
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="azure-conv")
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--num-requests", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="/tmp/http_front")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proc, ready = start(out, CPU_PLAN)
    runs: dict[str, list[dict]] = {"grpc": [], "openai": []}
    try:
        targets = {"grpc": ["--server", f"127.0.0.1:{ready['port']}"],
                   "openai": ["--backend", "openai", "--base-url", f"http://127.0.0.1:{ready['http_port']}/v1"]}
        for r in range(args.rounds):
            for name in (("grpc", "openai") if r % 2 == 0 else ("openai", "grpc")):
                runs[name].append(bench(targets[name], args, out / f"{name}-{r}.json"))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    print(f"{args.workload}, {args.num_requests} requests at {args.rate} req/s, seed {args.seed}, "
          f"{args.rounds} rounds per backend (ms, median over rounds)")
    print(f"{'':<14}{'gRPC p50':>10}{'HTTP p50':>10}{'gRPC p90':>10}{'HTTP p90':>10}")
    summary = {}
    for label, key in FIGURES:
        row = {f"{n}_{q}": sorted(x[key][q] for x in runs[n])[len(runs[n]) // 2] * 1e3
               for n in runs for q in ("p50", "p90")}
        summary[key] = row
        print(f"{label:<14}{row['grpc_p50']:>10.1f}{row['openai_p50']:>10.1f}{row['grpc_p90']:>10.1f}{row['openai_p90']:>10.1f}")
    for n in runs:
        done = [x["num_completed"] for x in runs[n]]
        toks = [x["total_output_tokens"] for x in runs[n]]
        print(f"{n}: completed {done}, output tokens {toks}")
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "figures": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

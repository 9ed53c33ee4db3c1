"""`disagg profile`: time our own engine on this device and fit placement's profiled latency model.

It builds one rank as the workers do (model/rank_runtime.py, no Ray) and times the workers' own
step (model/instance.py `StepLoop.run`: the forward pass plus sampling) over prefill batches
(prompt lengths x batch sizes) and decode steps (batch sizes x context lengths), after warm-up,
as the median of repeats.
`placement.latency_profile.fit_profile` fits prefill a + b sum(l) + c sum(l^2) and decode
a + b sum(ctx) + c batch to them, and the profile goes to
placement/profiles/<device>_<model>.json (or --out), keeping other TP degrees already there.

Only tp=1 is measured (one rank, no collectives). What a serving step costs beyond this (the
worker's scheduling, Ray messages, the controller) is not here: benchmarks/fidelity.py
measures it against a running cluster.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from engine.errors import ConfigError

# (prefill lengths, prefill batch sizes, max prefill batch tokens, decode batches, decode contexts)
GRIDS = {
    "cpu": ([16, 64, 128, 256, 512], [1, 2, 4], 1024, [1, 2, 4, 8, 16, 32], [32, 128, 512, 1024]),
    "cuda": ([16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384], [1, 2, 4, 8], 16384,
             [1, 2, 4, 8, 16, 32, 64, 128, 256], [256, 1024, 2048, 4096, 8192]),
}


class StepTimer:
    """One rank built as the workers build theirs (RankRuntime), with a KV cache big enough
    for the grid, timing the workers' own step (StepLoop.run: forward + sampling)."""

    def __init__(self, model: str, device: str, dtype: str, block_size: int, num_tokens: int):
        import torch

        from model.instance import StepLoop
        from model.rank_runtime import WorkerConfig
        self.torch = torch
        self.device = device
        wanted = -(-num_tokens // block_size) + 1
        # On a GPU the cache is sized from memory (grid points that do not fit are skipped).
        cfg = WorkerConfig(instance_id="profile", model=model, device=device, dtype=dtype, block_size=block_size,
                           num_kv_blocks=wanted if device == "cpu" else 0)
        self.loop = StepLoop(cfg)
        self.model = self.loop.rt.model
        self.num_blocks = self.loop.rt.num_blocks
        self.block_size = block_size

    def fits(self, batch: int, length: int) -> bool:
        return batch * -(-length // self.block_size) <= self.num_blocks

    def _requests(self, batch: int, length: int):
        from engine.request import Request
        from engine.sampling_params import SamplingParams
        sp, v, n = SamplingParams(max_tokens=16, ignore_eos=True), self.model.cfg.vocab_size, -(-length // self.block_size)
        reqs = []
        for i in range(batch):
            r = Request(f"p{i}", [(i * 7919 + j * 31) % v for j in range(length)], sp)
            r.block_ids = list(range(i * n, (i + 1) * n))
            reqs.append(r)
        return reqs

    def prefill_step(self, batch: int, length: int):
        from engine.batching import Batch, PrefillChunk
        return self._scheduled(Batch(prefill=[PrefillChunk(r, 0, length) for r in self._requests(batch, length)]))

    def decode_step(self, batch: int, context: int):
        """`batch` requests at `context` tokens, each decoding its last one."""
        from engine.batching import Batch
        return self._scheduled(Batch(decode=self._requests(batch, context)))

    def _scheduled(self, batch):
        from model.instance import Scheduled, StepMsg
        from model.runner import StepInput
        return Scheduled(batch, StepMsg(StepInput.from_batch(batch)))

    def time(self, sched, warmup: int, repeats: int, clock: str = "wall") -> float:
        """Median seconds of one worker step, forward + sampling (synchronised on CUDA).
        clock="cpu" counts the CPU time of this process instead of wall time: on a shared CPU
        machine it leaves out the time other processes hold the core (meaningful with one
        intra-op thread only)."""
        sync = self.torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        now = time.process_time if clock == "cpu" else time.perf_counter
        times = []
        for k in range(warmup + repeats):
            sync()
            t0 = now()
            self.loop.run(sched)
            sync()
            if k >= warmup:
                times.append(now() - t0)
        return statistics.median(times)


def measure(timer: StepTimer, grid, warmup: int, repeats: int, log=None, clock: str = "wall") -> list[dict]:
    """Samples in placement.latency_profile's format, prefill then decode."""
    lens, batches, max_tokens, dec_batches, contexts = grid
    samples = []
    timer.time(timer.prefill_step(1, lens[0]), 2, 1)          # first calls pay lazy initialisation
    for length in lens:
        for b in batches:
            if b * length <= max_tokens and timer.fits(b, length):
                t = timer.time(timer.prefill_step(b, length), warmup, repeats, clock)
                samples.append({"phase": "prefill", "prompt_lens": [length] * b, "time_s": t})
                if log:
                    log(f"prefill {b} x {length:>5} tokens: {t * 1e3:8.2f} ms")
    for b in dec_batches:
        for c in contexts:
            if timer.fits(b, c):
                t = timer.time(timer.decode_step(b, c), warmup, repeats, clock)
                samples.append({"phase": "decode", "batch_size": b, "sum_context": b * c, "time_s": t})
                if log:
                    log(f"decode  {b:>3} x {c:>5} context: {t * 1e3:8.2f} ms")
    return samples


def device_name(device: str) -> str:
    """"cpu", or the placement device-table name found in the CUDA device's name ("H100")."""
    if device == "cpu":
        return "cpu"
    import torch

    from placement.gpus import DEVICES
    full = torch.cuda.get_device_name(0)
    return next((k for k in sorted(DEVICES, key=len, reverse=True) if k.split("-")[0] in full), full)


def model_name(model: str) -> str:
    p = Path(model)
    return p.name if p.is_dir() else model


def prediction_errors(profile: dict, tp: int = 1) -> list[float]:
    """Relative error of the fitted model at every sample it was fitted to."""
    from placement.latency_profile import ProfiledModel
    m = ProfiledModel(profile, tp)
    errs = []
    for s in profile["tp"][str(tp)]["samples"]:
        pred = (m.prefill_time(s["prompt_lens"]) if s["phase"] == "prefill"
                else m.decode_time(s["batch_size"], s["sum_context"]))
        errs.append(abs(pred - s["time_s"]) / s["time_s"])
    return errs


def run_profile(model: str = "embedded", device: str = "cpu", dtype: str = "auto", tp: int = 1,
                grid=None, warmup: int = 1, repeats: int = 3, torch_threads: int = 0, block_size: int = 16,
                out: str | None = None, name: str | None = None, log=None, clock: str = "wall") -> tuple[dict, Path]:
    """Measure, fit and save. Returns (profile, path written)."""
    if tp != 1:
        raise ConfigError(f"--tp {tp}: `disagg profile` measures tp=1 only (one rank, no collectives)")
    import torch

    from placement.latency_profile import fit_profile, load_profile, profile_path, save_profile
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here")
    if warmup < 0 or repeats < 1:
        raise ConfigError("--warmup must be >= 0 and --repeats >= 1")
    if torch_threads:
        torch.set_num_threads(torch_threads)
    if clock == "cpu" and (device != "cpu" or torch.get_num_threads() != 1):
        raise ConfigError("--clock cpu times one CPU thread: use it with --device cpu --torch-threads 1")
    grid = grid or GRIDS[device]
    num_tokens = max(max(b * length for length in grid[0] for b in grid[1] if b * length <= grid[2]),
                     max(grid[3]) * max(grid[4]))
    timer = StepTimer(model, device, dtype, block_size, num_tokens)
    t0 = time.perf_counter()
    samples = measure(timer, grid, warmup, repeats, log, clock)
    dev, mname = name or device_name(device), model_name(model)
    path = Path(out) if out else profile_path(dev, mname)
    base = None
    if path.is_file():
        try:
            old = load_profile(path)
            base = old if (old["device"], old["model"]) == (dev, mname) else None
        except ConfigError:
            base = None          # an unreadable old file is replaced
    profile = fit_profile(samples, dev, mname, tp, base)
    profile["tp"][str(tp)]["measured_with"] = {
        "torch_threads": torch.get_num_threads(), "dtype": str(next(timer.model.parameters()).dtype),
        "block_size": block_size, "clock": clock, "warmup": warmup, "repeats": repeats, "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__, "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    return profile, save_profile(profile, path)


def _ints(text: str) -> list[int]:
    import argparse
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def add_profile_args(p) -> None:
    p.add_argument("--model", default="embedded", help="model folder, preset name, or 'embedded' (default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (only 1 is measured)")
    p.add_argument("--torch-threads", type=int, default=0, help="intra-op threads (0 = torch default); "
                   "match the plan's torch_threads")
    p.add_argument("--prefill-lens", type=_ints, default=None, help="prompt lengths, e.g. 16,64,256")
    p.add_argument("--prefill-batches", type=_ints, default=None, help="prompts per prefill batch, e.g. 1,2,4")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="skip prefill batches above this")
    p.add_argument("--decode-batches", type=_ints, default=None, help="decode batch sizes, e.g. 1,8,32")
    p.add_argument("--decode-contexts", type=_ints, default=None, help="context length per request")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per grid point")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per grid point (the median is kept)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: process CPU time, immune to other load on a shared CPU machine (1 thread only)")
    p.add_argument("--device-name", default=None, help="name in the profile (default: cpu, or H100 etc.)")
    p.add_argument("--out", default=None, help="profile path (default placement/profiles/<device>_<model>.json)")
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    d = GRIDS[args.device]
    grid = (args.prefill_lens or d[0], args.prefill_batches or d[1], args.max_batch_tokens or d[2],
            args.decode_batches or d[3], args.decode_contexts or d[4])
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    profile, path = run_profile(args.model, args.device, args.dtype, args.tp, grid, args.warmup, args.repeats,
                                args.torch_threads, out=args.out, name=args.device_name, log=log,
                                clock=args.clock)
    entry = profile["tp"][str(args.tp)]
    errs = sorted(prediction_errors(profile, args.tp))
    print(f"prefill: a={entry['prefill']['a'] * 1e3:.3f} ms  b={entry['prefill']['b'] * 1e6:.3f} us/token  "
          f"c={entry['prefill']['c'] * 1e9:.3f} ns/token^2, floor {entry.get('prefill_floor_s', 0) * 1e3:.3f} ms")
    print(f"decode:  a={entry['decode']['a'] * 1e3:.3f} ms  b={entry['decode']['b'] * 1e9:.3f} ns/context token  "
          f"c={entry['decode']['c'] * 1e6:.3f} us/request")
    print(f"fit over {len(errs)} points: median error {errs[len(errs) // 2]:.1%}, max {errs[-1]:.1%} "
          f"(prefill max {entry['max_rel_error']['prefill']:.1%}, decode max {entry['max_rel_error']['decode']:.1%})")
    print(f"wrote {path}")
    return 0

"""Engine benchmark (issue 6): our model runner at `llama-3-8b` shape on one GPU, beside its
ceilings and beside HF transformers in the same run.

  decode   tokens/s and achieved GB/s = (weights + KV bytes read per step) / step time, batch
           1-256 x context 512-8k (what fits), judged against the streaming-read bandwidth
           measured in the same run (benchmarks/ceilings.py), the copy bandwidth beside it
  prefill  TFLOP/s and MFU = (matmul + causal attention FLOPs) / time, 1k-16k tokens, judged
           against the bf16 matmul rate
  short    prefills of 16-1024 tokens (1-8 sequences), wall clock through sampling, with the
           prefill CUDA graphs and eagerly: the launch floor the graphs remove
  HF       transformers `generate` decode tokens/s at batch 1 and 32, forward TFLOP/s at 1k/4k/8k
           (random bf16 weights, SDPA, dynamic cache)

Decode step time is the engine's whole step, wall clock: metadata packing, the host-to-device
copy, the CUDA-graph replay, the logits GEMM and greedy sampling (whose .tolist() is the step's
one synchronisation); median of 20 after 3 warm-ups. `gpu_ms` beside it is the replay plus
logits alone (do_bench median). Prefill is timed with CUDA events around `runner.execute`.
Dummy weights and KV are random (never zeros); block tables are scattered. Weight bytes count
every matrix once and the embedding table as the rows gathered; the logits GEMM of prefill
counts one row per sequence, as the engine computes. Usage:
  python -m benchmarks.engine --out engine.json [--quick] [--no-hf]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import time

import torch
from triton.testing import do_bench

from engine.sampling_params import SamplingParams
from benchmarks import ceilings
from model.kv_cache import allocate_kv_cache
from model.loader import build_model
from model.runner import ModelRunner, StepInput
from model.sampler import Sampler

MODEL = "llama-3-8b"
BS = 16
DECODE_BATCH = [1, 2, 4, 8, 16, 32, 64, 128, 256]
DECODE_CONTEXT = [512, 1024, 2048, 4096, 8192]
PREFILL_TOKENS = [1024, 2048, 4096, 8192, 16384]
SHORT_PREFILL = [(1, 16), (1, 128), (1, 512), (1, 1024), (4, 128), (8, 64)]   # (sequences, tokens each)
KV_TOKENS = 256 * 1024          # 32 GiB at this shape: every grid point with batch x context <= it
HF_DECODE_BATCH, HF_PROMPT, HF_NEW_TOKENS = [1, 32], 512, 33
HF_PREFILL_TOKENS = [1024, 4096, 8192]


class Engine:
    """The model, a KV cache of KV_TOKENS random rows, and the runner with its decode graphs."""

    def __init__(self, max_model_len: int = 8192):
        t0 = time.perf_counter()
        self.model = build_model(MODEL, device="cuda", dtype="bfloat16", max_positions=max(PREFILL_TOKENS))
        self.cfg = cfg = self.model.cfg
        self.num_blocks = KV_TOKENS // BS + 1
        kv = allocate_kv_cache(cfg.num_layers, self.num_blocks, BS, cfg.num_kv_heads, cfg.head_dim,
                               torch.bfloat16, "cuda")
        kv.normal_()
        self.build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.runner = ModelRunner(self.model, kv, BS, max_batch_size=max(DECODE_BATCH),
                                  max_model_len=max_model_len)
        self.capture_s = time.perf_counter() - t0
        self.sampler = Sampler("cuda", 0)
        params = list(self.model.named_parameters())
        embed = self.model.embed_tokens.weight
        self.matrix_bytes = sum(p.numel() * p.element_size() for _, p in params) - embed.numel() * embed.element_size()
        self.layer_params = sum(p.numel() for n, p in params if n.startswith("layers.") and p.dim() == 2)

    def tables(self, batch: int, context: int) -> list[list[int]]:
        n = -(-context // BS)
        ids = torch.randperm(self.num_blocks - 1)[:batch * n].add_(1).view(batch, n)
        return ids.tolist()

    def decode_bytes(self, batch: int, context: int) -> int:
        row = self.cfg.hidden_size * 2
        return self.matrix_bytes + batch * row + batch * context * self.cfg.kv_bytes_per_token()

    @torch.inference_mode()
    def decode_point(self, batch: int, context: int, steps: int) -> dict:
        seqs = [(t, context - 1, tb) for t, tb in zip(torch.randint(0, self.cfg.vocab_size, (batch,)).tolist(),
                                                      self.tables(batch, context))]
        step = StepInput(decode=seqs)
        sp = [SamplingParams(max_tokens=1)] * batch
        times = []
        for i in range(3 + steps):
            t0 = time.perf_counter()
            self.sampler(self.runner.execute(step), sp, [0] * batch)   # .tolist(): the one sync
            if i >= 3:
                times.append(time.perf_counter() - t0)
        step_ms = statistics.median(times) * 1e3
        graphs = self.runner.graphs
        b = graphs.size_for(batch)
        out = graphs.outputs[b][:batch]
        gpu_ms = do_bench(lambda: (graphs.graphs[b].replay(), self.model.compute_logits(out)),
                          warmup=10, rep=60, return_mode="median")
        nbytes = self.decode_bytes(batch, context)
        return {"batch": batch, "context": context, "graph_size": b, "step_ms": step_ms,
                "gpu_ms": gpu_ms, "tokens_per_s": batch / step_ms * 1e3,
                "GBps": nbytes / step_ms / 1e6, "gpu_GBps": nbytes / gpu_ms / 1e6, "bytes": nbytes}

    def prefill_flops(self, tokens: int) -> float:
        cfg = self.cfg
        return 2.0 * tokens * self.layer_params + 2.0 * cfg.hidden_size * cfg.vocab_size \
            + cfg.attention_flops(tokens, tokens, causal=True)

    @torch.inference_mode()
    def prefill_point(self, tokens: int, reps: int) -> dict:
        table = list(range(1, -(-tokens // BS) + 1))
        ids = torch.randint(0, self.cfg.vocab_size, (tokens,)).tolist()
        step = StepInput(prefill=[(ids, 0, table, True)])
        ms = cuda_event_ms(lambda: self.runner.execute(step), warmup=2, reps=reps)
        flops = self.prefill_flops(tokens)
        return {"tokens": tokens, "ms": ms, "TFLOPs": flops / ms / 1e9, "flops": flops,
                "attention_share": self.cfg.attention_flops(tokens, tokens) / flops}


@torch.inference_mode()
def short_prefill_point(eng, runner, seqs: int, tokens: int, reps: int = 10) -> float:
    """Wall ms of a prefill of `seqs` new sequences of `tokens` tokens each, through the sampled
    tokens' .tolist() (what a prefill worker's step waits for); median of reps after 3 warm-ups."""
    n = -(-tokens // BS)
    chunks = [(torch.randint(0, eng.cfg.vocab_size, (tokens,)).tolist(), 0, list(range(1 + i * n, 1 + (i + 1) * n)), True)
              for i in range(seqs)]
    step, sp = StepInput(prefill=chunks), [SamplingParams(max_tokens=1)] * seqs
    times = []
    for i in range(3 + reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.sampler(runner.execute(step), sp, [0] * seqs)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cuda_event_ms(fn, warmup: int, reps: int) -> float:
    """Median of `reps` runs of fn between CUDA events, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.inference_mode()
def linear_only_ms(model, rows: int) -> float:
    """Every matmul of a forward pass over `rows` tokens (no attention, norms or activations),
    CUDA-graph replayed for rows <= 256: how fast cuBLAS alone moves or multiplies the weights."""
    mats = [p for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2]
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], device="cuda", dtype=torch.bfloat16) for w in mats}
    head = model.lm_head.weight
    x_head = torch.randn(1 if rows > 256 else rows, head.shape[1], device="cuda", dtype=torch.bfloat16)

    def run():
        for w in mats:
            torch.nn.functional.linear(xs[w.shape[1]], w)
        torch.nn.functional.linear(x_head, head)
    if rows > 256:
        return cuda_event_ms(run, 1, 3)
    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    return do_bench(g.replay, warmup=10, rep=60, return_mode="median")


KERNEL_KINDS = (("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
                ("attention", ("_prefill_kernel", "_decode_split_kernel", "_decode_reduce_kernel")),
                ("rmsnorm", ("_rmsnorm_kernel",)), ("rope", ("_rope_kernel",)),
                ("kv_write", ("_write_kv_kernel",)), ("memcpy", ("memcpy", "memset")),
                ("elementwise", ("elementwise", "silu", "mul", "copy")))


@torch.inference_mode()
def kernel_breakdown(fn, reps: int = 3, top: int = 10) -> dict:
    """GPU time per kind of kernel in one call of fn (torch.profiler, mean of reps), beside the
    call's wall time: where a step's time goes, and how much is idle GPU between kernels."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / reps
    kinds, ranked = {}, []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if us <= 0:
            continue
        ms = us / 1e3 / reps
        kind = next((k for k, keys in KERNEL_KINDS if any(x in e.key.lower() for x in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
        ranked.append((ms, e.key[:80], e.count // reps))
    ranked.sort(reverse=True)
    return {"wall_ms": wall_ms, "kernel_ms": sum(kinds.values()), "by_kind_ms": kinds,
            "top": [{"ms": ms, "kernel": k, "calls": n} for ms, k, n in ranked[:top]]}


def run_ours(quick: bool, log, batches=None, contexts=None, prefill_tokens=None) -> dict:
    eng = Engine()
    log(f"model built in {eng.build_s:.1f} s; {len(eng.runner.graphs.sizes)} decode graphs captured "
        f"in {eng.capture_s:.1f} s")
    decode = []
    for b in batches or (DECODE_BATCH[:4] if quick else DECODE_BATCH):
        for c in contexts or (DECODE_CONTEXT[:2] if quick else DECODE_CONTEXT):
            if b * c <= KV_TOKENS:
                row = eng.decode_point(b, c, steps=20)
                decode.append(row)
                log(f"decode  b={b:>3} ctx={c:>5}: {row['step_ms']:7.2f} ms/step ({row['gpu_ms']:6.2f} GPU) "
                    f"{row['tokens_per_s']:8.0f} tok/s  {row['GBps']:6.0f} GB/s")
    prefill = []
    for s in prefill_tokens or (PREFILL_TOKENS[:2] if quick else PREFILL_TOKENS):
        row = eng.prefill_point(s, reps=5)
        prefill.append(row)
        log(f"prefill {s:>5} tokens: {row['ms']:8.2f} ms  {row['TFLOPs']:5.0f} TFLOP/s")
    short = []
    eager = ModelRunner(eng.model, eng.runner.kv_cache, BS, enforce_eager=True)
    for seqs, tokens in SHORT_PREFILL:
        row = {"seqs": seqs, "tokens_each": tokens, "graph_ms": short_prefill_point(eng, eng.runner, seqs, tokens),
               "eager_ms": short_prefill_point(eng, eager, seqs, tokens)}
        row["gpu_bound_ms"] = linear_only_ms(eng.model, seqs * tokens) if seqs * tokens <= 256 else None
        short.append(row)
        log(f"short prefill {seqs} x {tokens:>4} tokens: graph {row['graph_ms']:6.2f} ms, eager {row['eager_ms']:6.2f} ms")
    del eager
    breakdown = {"linear_only_ms": {}}
    for rows in (1, 32, 4096, 8192):
        breakdown["linear_only_ms"][str(rows)] = linear_only_ms(eng.model, rows)
    graphs = eng.runner.graphs
    for b in (1, 8):
        eng.decode_point(b, 512, steps=1)   # leaves the batch-b graph's inputs at context 512
        out_b = graphs.outputs[b][:b]
        breakdown[f"decode_b{b}_ctx512"] = kernel_breakdown(
            lambda: (graphs.graphs[b].replay(), eng.model.compute_logits(out_b)), top=30)
    for n in (1024, 4096):
        ids = torch.randint(0, eng.cfg.vocab_size, (n,)).tolist()
        step = StepInput(prefill=[(ids, 0, list(range(1, n // BS + 1)), True)])
        breakdown[f"prefill_{n}"] = kernel_breakdown(lambda: eng.runner.execute(step))
    for name in ("decode_b1_ctx512", "decode_b8_ctx512", "prefill_1024", "prefill_4096"):
        b = breakdown[name]
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(b["by_kind_ms"].items(), key=lambda kv: -kv[1]))
        log(f"{name}: wall {b['wall_ms']:.2f} ms, kernels {b['kernel_ms']:.2f} ms ({kinds})")
    breakdown["matrix_bytes"] = eng.matrix_bytes
    breakdown["layer_params"] = eng.layer_params
    out = {"decode": decode, "prefill": prefill, "short_prefill": short, "breakdown": breakdown,
           "build_s": eng.build_s, "graph_capture_s": eng.capture_s,
           "graph_sizes": eng.runner.graphs.sizes, "prefill_graph_sizes": eng.runner.prefill_graphs.sizes,
           "num_kv_blocks": eng.num_blocks}
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    return out


def hf_model(cfg):
    """LlamaForCausalLM at cfg's shape, random bf16 weights made on the GPU, SDPA attention."""
    import transformers as tf
    d = cfg.to_hf_dict()
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k, None)
    hc = tf.LlamaConfig(**d)
    hc._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = tf.LlamaForCausalLM(hc).eval()
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return model, tf.__version__


@torch.inference_mode()
def run_hf(cfg, layer_params: int, log) -> dict:
    model, version = hf_model(cfg)
    out = {"transformers": version, "attn_implementation": model.config._attn_implementation,
           "decode": [], "prefill": []}
    for b in HF_DECODE_BATCH:
        ids = torch.randint(0, cfg.vocab_size, (b, HF_PROMPT), device="cuda")

        def gen(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            return time.perf_counter() - t0
        gen(3)                                   # warm-up
        first, full = gen(1), gen(HF_NEW_TOKENS)
        step_s = (full - first) / (HF_NEW_TOKENS - 1)
        out["decode"].append({"batch": b, "context": HF_PROMPT, "step_ms": step_s * 1e3,
                              "tokens_per_s": b / step_s})
        log(f"HF decode b={b:>3} ctx={HF_PROMPT}: {step_s * 1e3:7.2f} ms/step {b / step_s:8.1f} tok/s")
    for s in HF_PREFILL_TOKENS:
        ids = torch.randint(0, cfg.vocab_size, (1, s), device="cuda")
        ms = cuda_event_ms(lambda: model(ids, logits_to_keep=1), warmup=1, reps=3)
        flops = 2.0 * s * layer_params + 2.0 * cfg.hidden_size * cfg.vocab_size + cfg.attention_flops(s, s)
        out["prefill"].append({"tokens": s, "ms": ms, "TFLOPs": flops / ms / 1e9})
        log(f"HF prefill {s:>5} tokens: {ms:8.2f} ms  {flops / ms / 1e9:5.0f} TFLOP/s")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def summary(res: dict) -> list[str]:
    """The table printed last: each figure beside the ceilings measured in this run, and HF."""
    ceil = res["ceilings"]
    read, copy, mm = ceil["read_GBps"], ceil["copy_GBps"], ceil["matmul_bf16_TFLOPs"]
    lines = [f"ceilings measured in this run on {ceil['device']}: streaming read {read:.0f} GB/s, "
             f"copy {copy:.0f} GB/s, bf16 matmul {mm:.0f} TFLOP/s"]
    hf_dec = {r["batch"]: r for r in res.get("hf", {}).get("decode", [])}
    hf_pre = {r["tokens"]: r for r in res.get("hf", {}).get("prefill", [])}
    lines.append("decode  batch ctx    tok/s    GB/s  %read  %copy  gpu GB/s  gpu %read   HF tok/s")
    for r in res["ours"]["decode"]:
        hf = hf_dec.get(r["batch"]) if r["context"] == HF_PROMPT else None
        lines.append(f"        {r['batch']:>5} {r['context']:>5} {r['tokens_per_s']:8.0f} {r['GBps']:7.0f} "
                     f"{r['GBps'] / read:6.0%} {r['GBps'] / copy:6.0%} {r['gpu_GBps']:9.0f} {r['gpu_GBps'] / read:9.0%}"
                     f"   {hf['tokens_per_s'] if hf else float('nan'):8.1f}")
    lines.append("prefill tokens  TFLOP/s   MFU   HF TFLOP/s  HF MFU")
    for r in res["ours"]["prefill"]:
        hf = hf_pre.get(r["tokens"])
        hf_t = hf["TFLOPs"] if hf else float("nan")
        lines.append(f"        {r['tokens']:>6} {r['TFLOPs']:8.0f} {r['TFLOPs'] / mm:6.0%}  {hf_t:9.0f} {hf_t / mm:7.0%}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="engine.json")
    ap.add_argument("--quick", action="store_true", help="a few points only (smoke test)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    ap.add_argument("--batches", type=_ints, default=None, help="decode batch sizes (default: the full grid)")
    ap.add_argument("--contexts", type=_ints, default=None, help="decode contexts (default: the full grid)")
    ap.add_argument("--prefill-tokens", type=_ints, default=None, help="prefill lengths (default: 1k-16k)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.engine: needs a CUDA GPU", flush=True)
        return 2

    def log(s):
        print(s, flush=True)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "python": platform.python_version(), "model": MODEL, "block_size": BS}
    res["ceilings"] = ceilings.measure()
    log(f"ceilings: {res['ceilings']}")
    res["ours"] = run_ours(args.quick, log, args.batches, args.contexts, args.prefill_tokens)
    _save(args.out, res)
    if not args.no_hf:
        try:
            from engine.model_config import PRESETS
            res["hf"] = run_hf(PRESETS[MODEL], res["ours"]["breakdown"]["layer_params"], log)
        except Exception as e:  # noqa: BLE001 - our numbers stand without the baseline
            res["hf"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"HF baseline failed: {res['hf']['error']}")
    _save(args.out, res)
    print("\n".join(summary(res)))
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _save(path, res):
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())

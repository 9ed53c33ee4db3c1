"""Builds points.csv from its sources (run: python -m placement.validation.make_points).

Sources, each cited in docs/latency-model.md:
- `distserve`, `vllm`: DistServe's A100-80GB latency profiles of its own engine and of vLLM
  (LLMServe/DistServe, simdistserve/estimators/profile_data/profiler-a100-80g.{distserve,vllm}.json):
  least-squares fits of their measured step times, in ms, prefill = a + b*sum(l) + c*sum(l^2),
  decode = a + b*sum(context) + c*batch (one coefficient set below batch 95, one above).
  Evaluated here inside the range they were measured on. OPT-175B is left out: its weights
  (350 GB) do not fit the TP degrees profiled (1-4 x 80 GB), and its TP8 fit is degenerate.
- `nemo`: NVIDIA NeMo Framework user guide, "Llama-2 Results / Inference Performance"
  (TensorRT-LLM engines, 128 input and 20 output tokens, batch 1-8, A100 80GB SXM4 and
  H100 80GB HBM3, TP 1-8): average end-to-end latency. Only Llama-2-7B rows: the 13B rows
  are below the memory-bandwidth floor (e.g. 13B TP1 batch 1 on H100: 86.4 ms for 20 steps
  that each read 26 GB, i.e. at least 155 ms), so they cannot be what the caption says.
- `disagg`: our own engine's H100 and H200 profiles (placement/profiles/H100_llama-3-8b.json,
  H200_llama-3-8b.json), every measured sample.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROFILES = HERE.parent / "profiles"
FIELDS = ["source", "engine", "gpu", "model", "tp", "phase", "batch", "prompt_len", "context_len",
          "output_len", "measured_s", "split"]

# DistServe A100-80GB fits: {engine: {model: {tp: (prefill, decode_small_bs, decode_large_bs)}}} in ms.
DISTSERVE = {
    "distserve": {
        "opt-13b": {1: ((16.456860, 0.0926475, 6.474786e-06), (19.934703, 6.269357e-04, 0.0385070),
                        (7.166189, 5.798000e-04, 0.158311)),
                    2: ((13.402703, 0.0623429, 2.226884e-06), (13.294796, 3.410922e-04, 0.0629639),
                        (10.638742, 3.118337e-04, 0.0856291)),
                    4: ((10.965725, 0.0346195, 4.751136e-07), (10.256232, 1.878670e-04, 0.0326927),
                        (10.483515, 1.712089e-04, 0.0456665))},
        "opt-66b": {2: ((39.144376, 0.2492994, 2.043458e-05), (48.288015, 9.424344e-04, 0.127550),
                        (28.727694, 4.744848e-04, 0.296178)),
                    3: ((29.998391, 0.1778932, 1.109568e-05), (35.801544, 5.845005e-04, 0.0952670),
                        (22.653862, 5.358489e-04, 0.208514)),
                    4: ((26.765124, 0.1375929, 7.561319e-06), (30.760285, 4.519476e-04, 0.0632842),
                        (27.470821, 4.046846e-04, 0.124807))}},
    "vllm": {
        "opt-13b": {1: ((23.627362, 0.1505456, 8.653484e-06), (19.562534, 4.941121e-04, 0.0506057),
                        (16.838630, 4.389773e-04, 0.140003)),
                    2: ((19.600576, 0.0646752, 6.037182e-06), (20.450487, 1.870012e-04, 0.0726316),
                        (14.956475, 3.809043e-04, 0.0931590)),
                    4: ((21.811659, 0.0367903, 3.023195e-07), (21.584287, 6.461362e-05, 0.0460674),
                        (19.903237, 2.366680e-04, 0.0523044))},
        "opt-66b": {2: ((41.701573, 0.2733149, -5.081535e-06), (47.561201, 3.038428e-03, 0.187448),
                        (22.486466, 5.166777e-03, 0.373547)),
                    3: ((32.674667, 0.1984377, 2.604462e-05), (37.449655, 6.746794e-04, 0.177400),
                        (36.413358, 7.002139e-04, 0.200054)),
                    4: ((30.689635, 0.1520470, 3.286441e-05), (32.984824, 5.788101e-04, 0.113174),
                        (34.049765, 3.554059e-04, 0.162570))}},
}
PREFILL_LENS = (64, 256, 512, 1024, 2048)
DECODE_GRID = ((1, 256), (1, 1024), (8, 512), (32, 512), (64, 1024), (128, 512), (256, 512))

# NeMo Llama-2-7B, 128 in / 20 out: {tp: {batch: (A100 ms, H100 ms)}}.
NEMO_7B = {1: {1: (234.0, 153.8), 2: (249.6, 160.8), 4: (272.6, 174.8), 8: (329.5, 199.2)},
           2: {1: (171.7, 128.6), 2: (180.3, 132.0), 4: (202.9, 137.9), 8: (237.6, 156.2)},
           4: {1: (143.7, 107.4), 2: (149.9, 114.0), 4: (165.2, 120.4), 8: (196.4, 134.6)},
           8: {1: (136.5, 97.6), 2: (143.3, 109.1), 4: (158.6, 116.2), 8: (181.9, 129.1)}}


def _distserve_rows():
    for engine, models in DISTSERVE.items():
        for model, tps in models.items():
            for tp, (pre, small, large) in tps.items():
                a, b, c = pre
                for n in PREFILL_LENS:
                    yield dict(source="distserve-profile", engine=engine, gpu="A100-80GB", model=model,
                               tp=tp, phase="prefill", batch=1, prompt_len=n, context_len=0,
                               output_len=0, measured_s=(a + b * n + c * n * n) / 1e3)
                for batch, ctx in DECODE_GRID:
                    a, b, c = small if batch < 95 else large
                    yield dict(source="distserve-profile", engine=engine, gpu="A100-80GB", model=model,
                               tp=tp, phase="decode", batch=batch, prompt_len=0, context_len=ctx,
                               output_len=0, measured_s=(a + b * batch * ctx + c * batch) / 1e3)


def _nemo_rows():
    for tp, rows in NEMO_7B.items():
        for batch, times in rows.items():
            for gpu, ms in zip(("A100-80GB", "H100"), times):
                yield dict(source="nemo-llama2", engine="trtllm", gpu=gpu, model="llama-2-7b", tp=tp,
                           phase="e2e", batch=batch, prompt_len=128, context_len=0, output_len=20,
                           measured_s=ms / 1e3)


def _profile_rows():
    for gpu in ("H100", "H200"):
        yield from _profile_rows_of(gpu, json.loads((PROFILES / f"{gpu}_llama-3-8b.json").read_text()))


def _profile_rows_of(gpu: str, prof: dict):
    for tp, entry in prof["tp"].items():
        for s in entry["samples"]:
            if s["phase"] == "prefill":
                lens = s["prompt_lens"]
                yield dict(source="disagg-profile", engine="disagg", gpu=gpu, model="llama-3-8b",
                           tp=int(tp), phase="prefill", batch=len(lens), prompt_len=lens[0],
                           context_len=0, output_len=0, measured_s=s["time_s"])
            else:
                b = s["batch_size"]
                yield dict(source="disagg-profile", engine="disagg", gpu=gpu, model="llama-3-8b",
                           tp=int(tp), phase="decode", batch=b, prompt_len=0,
                           context_len=s["sum_context"] // b, output_len=0, measured_s=s["time_s"])


def build_points() -> list[dict]:
    """Every point, with `split`: within each (source, engine, gpu, model, tp, phase) group in
    table order, every third point from the second on is held out ("test"), the rest fit."""
    rows = list(_distserve_rows()) + list(_nemo_rows()) + list(_profile_rows())
    seen: dict[tuple, int] = {}
    for r in rows:
        key = (r["source"], r["engine"], r["gpu"], r["model"], r["tp"], r["phase"])
        i = seen.get(key, 0)
        seen[key] = i + 1
        r["split"] = "test" if i % 3 == 1 else "fit"
        r["measured_s"] = round(r["measured_s"], 7)
    return rows


def main() -> None:
    rows = build_points()
    with open(HERE / "points.csv", "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} points to {HERE / 'points.csv'}")


if __name__ == "__main__":
    main()

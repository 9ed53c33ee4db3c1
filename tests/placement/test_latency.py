"""Roofline and profiled latency models, KV capacity."""
import pytest

from engine.model_config import PRESETS
from placement.gpus import get_device
from placement.latency import Link, RooflineModel
from placement.memory import num_kv_blocks
from placement.latency_profile import ProfiledModel, fit_profile

LLAMA = PRESETS["llama-3-8b"]
H100 = get_device("H100")


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (4, 2)])
@pytest.mark.parametrize("batch,context", [(1, 500), (64, 64 * 1500), (256, 256 * 4000)])
def test_decode_line_matches_decode_time(tp, pp, batch, context):
    m = RooflineModel(LLAMA, H100, tp, pp)
    first, growth, steps = m.decode_line(batch, context)
    for k in range(0, min(steps, 300), 37):
        assert first + k * growth == pytest.approx(m.decode_time(batch, context + batch * k), rel=1e-9)


def test_decode_line_stops_where_compute_overtakes_memory():
    m = RooflineModel(LLAMA, H100)
    batch = 512                                   # compute-heavy batch, short contexts
    first, growth, steps = m.decode_line(batch, batch * 10)
    assert steps < 1 << 30
    assert m.decode_time(batch, batch * (10 + steps)) != pytest.approx(first + steps * growth, rel=1e-6) or steps == 1


def test_roofline_by_hand_memory_bound_decode():
    # One request, 1000 tokens of context: memory bound, reads the weights and 1000 tokens of KV.
    m = RooflineModel(LLAMA, H100)
    bytes_ = LLAMA.weight_bytes() + LLAMA.kv_bytes_per_token() * 1000
    expect = (bytes_ / (H100.memory_bandwidth * H100.memory_efficiency) + H100.step_overhead_s
              + LLAMA.num_layers * (H100.layer_overhead_s + H100.request_overhead_s))
    assert m.decode_time(1, 1000) == pytest.approx(expect, rel=1e-12)


def test_prefill_compute_bound_and_faster_with_tp():
    t1 = RooflineModel(LLAMA, H100, 1).prefill_time([4096])
    t2 = RooflineModel(LLAMA, H100, 2).prefill_time([4096])
    assert t1 > 0.05 and 0.45 * t1 < t2 < 0.6 * t1    # half the FLOPs per rank plus all-reduces
    # pipeline stages do not shorten one batch, they let pp batches overlap
    pp = RooflineModel(LLAMA, H100, 1, 4)
    assert pp.prefill_time([4096]) >= t1 and pp.prefill_interval(pp.prefill_time([4096])) < t1 / 3


def test_cached_prefix_makes_prefill_cheaper():
    m = RooflineModel(LLAMA, H100)
    assert m.prefill_time([2048], [1024]) < m.prefill_time([2048])


def test_kv_transfer_time_by_hand():
    m = RooflineModel(LLAMA, H100)
    assert m.kv_transfer_time(1e9, Link(50e9, 1e-3, False, 2)) == pytest.approx(1e-3 + 0.01)


def test_kv_capacity():
    assert num_kv_blocks(PRESETS["llama-3-70b"], H100, 1, 1, 16) == 0          # 140 GB of weights
    assert num_kv_blocks(PRESETS["llama-3-70b"], H100, 4, 1, 16) > 0
    one, two = (num_kv_blocks(LLAMA, H100, tp, 1, 16) for tp in (1, 2))
    assert two > 2 * one                           # weights paid once


def test_profiled_model_uses_its_coefficients():
    samples = [{"phase": "prefill", "prompt_lens": [n], "time_s": 0.01 + 1e-5 * n + 1e-9 * n * n} for n in (100, 500, 2000, 4000)]
    samples += [{"phase": "decode", "batch_size": b, "sum_context": s, "time_s": 0.005 + 1e-7 * s + 1e-4 * b}
                for b, s in ((1, 100), (8, 8000), (32, 50000), (64, 64000))]
    m = ProfiledModel(fit_profile(samples, "H100", "llama-3-8b", 1))
    assert m.prefill_time([1000, 1000]) == pytest.approx(0.01 + 1e-5 * 2000 + 1e-9 * 2e6, rel=1e-6)
    assert m.decode_time(16, 20000) == pytest.approx(0.005 + 1e-7 * 20000 + 1e-4 * 16, rel=1e-6)

"""The throughput benchmark's workload and bound (benchmarks/throughput.py): the arithmetic the
'x bound' figure in docs/benchmarks.md rests on, checked by hand on small numbers."""
import numpy as np
import pytest

from benchmarks.throughput import sharegpt_lengths, workload_bound
from engine.model_config import PRESETS


def test_sharegpt_rows_fit_and_repeat_with_seed():
    p, o = sharegpt_lengths(300, 4096, seed=0)
    assert len(p) == len(o) == 300 and (p + o <= 4096).all() and (o >= 1).all()
    p2, o2 = sharegpt_lengths(300, 4096, seed=0)
    assert (p == p2).all() and (o == o2).all()
    assert not (sharegpt_lengths(300, 4096, seed=1)[0] == p).all()


def test_bound_by_hand():
    cfg = PRESETS["tiny-llama"]
    prompts, outputs = np.array([10, 20]), np.array([3, 1])
    b = workload_bound(cfg, prompts, outputs, matmul_flops=1e12, read_bps=1e9, max_batch=1,
                       weight_bytes=1000)
    layer = cfg.flops_per_token() / 2 - cfg.vocab_size * cfg.hidden_size
    flops = sum(2 * p * layer + cfg.attention_flops(p, p) + 2 * cfg.hidden_size * cfg.vocab_size for p in (10, 20))
    assert b["prefill_flops"] == pytest.approx(flops)
    # request 0 decodes 2 tokens attending to 11 and 12 tokens; request 1 decodes none
    assert b["decode_tokens"] == 2 and b["kv_token_reads"] == 23
    assert b["min_decode_steps"] == 2        # batch limit 1: one step per decode token
    assert b["decode_s"] == pytest.approx((23 * cfg.kv_bytes_per_token() + 2 * 1000) / 1e9)
    assert b["bound_s"] == pytest.approx(b["prefill_s"] + b["decode_s"])
    wide = workload_bound(cfg, prompts, outputs, 1e12, 1e9, max_batch=256, weight_bytes=1000)
    assert wide["min_decode_steps"] == 2     # the longest request still needs 2 sequential steps

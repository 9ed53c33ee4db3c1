"""Attainment and goodput on a case small enough to work out by hand."""
import numpy as np
import pytest

from placement.slo_metrics import search_goodput
from placement.simulator import simulate
from tests.placement.helpers import disagg, group, profile, workload

# One prefill instance, 1 s per request (a=1, b=c=0), room for one request per batch; ten
# requests arrive every 1/r s. Busy from the start when r > 1: request i starts at i and
# finishes at i + 1, so TTFT_i = 1 + i (1 - 1/r). With a 1.5 s TTFT target request i meets it
# iff i (1 - 1/r) <= 0.5; 90% attainment needs i = 8 to meet it: r <= 16/15.
DEP = disagg(prefill=group(max_batch_tokens=100, prof=profile(prefill=(1.0, 0.0, 0.0))))
BASE = workload(np.arange(10.0), [100] * 10, [1] * 10)     # rate 1


def attainment_at(rate):
    return simulate(DEP, BASE.at_rate(rate), phase="prefill").attainment(1.5, 1.0)


def test_ttft_queueing_by_hand():
    r = simulate(DEP, BASE.at_rate(2.0), phase="prefill")
    np.testing.assert_allclose(r.ttft_s, 1 + np.arange(10) * 0.5)


@pytest.mark.parametrize("rate,expected", [(0.5, 1.0), (1.0, 1.0), (2.0, 0.2), (16 / 15, 0.9), (1.1, 0.6)])
def test_attainment_by_hand(rate, expected):
    # r = 1.1: i (1 - 1/1.1) = i / 11 <= 0.5 for i <= 5 -> 6 of 10.
    assert attainment_at(rate) == pytest.approx(expected)


def test_goodput_by_hand():
    g = search_goodput(attainment_at, target=0.9, start_rate=0.25, rel_tol=0.005)
    assert 16 / 15 * 0.995 <= g.rate <= 16 / 15
    assert g.attainment >= 0.9
    assert all((a >= 0.9) == (r <= 16 / 15 + 1e-9) for r, a in g.probes)


def test_goodput_zero_when_nothing_passes():
    g = search_goodput(lambda rate: 0.0, target=0.9, start_rate=1.0)
    assert g.rate == 0.0


def test_early_stop_only_when_target_is_out_of_reach():
    full = simulate(DEP, BASE.at_rate(2.0), phase="prefill")
    cut = simulate(DEP, BASE.at_rate(2.0), phase="prefill", slo=(1.5, 1.0), max_misses=1)
    assert full.completed and not cut.completed
    assert cut.attainment(1.5, 1.0) < 0.9 and full.attainment(1.5, 1.0) == pytest.approx(0.2)

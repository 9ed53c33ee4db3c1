"""Workloads: the trace files, arrivals, rates, seeds."""
import numpy as np
import pytest

from engine.errors import ConfigError
from placement.workload import NAMED, load_trace, make_workload, prompt_token_ids

ROWS = {"azure-conv": 19366, "azure-code": 8819, "mooncake-conv": 12031, "mooncake-synthetic": 3993,
        "sharegpt": 30731, "arxiv": 28257}      # placement/traces/README.md


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_traces_load_whole(name):
    tr = load_trace(name)
    assert len(tr.prompt_lens) == ROWS[name] and (tr.prompt_lens > 0).all() and (tr.output_lens > 0).all()
    assert (tr.timestamps_s is None) == (name in ("sharegpt", "arxiv"))


def test_azure_conv_replay_matches_readme():
    wl = make_workload("azure-conv")
    assert wl.num_requests == 19366 and wl.rate == pytest.approx(5.53, abs=0.01)
    assert wl.prompt_lens.mean() == pytest.approx(1154.7, abs=0.1) and wl.output_lens.mean() == pytest.approx(211.1, abs=0.1)


def test_at_rate_scales_time_only():
    wl = make_workload("azure-conv", num_requests=500)
    fast = wl.at_rate(50.0)
    assert fast.rate == pytest.approx(50.0)
    np.testing.assert_allclose(fast.arrival_s, wl.arrival_s * wl.rate / 50.0)
    assert (fast.prompt_lens == wl.prompt_lens).all()


def test_poisson_and_gamma_are_seeded():
    a = make_workload("sharegpt", rate=4.0, num_requests=3000, arrival="gamma", cv=3.0, seed=7)
    b = make_workload("sharegpt", rate=4.0, num_requests=3000, arrival="gamma", cv=3.0, seed=7)
    c = make_workload("sharegpt", rate=4.0, num_requests=3000, arrival="gamma", cv=3.0, seed=8)
    assert (a.arrival_s == b.arrival_s).all() and (a.prompt_lens == b.prompt_lens).all()
    assert not (a.arrival_s == c.arrival_s).all()
    gaps = np.diff(a.arrival_s)
    assert a.rate == pytest.approx(4.0) and gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.2)
    p = np.diff(make_workload("arxiv", rate=2.0, num_requests=3000, seed=1).arrival_s)
    assert p.std() / p.mean() == pytest.approx(1.0, rel=0.1)          # Poisson: CV 1


def test_spread_sample_covers_the_whole_trace():
    head = make_workload("azure-conv", num_requests=100)
    spread = make_workload("azure-conv", num_requests=100, sample="spread")
    assert head.arrival_s[-1] < 60 and spread.arrival_s[-1] > 3000


def test_lengths_clipped_to_the_model():
    wl = make_workload("mooncake-conv", num_requests=200, max_model_len=8192)
    assert ((wl.prompt_lens + wl.output_lens) <= 8192).all() and (wl.output_lens >= 1).all()


def test_prompt_ids_share_prefixes_by_hash_id():
    a = prompt_token_ids(0, 1200, 32000, hash_ids=(0, 5, 9))
    b = prompt_token_ids(1, 700, 32000, hash_ids=(0, 5))
    c = prompt_token_ids(2, 700, 32000)
    assert len(a) == 1200 and a[:700] == b and a[:512] != c[:512]


def test_unknown_workload_and_bad_options():
    with pytest.raises(ConfigError, match="neither a known name"):
        make_workload("nope")
    with pytest.raises(ConfigError, match="no timestamps"):
        make_workload("sharegpt", arrival="trace")
    with pytest.raises(ConfigError, match="rate must be > 0"):
        make_workload("azure-conv", rate=0)

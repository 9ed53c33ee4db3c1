"""The simulator against answers computed by hand."""
import numpy as np
import pytest

from engine.model_config import PRESETS
from placement.deployment import Deployment, InstanceGroup
from placement.gpus import get_device
from placement.latency import RooflineModel
from placement.memory import num_kv_blocks
from placement.simulator import simulate
from tests.placement.helpers import KV_BYTES, LINK_BW, LINK_LATENCY_S, disagg, group, profile, workload


def test_one_request_alone_gets_the_latency_models_times_roofline():
    model, dev = PRESETS["llama-3-8b"], get_device("H100")
    lat = RooflineModel(model, dev, tp=2, pp=1)
    g = lambda: InstanceGroup(1, lat, dev, num_kv_blocks(model, dev, 2, 1, 16))
    dep = Deployment(16, model.kv_bytes_per_token(), prefill=g(), decode=g())
    r = simulate(dep, workload([3.0], [1000], [50]))
    ttft = lat.prefill_time([1000])
    transfer = lat.kv_transfer_time(1000 * model.kv_bytes_per_token(), dep.link(0, 0))
    decode = sum(lat.decode_time(1, 1001 + k) for k in range(49))     # tokens 2..50
    assert r.ttft_s[0] == pytest.approx(ttft, rel=1e-12)
    assert r.transfer_end_s[0] - r.first_token_s[0] == pytest.approx(transfer, rel=1e-12)
    assert r.finish_s[0] - 3.0 == pytest.approx(ttft + transfer + decode, rel=1e-9)
    assert r.tpot_s[0] == pytest.approx((transfer + decode) / 49, rel=1e-9)
    parts = r.breakdown()
    assert parts["prefill_queue"][0] == 0 and parts["decode_queue"][0] == 0


def test_one_request_alone_profiled_by_hand():
    # prefill 0.5 + 0.005 * 100 = 1.0 s; KV 100 tokens x 1000 B over 1 MB/s + 0.01 s = 0.11 s;
    # decode steps 0.1 s + 1e-4 s per context token: contexts 101..104 for tokens 2..5.
    dep = disagg(decode=group(prof=profile(decode=(0.1, 1e-4, 0.0))))
    r = simulate(dep, workload([0.0], [100], [5]))
    assert r.first_token_s[0] == pytest.approx(1.0)
    assert r.transfer_end_s[0] == pytest.approx(1.11)
    steps = sum(0.1 + 1e-4 * c for c in (101, 102, 103, 104))
    assert r.finish_s[0] == pytest.approx(1.11 + steps)
    assert r.tpot_s[0] == pytest.approx((0.11 + steps) / 4)


def test_colocated_one_request_has_no_transfer():
    dep = Deployment(16, KV_BYTES, colocated=group(prof=profile(decode=(0.1, 0.0, 0.0))))
    r = simulate(dep, workload([0.0], [100], [3]))
    assert r.first_token_s[0] == pytest.approx(1.0)
    assert r.finish_s[0] == pytest.approx(1.2)          # two decode steps of 0.1 s
    assert r.breakdown()["kv_transfer"][0] == 0


def test_prefill_queue_and_batching_by_hand():
    # One prefill instance, 0.5 s + 0.005 s/token; budget 200 tokens = two 100-token prompts.
    # r0 [0, 1.0]; r1 (0.5) and r2 (0.9) batch at 1.0 -> [1.0, 2.5]; r3 (2.6) [2.6, 3.6].
    dep = disagg(prefill=group(max_batch_tokens=200))
    r = simulate(dep, workload([0.0, 0.5, 0.9, 2.6], [100] * 4, [1] * 4), phase="prefill")
    np.testing.assert_allclose(r.ttft_s, [1.0, 2.0, 1.6, 1.0])
    np.testing.assert_allclose(r.breakdown()["prefill_queue"], [0.0, 0.5, 0.1, 0.0], atol=1e-12)


def test_decode_join_waits_for_the_step_boundary():
    # Decode steps take 0.1 s. A (t=0, 4 tokens) decodes 3 steps [0, 0.3]; B arrives at 0.15,
    # mid-step, joins at 0.2 and needs 2 steps: [0.2, 0.4].
    dep = disagg()
    r = simulate(dep, workload([0.0, 0.15], [100, 100], [4, 3]), phase="decode")
    np.testing.assert_allclose(r.finish_s, [0.3, 0.4])
    np.testing.assert_allclose(r.breakdown()["decode_queue"], [0.0, 0.05], atol=1e-12)
    np.testing.assert_allclose(r.tpot_s, [0.1, 0.125])


def test_kv_transfers_on_one_link_go_one_after_another():
    # r0 prefills alone [0, 1.0]; r1 and r2 (t=0.1) together [1.0, 2.5]. Each KV takes 0.01 s
    # of latency + 0.1 s of bytes on the one prefill->decode link, so r2's bytes wait for r1's
    # (2.5-2.6), not for r1's latency: r2 lands at 2.6 + 0.11.
    dep = disagg()
    r = simulate(dep, workload([0.0, 0.1, 0.1], [100] * 3, [2] * 3))
    np.testing.assert_allclose(r.first_token_s, [1.0, 2.5, 2.5])
    np.testing.assert_allclose(r.transfer_end_s, [1.11, 2.61, 2.71])


def test_request_waits_at_controller_until_decode_blocks_free():
    # The decode instance has 8 blocks of 16 tokens; each request reserves blocks_for(101) = 7.
    # r1 waits at the controller until r0 finishes, so its prefill starts only then.
    dep = disagg(decode=group(num_blocks=8))
    r = simulate(dep, workload([0.0, 0.0], [100, 100], [3, 3]))
    r0_finish = 1.0 + 0.11 + 0.2
    assert r.finish_s[0] == pytest.approx(r0_finish)
    assert r.prefill_start_s[1] == pytest.approx(r0_finish)


def test_too_long_request_is_refused_not_hung():
    dep = disagg(decode=group(num_blocks=4))
    r = simulate(dep, workload([0.0, 0.1], [1000, 10], [5, 2]))
    assert np.isnan(r.first_token_s[0]) and np.isfinite(r.finish_s[1])
    assert r.attainment(10.0, 10.0) == 0.5


@pytest.mark.parametrize("lazy_min_batch", [0, 1 << 30])
def test_requests_beyond_the_batch_wait_then_move_up(lazy_min_batch):
    # Decode steps take 0.1 s, a batch holds 4, six requests of 5 tokens (4 decode steps) arrive
    # at t=0 one after another. r0 starts a step alone; r1-r3 join at the next boundary (0.1);
    # r4, r5 wait outside the batch: r4 moves up when r0 finishes (0.4), r5 when r1-r3 do (0.5).
    dep = disagg(decode=group(max_batch_size=4))
    r = simulate(dep, workload([0.0] * 6, [100] * 6, [5] * 6), phase="decode", lazy_min_batch=lazy_min_batch)
    np.testing.assert_allclose(r.finish_s, [0.4, 0.5, 0.5, 0.5, 0.8, 0.9])
    np.testing.assert_allclose(r.breakdown()["decode_queue"], [0.0, 0.1, 0.1, 0.1, 0.4, 0.5], atol=1e-12)


def test_prefill_and_decode_sharing_a_gpu_by_hand():
    # 1P + 1D time-slicing one GPU at half speed each while both are busy. Prefill 1.0 s alone,
    # KV 0.11 s, decode steps 0.1 s. r0 (0.0, 10 decode steps): prefill [0, 1.0] alone, decode
    # from 1.11, steps ending 1.21 ... 1.61. r1 arrives at 1.66, mid-step 6 (1.61-1.71): its
    # prefill starts at half speed; step 6 ends at 1.71 as started, steps 7-10 take 0.2 s each:
    # r0 finishes at 2.51. The prefill then did 0.425 s of its work in 0.85 s, the remaining
    # 0.575 s at full speed: first token at 3.085, KV at 3.195, one full-speed step: 3.295.
    shared = Deployment(16, KV_BYTES, prefill=group(), decode=group(), shared=[(0, 0)], shared_speeds=(0.5, 0.5))
    wl = workload([0.0, 1.66], [100, 100], [11, 2])
    r = simulate(shared, wl)
    np.testing.assert_allclose(r.first_token_s, [1.0, 3.085])
    np.testing.assert_allclose(r.finish_s, [2.51, 3.295])
    np.testing.assert_allclose(r.tpot_s, [0.151, 0.21])
    assert shared.num_devices == 1
    # An uneven split, prefill 0.25 and decode 0.75: steps 7-10 take 0.1 / 0.75 s (r0 done at
    # 1.71 + 0.4 / 0.75); the prefill did 0.25 x (that - 1.66) of its work meanwhile.
    uneven = Deployment(16, KV_BYTES, prefill=group(), decode=group(), shared=[(0, 0)], shared_speeds=(0.25, 0.75))
    r = simulate(uneven, wl)
    r0_done = 1.71 + 0.4 / 0.75
    first = r0_done + (1.0 - 0.25 * (r0_done - 1.66))
    np.testing.assert_allclose(r.finish_s, [r0_done, first + 0.11 + 0.1])
    np.testing.assert_allclose(r.first_token_s, [1.0, first])
    alone = simulate(disagg(), wl)              # on two GPUs: nothing slows down
    np.testing.assert_allclose(alone.first_token_s, [1.0, 2.66])
    np.testing.assert_allclose(alone.finish_s, [2.11, 2.87])
    assert disagg().num_devices == 2


def test_shared_pairs_from_a_plan():
    from engine.errors import ConfigError
    from engine.plan import Plan
    from placement.deployment import deployment_from_plan
    half = {"device": "cuda", "gpu_type": "H100", "num_gpus_per_rank": 0.5, "num_kv_blocks": 100}
    dep = deployment_from_plan(Plan.from_dict({"model": "llama-3-8b", "prefill": half, "decode": half}))
    assert dep.shared == [(0, 0)] and dep.num_devices == 1 and dep.link(0, 0).same_node
    two = {**half, "num_instances": 2}
    dep = deployment_from_plan(Plan.from_dict({"model": "llama-3-8b", "prefill": two, "decode": two}))
    assert dep.shared == [(0, 0), (1, 1)] and dep.num_devices == 2
    whole = {**half, "num_gpus_per_rank": 1.0}
    dep = deployment_from_plan(Plan.from_dict({"model": "llama-3-8b", "prefill": whole, "decode": whole}))
    assert dep.shared == [] and dep.num_devices == 2
    with pytest.raises(ConfigError, match="shared pairs"):
        Deployment(16, KV_BYTES, prefill=group(), decode=group(), shared=[(0, 1)])
    with pytest.raises(ConfigError, match="shared_speeds"):
        Deployment(16, KV_BYTES, prefill=group(), decode=group(), shared=[(0, 0)], shared_speeds=(0.5, 0))

"""The optimizer: replica counts by hand, and whole searches on small CPU cases."""
import pytest

from engine.errors import ConfigError
from engine.model_config import PRESETS
from engine.plan import Plan
from placement.deployment import deployment_from_plan
from placement.gpus import get_device
from placement.optimizer import DevicePool, PlaceSpec, place, replica_counts
from placement.simulator import simulate
from placement.workload import make_workload


def test_replica_counts_for_a_rate():
    assert replica_counts(3.0, 1, 4.0, 1, rate=10.0, devices=8) == (4, 3)
    assert replica_counts(3.0, 1, 4.0, 1, rate=30.0, devices=8) is None          # needs 18 devices


def test_replica_counts_filling_the_devices():
    # min(30 n_p, 50 n_d): 5 + 3 devices carry 150 req/s each side.
    assert replica_counts(30.0, 1, 50.0, 1, rate=None, devices=8) == (5, 3)
    # decode instances of 2 devices: (4, 2) gives min(120, 100) = 100, better than (3, 2) or (5, 1).
    assert replica_counts(30.0, 1, 50.0, 2, rate=None, devices=8) == (4, 2)


def _spec(**kw):
    model = PRESETS["embedded"]
    wl = make_workload("sharegpt", num_requests=200, max_model_len=model.max_position_embeddings)
    args = dict(model=model, model_name="embedded", pools=[DevicePool(get_device("cpu"), 2, 1)], ttft_s=3.0,
                tpot_s=0.3, attainment=0.9, workload=wl, workload_name="sharegpt", max_batch_tokens=4096,
                max_batch_size=64)
    args.update(kw)
    return PlaceSpec(**args)


def test_place_embedded_on_cpu_writes_a_plan_that_simulates(tmp_path):
    plan = place(_spec(kinds=("disaggregated",)))
    path = tmp_path / "plan.json"
    plan.save(path)
    back = Plan.load(path)
    assert back.mode == "disaggregated" and back.prefill.device == "cpu" and back.decode.gpu_type == "cpu"
    assert back.prefill.num_instances * back.prefill.tp * back.prefill.pp + \
        back.decode.num_instances * back.decode.tp * back.decode.pp <= 2
    pred = back.predicted
    assert pred["goodput_rps"] > 0 and pred["num_devices"] <= 2 and pred["configs"]
    assert pred["attainment_at_rate"]["attainment"] >= 0.9
    r = simulate(deployment_from_plan(back), _spec().workload.at_rate(pred["goodput_rps"]))
    assert r.attainment(3.0, 0.3) >= 0.9


def test_place_for_a_rate_and_with_pairing():
    plan = place(_spec(rate=0.5, pools=[DevicePool(get_device("cpu"), 2, 2)], pairing="on", kinds=("disaggregated",)))
    assert set(plan.predicted["alternatives"]) == {"alg1", "alg2"}
    assert plan.predicted["target_rate"] == 0.5


def test_impossible_slo_is_a_clear_error():
    with pytest.raises(ConfigError, match="meets the SLO"):     # every kind fails, each says why
        place(_spec(ttft_s=1e-6))

"""Every TP degree the runtime can shard a model over is searched, powers of two or not."""
import json

import pytest

from engine.model_config import PRESETS
from placement.commands import main
from placement.search import BOUND_SLACK, valid_tps
from placement.validation.models import HF_CONFIGS, validation_model

PLACE = ["place", "--ttft", "2.5", "--tpot", "0.15", "--workload", "sharegpt",
         "--search-requests", "150", "--score-requests", "300", "--quiet"]


@pytest.fixture(scope="module")
def opt66b(tmp_path_factory):
    # OPT-66B's config.json as the HF hub has it (72 heads: TP 3 and 6 divide them).
    folder = tmp_path_factory.mktemp("opt-66b")
    (folder / "config.json").write_text(json.dumps({**HF_CONFIGS["opt-66b"], "architectures": ["OPTForCausalLM"]}))
    return folder


def test_valid_tps_follow_heads_kv_heads_and_mlp_width():
    assert valid_tps(validation_model("opt-66b"), 8) == [1, 2, 3, 4, 6, 8]
    assert valid_tps(PRESETS["llama-3-8b"], 8) == [1, 2, 4, 8]       # 8 KV heads
    assert valid_tps(PRESETS["qwen2.5-7b"], 8) == [1, 2, 4]          # 28 heads, 4 KV heads


def test_place_opt66b_on_8_a100_considers_tp3(opt66b, tmp_path):
    plan = tmp_path / "plan.json"
    assert main(PLACE + ["--model", str(opt66b), "--gpu", "A100:8", "--out", str(plan)]) == 0
    configs = json.loads(plan.read_text())["predicted"]["configs"]
    tp3 = [c for c in configs if c["tp"] == 3]
    assert {c["phase"] for c in tp3} >= {"prefill", "decode"}
    assert any(c["simulated"] and c["goodput_rps"] for c in tp3)


def test_non_power_of_two_tp_chosen_where_it_wins(opt66b, tmp_path, capsys):
    # On 6 A100 the weights (132 GB) need TP >= 2; one TP6 instance carries more per GPU than
    # any power-of-two shape (TP2 x 3 or TP4 with 2 GPUs idle), and the planner picks it.
    plan = tmp_path / "plan.json"
    assert main(PLACE + ["--model", str(opt66b), "--gpu", "A100:6", "--kinds", "colocated-prefill-first",
                         "--out", str(plan)]) == 0
    p = json.loads(plan.read_text())
    assert p["colocated"]["tp"] * p["colocated"]["pp"] == 6 and p["colocated"]["tp"] in (3, 6)
    per_gpu = p["predicted"]["goodput_per_device"]
    rivals = [c for c in p["predicted"]["configs"] if c["phase"] == "colocated" and c["tp"] & (c["tp"] - 1) == 0]
    assert rivals
    for c in rivals:     # simulated (to the end, or until shown to fall short), or pruned
        # because even its optimistic bound falls short
        best_case = (c["goodput_rps"] or c["goodput_below_rps"]) if c["simulated"] \
            else c["capacity_bound_rps"] * BOUND_SLACK["colocated"]
        assert per_gpu > best_case / (c["tp"] * c["pp"]), c
    assert "tp6" in capsys.readouterr().out

"""The planner decides "disaggregate or not" (issue 14): a workload where disaggregation must
win and one where colocated must, each checked through `disagg place` and `disagg simulate`;
the goodput `place` prints for its plan is the one `simulate` reports."""
import json

import pytest

from placement.commands import main

REQUESTS = "400"
SCENARIOS = {
    # arXiv summarisation: ~2.6k-token prompts, a TPOT tight enough that a prefill chunk in
    # a decode step breaks it: prefill belongs on other GPUs.
    "disaggregated": ["--gpu", "H100:8", "--workload", "arxiv", "--ttft", "1", "--tpot", "0.009"],
    # Azure conversation with a loose TPOT: decode steps have room for prefills beside them,
    # so every GPU doing both carries more than a split.
    "colocated": ["--gpu", "H100:4", "--workload", "azure-conv", "--ttft", "0.5", "--tpot", "0.1"],
}


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    plan = out / "plan.json"
    argv = ["place", "--model", "llama-3-8b", *SCENARIOS[request.param],
            "--search-requests", "150", "--score-requests", REQUESTS, "--quiet", "--out", str(plan)]
    assert main(argv) == 0
    assert main(["simulate", "--plan", str(plan), "--num-requests", REQUESTS, "--rates", "1,10",
                 "--out", str(out / "report"), "--quiet"]) == 0
    return request.param, json.loads(plan.read_text()), json.loads((out / "report" / "report.json").read_text())


def test_place_and_simulate_agree_on_the_winner(scenario):
    expected, plan, report = scenario
    assert plan["verdict"]["kind"].startswith(expected)
    assert report["plan_system"] == plan["verdict"]["kind"]
    ranked = sorted(report["systems"], key=lambda k: -report["systems"][k]["goodput_per_device"])
    assert ranked[0] == plan["verdict"]["kind"], {k: v["goodput_per_device"] for k, v in report["systems"].items()}
    assert plan["verdict"]["margin"] > 0.05


def test_place_goodput_is_simulates_within_3_percent(scenario):
    _, plan, report = scenario
    placed = plan["predicted"]["goodput_rps"]
    simulated = report["systems"][report["plan_system"]]["goodput_rps"]
    assert simulated == pytest.approx(placed, rel=0.03)

"""`disagg place` and `disagg simulate` end to end on a small CPU case; errors are one line."""
import json

import pytest

from placement.commands import main

PLACE = ["place", "--model", "embedded", "--gpu", "cpu:2", "--ttft", "3", "--tpot", "0.3",
         "--workload", "sharegpt", "--search-requests", "100", "--score-requests", "150", "--quiet"]


def test_place_then_simulate(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(PLACE + ["--out", str(plan)]) == 0
    printed = capsys.readouterr().out
    verdict = json.loads(plan.read_text())["verdict"]
    assert verdict["kind"] in printed and "disaggregated" in printed and "colocated-chunked" in printed
    out = tmp_path / "report"
    assert main(["simulate", "--plan", str(plan), "--out", str(out), "--num-requests", "150",
                 "--rates", "0.2,0.5", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["systems"]) == {"disaggregated", "colocated-prefill-first", "colocated-chunked"}
    assert report["plan_system"] == verdict["kind"]
    for s in report["systems"].values():
        assert [p["rate"] for p in s["attainment_vs_rate"]] == [0.2, 0.5]
        assert len(s["at_reference_rate"]["ttft_cdf"]["value_s"]) == 101
    html = (out / "index.html").read_text()
    for png in ("attainment_vs_rate", "attainment_vs_slo_scale", "goodput_per_device", "ttft_cdf", "tpot_cdf",
                "ttft_breakdown"):
        assert (out / f"{png}.png").stat().st_size > 1000 and f"{png}.png" in html


@pytest.mark.parametrize("argv,message", [
    (["place", "--model", "llama-3-8b"], "the following arguments are required"),
    (PLACE[:4] + ["H100:x"] + PLACE[5:] + ["--out", "x.json"], "--gpu takes TYPE:COUNT"),
    (PLACE[:2] + ["nope"] + PLACE[3:] + ["--out", "x.json"], "'nope' is neither a preset"),
    (PLACE[:4] + ["B200:8"] + PLACE[5:] + ["--out", "x.json"], "unknown device 'B200'"),
    (["simulate", "--plan", "missing.json", "--out", "r"], "plan file missing.json does not exist"),
])
def test_errors_are_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("disagg ")

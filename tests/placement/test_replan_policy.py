"""The re-planning policy (placement/replan.py): it simulates splits on a window and flips one
instance only past the margin, after enough confirmations and the dwell time, and never to a
split that cannot serve."""
import numpy as np
import pytest

from engine.errors import ConfigError
from engine.plan import PhaseConfig, Plan
from placement.latency_profile import PROFILES_DIR
from placement.replan import ReplanConfig, ReplanPolicy, Split, Window, plan_for_split, replan_roles

H100 = str(PROFILES_DIR / "H100_llama-3-8b.json")
PH = dict(device="cuda", gpu_type="H100", max_batch_tokens=8192, max_batch_size=256)


def plan_4p4d(tpot_s=0.04, **kw) -> Plan:
    return Plan(model="llama-3-8b", dtype="bfloat16", prefill=PhaseConfig(num_instances=4, **PH),
                decode=PhaseConfig(num_instances=4, **PH), slo_ttft_s=0.4, slo_tpot_s=tpot_s, **kw)


def roles_of(num_prefill, num_decode) -> dict:
    return {f"prefill-{i}": "prefill" for i in range(num_prefill)} | {f"decode-{i}": "decode" for i in range(num_decode)}


def window(rate, prompt, output, n=240, seed=0) -> Window:
    rng = np.random.default_rng(seed)
    arr = np.cumsum(rng.exponential(1 / rate, n))
    return Window(arr, rng.integers(prompt // 2, prompt * 3 // 2, n), rng.integers(output // 2, output * 3 // 2, n))


def scores(**att) -> dict:
    """Scores as score_splits returns them, from {"5P+3D": attainment}."""
    out = {}
    for name, a in att.items():
        p, d = name.split("_")
        out[Split(int(p[:-1]), int(d[:-1]))] = {"attainment": a, "ttft_p90_s": 0.1, "tpot_p90_s": 0.02}
    return out


def test_shifting_mix_flips_toward_the_right_role():
    """Long prompts with short outputs want more prefill; short prompts with long outputs at a
    high rate want more decode: the simulated figures, not a rule, pick the direction."""
    pol = ReplanPolicy(plan_4p4d(tpot_s=0.02), ReplanConfig(confirmations=1, min_dwell_s=0, max_window_requests=400),
                       latency=H100, max_model_len=8192)
    d = pol.decide(roles_of(4, 4), window(60, 4000, 20), now_s=0)
    assert d.outcome == "flip" and (d.from_role, d.to_role) == ("decode", "prefill"), d.reason
    assert "5P+3D" in d.reason and "4P+4D" in d.reason            # the figures compared are in the reason
    assert set(d.scores) == {"4P+4D", "5P+3D", "3P+5D"}
    d = pol.decide(roles_of(7, 1), window(100, 200, 600, n=400), now_s=100)
    assert d.outcome == "flip" and (d.from_role, d.to_role) == ("prefill", "decode"), d.reason


def test_margin_keeps_a_split_that_wins_by_a_hair():
    pol = ReplanPolicy(plan_4p4d(), ReplanConfig(margin=0.05, confirmations=1, min_dwell_s=0), latency=H100)
    w = window(10, 500, 50)
    d = pol.decide(roles_of(4, 4), w, 0, scores=scores(**{"4P_4D": 0.90, "5P_3D": 0.94, "3P_5D": 0.5}))
    assert d.outcome == "keep" and str(d.best) == "5P+3D" and "margin" in d.reason
    d = pol.decide(roles_of(4, 4), w, 0, scores=scores(**{"4P_4D": 0.90, "5P_3D": 0.96, "3P_5D": 0.5}))
    assert d.outcome == "flip" and d.to_role == "prefill"


def test_confirmations_and_dwell():
    pol = ReplanPolicy(plan_4p4d(), ReplanConfig(margin=0.05, confirmations=2, min_dwell_s=60), latency=H100)
    w, win = window(10, 500, 50), scores(**{"4P_4D": 0.5, "5P_3D": 0.9, "3P_5D": 0.2})
    assert pol.decide(roles_of(4, 4), w, 0, scores=win).outcome == "confirm"
    # A different winner in between resets the streak (hysteresis against a flapping window).
    other = scores(**{"4P_4D": 0.5, "5P_3D": 0.2, "3P_5D": 0.9})
    assert pol.decide(roles_of(4, 4), w, 1, scores=other).outcome == "confirm"
    assert pol.decide(roles_of(4, 4), w, 2, scores=win).outcome == "confirm"
    d = pol.decide(roles_of(4, 4), w, 3, scores=win, loads={"decode-0": 5, "decode-1": 0, "decode-2": 9, "decode-3": 3})
    assert d.outcome == "flip" and d.instance_id == "decode-1"    # the least loaded decode instance
    pol.flipped(3)
    after = scores(**{"5P_3D": 0.5, "6P_2D": 0.9, "4P_4D": 0.2})
    roles = roles_of(4, 4) | {"decode-1": "prefill"}
    for t in (4, 5, 62):
        d = pol.decide(roles, w, t, scores=after)
        assert d.outcome in ("confirm", "dwell"), d.reason
    assert d.outcome == "dwell" and "ago" in d.reason
    assert pol.decide(roles, w, 64, scores=after).outcome == "flip"


def test_never_flips_to_an_unservable_split():
    """1P+1D: moving either instance leaves a prefill pool without decode (or the reverse), so
    the only candidate is the current split, however badly it does."""
    plan = Plan(model="llama-3-8b", dtype="bfloat16", prefill=PhaseConfig(**PH), decode=PhaseConfig(**PH),
                slo_ttft_s=0.01, slo_tpot_s=0.001)
    assert "no flip" in replan_roles(plan)[1]             # so serve --replan auto leaves it off
    pol = ReplanPolicy(plan, ReplanConfig(confirmations=1, min_dwell_s=0), latency=H100, roles=("prefill", "decode"))
    assert pol.candidates(Split(1, 1)) == [Split(1, 1)]
    d = pol.decide(roles_of(1, 1), window(50, 4000, 200), 0)
    assert d.outcome == "keep" and d.scores["1P+1D"]["attainment"] < 0.5
    assert all(s.servable for s in pol.candidates(Split(1, 7)))
    assert not Split(2, 0).servable and not Split(0, 2).servable and not Split(0, 1, 1).servable
    assert Split(0, 0, 2).servable and Split(1, 1, 1).servable


def test_too_small_a_window_is_skipped():
    pol = ReplanPolicy(plan_4p4d(), ReplanConfig(min_window_requests=16), latency=H100)
    d = pol.decide(roles_of(4, 4), window(10, 500, 50, n=5), 0)
    assert d.outcome == "skip" and "5 requests" in d.reason


def test_which_plans_allow_replanning():
    assert replan_roles(plan_4p4d())[0] == ("prefill", "decode")
    assert replan_roles(plan_4p4d(replan=False)) == ((), "the plan opts out (replan: false)")
    no_slo = Plan(model="llama-3-8b", prefill=PhaseConfig(num_instances=2, **PH), decode=PhaseConfig(**PH))
    assert "SLO" in replan_roles(no_slo)[1]
    tp2 = plan_4p4d()
    tp2.decode.tp = 2
    roles, why = replan_roles(tp2)
    assert roles == () and "different hardware" in why
    with pytest.raises(ConfigError, match="not possible"):
        ReplanPolicy(tp2)
    with pytest.raises(ConfigError, match="replan must be true or false"):
        Plan(replan="yes")
    mixed = plan_for_split(plan_4p4d(), Split(3, 3, 2))
    assert mixed.mode == "mixed" and mixed.colocated.num_instances == 2 and mixed.colocated.device == "cuda"


def test_undoing_the_last_flip_needs_twice_the_margin_and_dwell():
    pol = ReplanPolicy(plan_4p4d(), ReplanConfig(margin=0.05, confirmations=1, min_dwell_s=10), latency=H100)
    w = window(10, 500, 50)
    d = pol.decide(roles_of(4, 4), w, 0, scores=scores(**{"4P_4D": 0.5, "5P_3D": 0.9, "3P_5D": 0.2}))
    assert d.outcome == "flip"
    pol.flipped(0)
    roles = roles_of(4, 4) | {d.instance_id: "prefill"}
    back = scores(**{"5P_3D": 0.80, "4P_4D": 0.88, "6P_2D": 0.5})          # +8 points: < 2 x 5%
    d = pol.decide(roles, w, 30, scores=back)
    assert d.outcome == "keep" and "undo the last flip" in d.reason, d.reason
    back = scores(**{"5P_3D": 0.80, "4P_4D": 0.95, "6P_2D": 0.5})          # +15 points
    assert pol.decide(roles, w, 15, scores=back).outcome == "dwell"         # 15 s < 2 x 10 s
    assert pol.decide(roles, w, 25, scores=back).outcome == "flip"
    # Going on in the same direction is no undo: the plain margin and dwell.
    pol2 = ReplanPolicy(plan_4p4d(), ReplanConfig(margin=0.05, confirmations=1, min_dwell_s=10), latency=H100)
    pol2.decide(roles_of(4, 4), w, 0, scores=scores(**{"4P_4D": 0.5, "5P_3D": 0.9, "3P_5D": 0.2}))
    pol2.flipped(0)
    on = scores(**{"5P_3D": 0.80, "6P_2D": 0.88, "4P_4D": 0.5})
    assert pol2.decide(roles, w, 12, scores=on).outcome == "flip"

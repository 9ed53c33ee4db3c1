"""Profile format: fit, save, load."""
import json

import pytest

from engine.errors import ConfigError
from placement.latency_profile import FORMAT, ProfiledModel, fit_profile, load_profile, profile_path, save_profile


def _samples(a=0.002, b=3e-5, c=2e-9, da=0.004, db=2e-8, dc=5e-5):
    out = [{"phase": "prefill", "prompt_lens": lens, "time_s": a + b * sum(lens) + c * sum(l * l for l in lens)}
           for lens in ([64], [512], [2048], [256, 256], [4096], [1024, 1024, 1024])]
    out += [{"phase": "decode", "batch_size": bs, "sum_context": s, "time_s": da + db * s + dc * bs}
            for bs, s in ((1, 128), (4, 4000), (16, 9000), (64, 70000), (128, 100000))]
    return out


def test_fit_recovers_exact_coefficients():
    prof = fit_profile(_samples(), "H100", "llama-3-8b", tp=2)
    entry = prof["tp"]["2"]
    assert entry["prefill"] == pytest.approx({"a": 0.002, "b": 3e-5, "c": 2e-9}, rel=1e-6)
    assert entry["decode"] == pytest.approx({"a": 0.004, "b": 2e-8, "c": 5e-5}, rel=1e-6)
    assert entry["max_rel_error"]["prefill"] < 1e-9 and len(entry["samples"]) == 11
    assert prof["format"] == FORMAT and prof["device"] == "H100"


def test_fit_finds_the_short_prefill_floor():
    # Below ~300 tokens a prefill costs its weight reads, 8 ms, whatever its length.
    samples = [s for s in _samples() if s.get("prompt_lens") != [64]]
    for n in (16, 64, 128, 256):
        samples.append({"phase": "prefill", "prompt_lens": [n], "time_s": max(0.008, 0.002 + 3e-5 * n + 2e-9 * n * n)})
    entry = fit_profile(samples, "H100", "llama-3-8b", 1)["tp"]["1"]
    assert entry["prefill_floor_s"] == pytest.approx(0.008)
    assert entry["prefill"] == pytest.approx({"a": 0.002, "b": 3e-5, "c": 2e-9}, rel=1e-6)
    assert entry["max_rel_error"]["prefill"] < 1e-9
    m = ProfiledModel(fit_profile(samples, "H100", "llama-3-8b", 1))
    assert m.prefill_time([16]) == pytest.approx(0.008) and m.prefill_time([4096]) > 0.1


def test_fit_keeps_coefficients_non_negative():
    samples = _samples(c=0.0)
    samples[0]["time_s"] *= 0.5           # noise that would pull a coefficient below zero
    prof = fit_profile(samples, "cpu", "embedded", 1)
    assert all(v >= 0 for v in prof["tp"]["1"]["prefill"].values())


def test_save_load_round_trip_and_adding_a_tp_degree(tmp_path):
    p1 = fit_profile(_samples(), "H100", "llama-3-8b", 1)
    both = fit_profile(_samples(a=0.001), "H100", "llama-3-8b", 2, base=p1)
    path = save_profile(both, tmp_path / "x.json")
    loaded = load_profile(path)
    assert sorted(loaded["tp"]) == ["1", "2"]
    assert ProfiledModel(loaded, tp=2).prefill_time([64]) < ProfiledModel(loaded, tp=1).prefill_time([64])


def test_profile_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="at least 3 decode"):
        fit_profile(_samples()[:6], "H100", "m", 1)
    with pytest.raises(ConfigError, match="no tp=4"):
        ProfiledModel(fit_profile(_samples(), "H100", "m", 1), tp=4)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match="not a disagg-profile"):
        load_profile(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "missing.json")


def test_profile_path_names_device_and_model():
    assert profile_path("H100", "llama-3-8b").name == "H100_llama-3-8b.json"
    assert profile_path("cpu", "/models/my model/config.json").name == "cpu_my-model.json"

"""`--model org/name` resolves a repo already in the local Hugging Face cache, offline."""
import shutil

import pytest

from engine.errors import ModelLoadError
from engine.sampling_params import SamplingParams
from model.embedded import resolve_model_source
from model.llm import LLM
from tests.model.tokenizer_layouts import make_llama3

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(root, repo_id, src):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(src, repo / "snapshots" / COMMIT)
    return repo / "snapshots" / COMMIT


def test_repo_id_in_local_cache(tmp_path, monkeypatch):
    make_llama3(tmp_path / "src")
    snap = _fake_cache(tmp_path / "hub", "acme/tiny-llama3", tmp_path / "src")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_source("acme/tiny-llama3") == str(snap)
    sp = SamplingParams(max_tokens=5, ignore_eos=True)
    assert LLM("acme/tiny-llama3").generate(["hello"], sp)[0].token_ids == \
        LLM(str(tmp_path / "src")).generate(["hello"], sp)[0].token_ids
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        resolve_model_source("acme/absent")
    assert resolve_model_source("tiny-llama") == "tiny-llama"


def test_serve_resolves_a_cached_repo_id_before_workers_start(tmp_path, monkeypatch):
    """`disagg serve --model org/name`: the plan the workers get names the snapshot folder;
    the API keeps the repo id as the served model name."""
    import argparse

    from cluster.serve import add_serve_args, plan_from_args, served_model_name
    make_llama3(tmp_path / "src")
    snap = _fake_cache(tmp_path / "hub", "acme/tiny-llama3", tmp_path / "src")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["--model", "acme/tiny-llama3"])
    plan = plan_from_args(args)
    assert plan.model == str(snap) and served_model_name(args, plan) == "acme/tiny-llama3"
    args = p.parse_args(["--model", "acme/tiny-llama3", "--served-model-name", "tiny"])
    assert served_model_name(args, plan) == "tiny"
    with pytest.raises(ModelLoadError, match="huggingface-cli download acme/other"):
        plan_from_args(p.parse_args(["--model", "acme/other"]))

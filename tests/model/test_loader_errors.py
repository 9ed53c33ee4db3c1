"""Bad model folders and prompts get typed errors from the API and one line from the CLI."""
import json
import subprocess
import sys

import pytest

from engine.errors import InvalidRequestError, ModelLoadError
from model.llm import LLM
from model.loader import build_model


def test_missing_and_malformed_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        build_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        build_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="required shape field"):
        build_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 5}))
    with pytest.raises(ModelLoadError, match="unsupported model_type"):
        build_model(str(tmp_path))


def test_missing_weights_and_corrupt_file(tmp_path):
    from engine.model_config import PRESETS
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny-llama"].to_hf_dict()))
    with pytest.raises(ModelLoadError, match="neither model.safetensors"):
        build_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        build_model(str(tmp_path))


def test_prompt_errors_name_the_field():
    llm = LLM("tiny-llama", max_model_len=64)
    with pytest.raises(InvalidRequestError, match="prompt: is empty"):
        llm.add_request("")
    with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
        llm.add_request([1, 99999])
    with pytest.raises(InvalidRequestError, match="context is 64"):
        llm.add_request([5] * 64)


@pytest.mark.parametrize("argv,needle", [
    (["--prompt", ""], "prompt: is empty"),
    (["--prompt", "hi", "--top-p", "0"], "top_p"),
    (["--prompt", "hi", "--model", "/no/such/dir"], "does not exist"),
    (["--prompt", "x" * 5000], "context is 4096"),
])
def test_cli_errors_are_one_line(argv, needle):
    p = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", *argv], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr


def test_cli_json_output():
    p = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--prompt-ids", "256,72,105",
                        "--max-tokens", "5", "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length" and isinstance(out["text"], str)

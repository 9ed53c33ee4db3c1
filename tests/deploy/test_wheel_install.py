"""The install a user does: build the wheel, install it (not editable) into a fresh venv, and from
a directory outside the repo, with nothing of the repo on sys.path, run `disagg --version`,
`disagg place` on a bundled trace and `disagg generate`.

The venv sees the already-installed dependencies (`--system-site-packages`) and the wheel goes
in with `--no-deps --no-index`, so the test costs a build and an install, not a download; the
dependency resolution is checked separately (tests/deploy/test_pins.py)."""
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _source_copy(dest: Path) -> Path:
    """The files git would ship (tracked and new, not ignored): a stale build/ or egg-info in the
    checkout cannot leak into the wheel."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file() and not name.startswith("tests/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def _run(args, cwd, env, timeout=240):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(venv python, venv bin dir, clean env) with the freshly built wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
          str(src)], cwd=tmp, env=env)
    (wheel,) = (tmp / "dist").glob("disagg_serve-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for data in ("placement/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
                 "placement/profiles/H100_llama-3-8b.json", "protos/inference.proto"):
        assert data in names, f"{data} is not in the wheel"
    assert not any(n.startswith("tests/") for n in names)
    venv = tmp / "venv"
    # --without-pip: ensurepip costs ~40 s here; the system pip, seen through the system site, installs into the venv.
    _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], cwd=tmp, env=env)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp, env=env)
    shutil.rmtree(src)
    work = tmp / "elsewhere"
    work.mkdir()
    env.update(HOME=str(work), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    return python, venv / "bin", env, work


def test_the_wheel_not_the_repo_is_imported(wheel_venv):
    python, _, env, work = wheel_venv
    out = _run([str(python), "-c", "import cluster, placement.workload as w, sys; "
                "print(cluster.__file__); print(w.__file__); print(sys.path)"], cwd=work, env=env)
    cluster_file, workload_file, _ = out.splitlines()
    site = Path(python).parent.parent
    for f in (cluster_file, workload_file):
        assert Path(f).is_relative_to(site) and not Path(f).is_relative_to(ROOT), f


def test_version(wheel_venv):
    _, bin_dir, env, work = wheel_venv
    out = _run([str(bin_dir / "disagg"), "--version"], cwd=work, env=env)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    # argparse wraps the line (at hyphens too), so compare without whitespace.
    assert "".join(out.split()).startswith(f"disagg-serve{version}from{bin_dir.parent}"), out


def test_place_on_a_bundled_trace(wheel_venv):
    _, bin_dir, env, work = wheel_venv
    out = _run([str(bin_dir / "disagg"), "place", "--model", "llama-3-8b", "--gpu", "H100:2", "--ttft", "0.4",
                "--tpot", "0.04", "--workload", "azure-conv", "--search-requests", "50", "--score-requests", "50",
                "--kinds", "disaggregated", "--out", "plan.json"], cwd=work, env=env)
    assert "azure-conv" in out, out
    plan = json.loads((work / "plan.json").read_text())
    assert plan["mode"] == "disaggregated" and plan["prefill"]["num_instances"] >= 1 and plan["decode"]["tp"] >= 1


def test_generate(wheel_venv):
    _, bin_dir, env, work = wheel_venv
    out = _run([str(bin_dir / "disagg"), "generate", "--model", "tiny-llama", "--prompt-ids", "1,2,3",
                "--max-tokens", "4", "--ignore-eos", "--json"], cwd=work, env=env)
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["token_ids"]) == 4 and result["finish_reason"] == "length", result
    assert result["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "cached_tokens": 0}

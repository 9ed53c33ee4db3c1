"""The Dockerfile cannot drift from pyproject.toml and the CI pins: its base image carries the Ray
and Python that CI passes with, its one install line is the one generated from pyproject here,
and every deploy file runs the image it builds."""
import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints" / "ci.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def expected_install_line() -> str:
    """Every extra a server needs (all but the test tools), the README's torch, the CI pins."""
    extras = sorted(k for k in PYPROJECT["project"]["optional-dependencies"] if k != "test")
    target = f"'.[{','.join(extras)}]'" if extras else "."
    return f"pip install --no-cache-dir -c constraints/ci.txt torch=={_pins()['torch']} {target}"


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_base_image_matches_the_pinned_ray_and_python():
    (base,) = re.findall(r"^FROM (\S+)$", _dockerfile(), flags=re.M)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-gpu", base)
    assert m, f"{base}: not an official Ray GPU image"
    ray_version, python = m.group(1), f"3.{m.group(2)}"
    assert ray_version == _pins()["ray"], "the image's Ray differs from constraints/ci.txt"
    (ray_req,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("ray")]
    assert ray_req.specifier.contains(ray_version)
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(python)
    assert f"Python {python}" in (ROOT / "constraints" / "ci.txt").read_text().splitlines()[0]


def test_install_line_is_generated_from_pyproject():
    installs = re.findall(r"pip install [^\n\\&]+", _dockerfile())
    assert [i.strip() for i in installs] == [expected_install_line()]
    assert "--mount=type=bind,source=.," in _dockerfile(), "the source must not stay in the image"


def test_build_context_keeps_what_the_build_needs():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    needed = {"pyproject.toml", "README.md", "constraints", *PYPROJECT["project"]["license-files"]}
    needed |= {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    for path in needed:
        top = path.split("/")[0]
        assert top not in ignored and (ROOT / top).exists(), f"{path} is needed by the build"


def test_every_deploy_file_runs_this_image():
    images = set()
    for path in [ROOT / "deploy" / "ray-cluster.yaml", *sorted((ROOT / "deploy" / "kuberay").glob("*.yaml"))]:
        images |= set(re.findall(r"^\s*image: *\"?([^\s\"]+)", path.read_text(), flags=re.M))
    assert len(images) == 1, f"the deploy files run different images: {images}"
    (image,) = images
    cluster = yaml.safe_load((ROOT / "deploy" / "ray-cluster.yaml").read_text())
    assert cluster["docker"]["image"] == image

"""Offline checks that the dependency ranges and the CI pins resolve together: each torch in our
range beside the triton its wheel requires, constraints/ci.txt inside pyproject's ranges and
consistent with itself, and CI running the README's test command with those pins."""
import importlib.util
import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
_spec_file = importlib.util.spec_from_file_location("freeze", ROOT / "constraints" / "freeze.py")
freeze = importlib.util.module_from_spec(_spec_file)
_spec_file.loader.exec_module(freeze)
project_requirements = freeze.project_requirements
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The triton each torch wheel for Linux x86_64 requires (`Requires-Dist: triton==...` in the
# wheels' METADATA on the public index, read 2026-12-02 for 2.11.0, 2.13.0 and 2.14.0; 2.12.0 as
# recorded in its release notes). 2.14 is listed to show why our torch range stops below it.
TORCH_TRITON = {"2.11.0": "3.6.0", "2.12.0": "3.7.0", "2.13.0": "3.7.1", "2.14.0": "3.8.0"}
SUPPORTED_TORCH = ("2.11.0", "2.12.0", "2.13.0")


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints" / "ci.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints/ci.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _spec(name: str) -> Requirement:
    matches = [r for r in project_requirements(PYPROJECT) if canonicalize_name(r.name) == name]
    assert len(matches) == 1, f"{name} should be required once in pyproject.toml: {matches}"
    return matches[0]


def test_every_supported_torch_resolves_with_its_triton():
    torch, triton = _spec("torch"), _spec("triton")
    for torch_version in SUPPORTED_TORCH:
        assert torch.specifier.contains(torch_version), f"torch {torch_version} is outside {torch}"
        assert triton.specifier.contains(TORCH_TRITON[torch_version]), \
            f"torch {torch_version} requires triton=={TORCH_TRITON[torch_version]}, the test extra says {triton}"
    assert not torch.specifier.contains("2.14.0") and not torch.specifier.contains("2.10.0")


def test_installed_torch_agrees_with_the_table():
    """Where the installed torch wheel declares its triton (CUDA builds do, CPU builds don't), the
    table above must say the same."""
    torch_version = Version(metadata.version("torch")).public
    for req in map(Requirement, metadata.requires("torch") or []):
        if canonicalize_name(req.name) == "triton" and torch_version in TORCH_TRITON:
            assert req.specifier.contains(TORCH_TRITON[torch_version]), (torch_version, str(req))


def test_pins_cover_and_satisfy_pyproject():
    pins = _pins()
    for req in project_requirements(PYPROJECT):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints/ci.txt: run `python constraints/freeze.py`"
        assert req.specifier.contains(pins[name], prereleases=True), f"pin {name}=={pins[name]} is outside {req}"
    assert TORCH_TRITON[str(pins["torch"])] == str(pins["triton"]), "the pinned torch needs another triton"


def test_pins_satisfy_each_other():
    """Each pinned package's own requirements (from its installed metadata) admit the other pins."""
    pins, checked = _pins(), 0
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(dist.version).public != str(version):
            continue
        checked += 1
        for req in map(Requirement, dist.requires or []):
            other = canonicalize_name(req.name)
            if other in pins and (req.marker is None or req.marker.evaluate({"extra": ""})):
                assert req.specifier.contains(pins[other], prereleases=True), \
                    f"{name}=={version} requires {req}, but constraints/ci.txt pins {other}=={pins[other]}"
    assert checked >= len(pins) // 2, f"only {checked} of {len(pins)} pins are installed here to check"


def test_ci_runs_the_readme_test_command_with_the_pins():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^pip install (.+?) && (.+)$", quick, flags=re.M)
    assert len(commands) == 2, quick
    (demo_args, _), (test_args, test_cmd) = commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"python -m pip install -q -c constraints/ci.txt {test_args}" in ci, test_args
    assert f"\n{test_cmd}\n" in ci, test_cmd
    assert "torch==2.13.0" in demo_args and "torch==2.13.0" in test_args

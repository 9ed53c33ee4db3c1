"""engine/ and placement/ must import neither torch nor ray (DESIGN.md: the simulator and the
planner run anywhere numpy runs)."""
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import importlib, json, pkgutil, sys
names = []
for pkg in ("engine", "placement"):
    mod = importlib.import_module(pkg)
    names.append(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        importlib.import_module(info.name)
        names.append(info.name)
banned = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "ray"))
print(json.dumps({"modules": names, "banned": banned}))
"""


def test_engine_and_placement_import_no_torch_or_ray():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "placement.simulator" in result["modules"] and "engine.batching" in result["modules"]
    assert len(result["modules"]) >= len(list(pkgutil.iter_modules([str(ROOT / "placement")])))
    assert result["banned"] == [], f"imported: {result['banned']}"

"""A local Ray start that timed out leaves no half-started processes behind before the retry
(cluster.api.init_ray): only Ray's processes that descend from the starting process are stopped.

Run in a separate process: in this one, a Ray cluster another test started would be ours."""
import json
import subprocess
import sys

SCRIPT = r"""
import json, subprocess, sys, time
from cluster.api import _kill_own_ray_processes
spawn = lambda *a: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *a])
ray_like = [spawn("/x/ray/core/src/ray/gcs/gcs_server"), spawn("--raylet-name", "raylet")]
other = spawn("--not-a-cluster-process")
time.sleep(0.5)
killed = _kill_own_ray_processes()
codes = [p.wait(10) for p in ray_like]
alive = other.poll() is None
other.kill()
print(json.dumps({"killed": killed, "codes": codes, "other_alive": alive}))
"""


def test_only_our_own_ray_processes_are_stopped():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"killed": 2, "codes": [-9, -9], "other_alive": True}, out

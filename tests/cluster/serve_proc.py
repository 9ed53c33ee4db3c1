"""`disagg serve` as a subprocess with its own local Ray, and what /proc says about its
process tree (pids, listening sockets, memory)."""
import json
import os
import socket
import subprocess
import sys
import time

ENV = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
ENV.pop("RAY_ADDRESS", None)
ENV.pop("DISAGG_AUTH_TOKEN", None)
PLAN = {"model": "tiny-llama", "prefill": {"num_kv_blocks": 128}, "decode": {"num_kv_blocks": 128}}


def start_serve(d, *args, env=None, timeout_s=180):
    """Start `disagg serve` (tiny-llama, 1 prefill + 1 decode) in folder `d`; returns
    (process, ready dict) once it serves. Its output goes to d/serve.log."""
    (d / "plan.json").write_text(json.dumps(PLAN))
    ready = d / "ready.json"
    log = open(d / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--plan", str(d / "plan.json"),
                             "--port", "0", "--metrics-port", "-1", "--http-port", "0", "--ready-file", str(ready), *args],
                            env=env or ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while not ready.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("serve did not start:\n" + (d / "serve.log").read_text()[-3000:])
        time.sleep(0.2)
    return proc, json.loads(ready.read_text())


def stop_serve(proc, timeout_s=60):
    if proc.poll() is None:
        proc.send_signal(2)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def tree_pids(pid: int) -> list[int]:
    """`pid` and every descendant."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _address(hexaddr: str, v6: bool) -> tuple[str, int]:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if v6:                      # four host-order 32-bit words
        return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))), int(port, 16)
    return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)


def listening_sockets(pid: int) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket held by the tree."""
    by_inode = {}
    for name, v6 in (("tcp", False), ("tcp6", True)):
        with open(f"/proc/net/{name}") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A":                # TCP_LISTEN
                    by_inode[parts[9]] = _address(parts[1], v6)
    out = []
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/comm") as f:
                comm = f.read().strip()
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in by_inode:
                out.append((p, comm, *by_inode[link[8:-1]]))
    return out


def is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "localhost") or address.startswith("::ffff:127.")


def rss_kib(pids) -> int:
    """Sum of VmRSS over `pids` (processes gone meanwhile count 0)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total

"""This host's processes from Linux /proc: who descends from whom, and their CPU time. Used by
`init_ray` (stop what a failed local Ray start left running) and benchmarks/fidelity.py (who
used the cores during a run). Elsewhere than Linux the table is empty."""
from __future__ import annotations

import os
from pathlib import Path


def process_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds so far, command line) for every live process."""
    proc, out = Path("/proc"), {}
    if not proc.is_dir():
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for d in proc.iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                f = stat[stat.rindex(")") + 2:].split()
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out[int(d.name)] = (int(f[1]), (int(f[11]) + int(f[12])) / tick, cmd)
            except (OSError, ValueError, IndexError):
                pass
    return out


def descendants(table: dict, root: int) -> set[int]:
    """`root` and every process below it in `table`."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {root}, [root]
    while todo:
        for kid in children.get(todo.pop(), ()):
            if kid not in out:
                out.add(kid)
                todo.append(kid)
    return out

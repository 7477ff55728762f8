"""Readings of a server's process tree from /proc, shared by the benchmarks."""

from __future__ import annotations

from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            children = []
        found.extend(int(c) for c in children)
        frontier.extend(int(c) for c in children)
    return found


def proc_field(pid: int, file: str, field: str) -> int:
    """The number after `field:` in /proc/PID/<file> (status: kB; smaps_rollup: kB; io: bytes); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0

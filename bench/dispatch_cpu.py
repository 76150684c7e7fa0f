"""CPU per dispatched job, counted on tsd's own process tree (not the whole machine).

N `true` jobs are queued behind a blocker, then released onto S slots. The CPU is
read from /proc for the personal daemon and all its live descendants (the spawner,
the pooled supervisors that stay between jobs) with what each reaped (supervisors,
jobs): utime + stime + cutime + cstime, so other load on a shared machine does not
count. Printed: jobs/s, and ms of CPU per job split into the daemon itself, the
supervisors and spawner (their own CPU), and the jobs they reaped.

Usage: .venv/bin/python bench/dispatch_cpu.py [jobs] [slots] [runs]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from common import PersonalDaemon, slots_held

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[float, float, int]:
    """(own CPU s, reaped children's CPU s, ppid) of a process."""
    data = Path(f"/proc/{pid}/stat").read_bytes()
    rest = data[data.rfind(b")") + 2 :].split()
    ut, st, cut, cst = (int(x) for x in rest[11:15])
    return (ut + st) / TICK, (cut + cst) / TICK, int(rest[1])


def descendants(daemon: int) -> dict[int, tuple[float, float, int]]:
    """The daemon's live descendants (the spawner, the pooled supervisors), each with
    its `_stat`."""
    stats: dict[int, tuple[float, float, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == daemon:
            continue
        try:
            stats[int(name)] = _stat(int(name))
        except (OSError, ValueError):
            continue
    kids: dict[int, list[int]] = {}
    for pid, (_, _, ppid) in stats.items():
        kids.setdefault(ppid, []).append(pid)
    found: dict[int, tuple[float, float, int]] = {}
    todo = list(kids.get(daemon, []))
    while todo:
        pid = todo.pop()
        found[pid] = stats[pid]
        todo.extend(kids.get(pid, []))
    return found


def tree_cpu(daemon: int) -> tuple[float, float, float]:
    """(daemon's own CPU, own CPU of its live descendants (the spawner, the pooled
    supervisors that stay between jobs), CPU of all they reaped (the jobs))."""
    own, reaped, _ = _stat(daemon)
    live = 0.0
    for kid_own, kid_below, _ in descendants(daemon).values():
        live += kid_own
        reaped += kid_below
    return own, live, reaped


def run_once(d: PersonalDaemon, n: int, slots: int) -> tuple[float, float, float, float]:
    # Lock gates: they burn no CPU while the jobs are queued (theirs is counted when
    # their supervisors reap them, inside the measured run: `slots` jobs more).
    with slots_held(d, slots):
        last = "0"
        for _ in range(n):
            last = d.ts("true").strip()
        pid = d.pid()
        before = tree_cpu(pid)
        t0 = time.perf_counter()
    d.ts("-w", last)
    elapsed = time.perf_counter() - t0
    time.sleep(0.2)  # the last supervisors are reaped
    after = tree_cpu(pid)
    d.ts("-C")
    own, live, reaped = ((a - b) / n * 1000 for a, b in zip(after, before, strict=True))
    return n / elapsed, own, live, reaped


def main(n: int = 300, slots: int = 2, runs: int = 3) -> None:
    d = PersonalDaemon(TS_SLOTS="1", TS_MAXCONN="100000")
    try:
        d.ts("-l")
        rows = [run_once(d, n, slots) for _ in range(runs)]
        rate = statistics.median(r[0] for r in rows)
        own = statistics.median(r[1] for r in rows)
        live = statistics.median(r[2] for r in rows)
        reaped = statistics.median(r[3] for r in rows)
        print(f"{n} true jobs on {slots} slots: {rate:.0f} jobs/s; "
              f"CPU per job {own + live + reaped:.2f} ms = daemon {own:.2f} "
              f"+ supervisors/spawner {live:.2f} + what they reaped (jobs) {reaped:.2f}  "
              f"(runs: {', '.join(f'{r[0]:.0f}/s {sum(r[1:]):.2f}ms' for r in rows)})")
    finally:
        d.stop()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))

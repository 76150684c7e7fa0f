"""What one process waking another costs on this machine: a floor under any spooler
made of several processes (tsd's daemon, its fsync thread and supervisors; tsp's
server and clients).

Two processes pass one byte back and forth over two pipes (each blocks in read
until the other writes), N round trips, pinned to the same CPU, to two different
CPUs, and not pinned. Printed per round trip: wall time, and the CPU each side
used (its rusage: what the kernel charges it for sleeping and being woken, the
Python loop is the same in all three). On a virtual machine a wake-up that has to
rouse an idle CPU (an inter-processor interrupt, the idle CPU's halt and return)
costs far more than one on a busy CPU or the same CPU; `vs_tsp.py` prints each
spooler's context switches per dispatched job beside this.

Usage: .venv/bin/python bench/wakeups.py [round trips (20000)]
"""

from __future__ import annotations

import os
import resource
import sys
import time


def _cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def ping_pong(n: int, mine: int | None, theirs: int | None) -> tuple[float, float, float]:
    """(wall us, our CPU us, the other side's CPU us) per round trip."""
    to_r, to_w = os.pipe()
    back_r, back_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if theirs is not None:
                os.sched_setaffinity(0, {theirs})
            for _ in range(n):
                os.read(to_r, 1)
                os.write(back_w, b"x")
        finally:
            os._exit(0)
    before_aff = os.sched_getaffinity(0)
    if mine is not None:
        os.sched_setaffinity(0, {mine})
    try:
        cpu0 = _cpu_s(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(to_w, b"x")
            os.read(back_r, 1)
        wall = time.perf_counter() - t0
        cpu = _cpu_s(resource.RUSAGE_SELF) - cpu0
    finally:
        os.sched_setaffinity(0, before_aff)
    kids0 = _cpu_s(resource.RUSAGE_CHILDREN)
    os.waitpid(pid, 0)
    other = _cpu_s(resource.RUSAGE_CHILDREN) - kids0
    for fd in (to_r, to_w, back_r, back_w):
        os.close(fd)
    return wall / n * 1e6, cpu / n * 1e6, other / n * 1e6


def main(n: int = 20000) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    cases: list[tuple[str, int | None, int | None]] = [("same CPU", cpus[0], cpus[0])]
    if len(cpus) > 1:
        cases.append(("two CPUs", cpus[0], cpus[1]))
    cases.append(("not pinned", None, None))
    print(f"pipe ping-pong, {n} round trips, {len(cpus)} CPUs; per round trip (two wake-ups):")
    for label, mine, theirs in cases:
        wall, cpu, other = ping_pong(n, mine, theirs)
        print(f"  {label:11} wall {wall:7.1f} us   CPU: waker {cpu:6.1f} us, other side "
              f"{other:6.1f} us")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))

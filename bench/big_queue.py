"""The daemon with 100,000 jobs queued: its start, RSS, submit latency, `ts -l`, dispatch.

The queue is seeded straight into a fresh state database (without fsync, which
only the seeding skips; in transactions of 1,000 jobs, each with the bench's
whole environment as a submit stores it), then the daemon starts on it.

Two queues, each in its own daemon:

* `plain`: 100,000 `echo N` jobs on 0 slots (nothing runs): the daemon's start
  (until its first answer), RSS, submit latency and `ts -l`; then `ts -S 4`
  lets the queue run and the first 500 jobs' dispatch rate is measured, next to
  the same on a queue of 1,000 (the ratio shows what the queue's length costs).
* `waiting`: job 1 is `sleep` and the 100,000 others wait for it (`-d`), with a
  slot free, so the scheduler has a free slot and a whole queue that cannot use it:
  submit latency of `ts -n true` (which starts at once) and the daemon's CPU per submit.
"""

from __future__ import annotations

import os
import sys
import time

import psutil
from common import TS, PersonalDaemon, med_ms, time_command

from tsd import protocol
from tsd.client import Client
from tsd.model import DependMode, JobSpec
from tsd.store import Store

BATCH = 1000
DISPATCHED = 500


def seed(d: PersonalDaemon, n: int, waiting: bool = False) -> float:
    """Write `n` queued jobs into the daemon's (not yet started) database; seconds taken."""
    env = tuple((k, v) for k, v in d.env.items())
    store = Store(d.state_dir / "state.db", durable=False)
    t0 = time.perf_counter()
    for first in range(0, n, BATCH):
        specs = []
        for i in range(first, min(n, first + BATCH)):
            if waiting and i == 0:
                spec = JobSpec(command=("sleep", "3600"), cwd="/tmp", env=env)
            elif waiting:
                spec = JobSpec(command=("echo", str(i)), cwd="/tmp", env=env, depends=(1,),
                               depend_mode=DependMode.AFTER)
            else:
                spec = JobSpec(command=("echo", str(i)), cwd="/tmp", env=env)
            specs.append((spec, i))
        store.add_jobs(os.getuid(), "bench", specs, time.time())
    store.close()
    return time.perf_counter() - t0


def start(d: PersonalDaemon) -> tuple[float, float]:
    """Start the daemon on its seeded database: seconds to its first answer, RSS in MiB."""
    t0 = time.perf_counter()
    d.ts("-S")
    startup = time.perf_counter() - t0
    return startup, psutil.Process(d.pid()).memory_info().rss / 2**20


def dispatch_rate(d: PersonalDaemon, slots: int, jobs: int) -> float:
    """Jobs per second through `slots` slots, from opening them until job `jobs` ended."""
    t0 = time.perf_counter()
    d.ts("-S", str(slots))
    d.ts("-w", str(jobs))
    rate = jobs / (time.perf_counter() - t0)
    d.ts("-S", "0")
    return rate


def plain(n: int) -> None:
    d = PersonalDaemon(TS_SLOTS="0", TS_MAXCONN=str(2 * n), TS_MAXFINISHED=str(2 * n))
    try:
        seeded = seed(d, n)
        startup, rss = start(d)
        print(f"seeded {n} jobs in {seeded:.1f} s; daemon start + first call {startup:.2f} s; "
              f"daemon RSS {rss:.0f} MiB")
        submit = time_command([TS, "-n", "true"], d.env, 20)
        print(f"submit with {n} queued: median {med_ms(submit):.1f} ms")
        listing = time_command([TS, "-l"], d.env, 3)
        print(f"ts -l with {n} queued: median {med_ms(listing):.0f} ms")
        os.environ.update(d.env)
        t0 = time.perf_counter()
        jobs = Client().call(protocol.ListJobs())["jobs"]
        print(f"  of which the daemon's answer ({len(jobs)} records, received and decoded): "
              f"{(time.perf_counter() - t0) * 1000:.0f} ms")
        rss = psutil.Process(d.pid()).memory_info().rss / 2**20
        print(f"daemon RSS after: {rss:.0f} MiB")
        big = dispatch_rate(d, 4, DISPATCHED)
    finally:
        d.ts("-S", "0")
        d.stop()
    small_d = PersonalDaemon(TS_SLOTS="0")
    try:
        seed(small_d, 1000)
        start(small_d)
        small = dispatch_rate(small_d, 4, DISPATCHED)
    finally:
        small_d.stop()
    print(f"dispatch, 4 slots, first {DISPATCHED} of {n} queued: {big:.0f} jobs/s; "
          f"of 1000 queued: {small:.0f} jobs/s (ratio {big / small:.2f})")


def waiting(n: int) -> None:
    d = PersonalDaemon(TS_SLOTS="2", TS_MAXCONN=str(2 * n))
    try:
        seed(d, n, waiting=True)
        startup, rss = start(d)
        print(f"{n} jobs waiting on a running one, a slot free: daemon start {startup:.2f} s, "
              f"RSS {rss:.0f} MiB")
        proc = psutil.Process(d.pid())
        cpu0 = sum(proc.cpu_times()[:2])
        submit = time_command([TS, "-n", "true"], d.env, 20)
        cpu = (sum(proc.cpu_times()[:2]) - cpu0) / 20
        print(f"  submit (starts at once): median {med_ms(submit):.1f} ms; "
              f"daemon CPU per submit {cpu * 1000:.1f} ms")
    finally:
        d.ts("-S", "0")
        d.stop()


def main(n: int = 100_000) -> None:
    plain(n)
    waiting(n)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)

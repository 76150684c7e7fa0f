"""The daemon with 100,000 jobs queued: its start, RSS, submit latency, `ts -l`, dispatch.

The queue is seeded straight into a fresh state database (without fsync, which
only the seeding skips; in transactions of 1,000 jobs, each with the bench's
whole environment as a submit stores it), then the daemon starts on it with 0
slots so that nothing runs. `seed` and `open_big` are what vs_tsp.py's
big-queue rows use.

Then, on the same daemon, `ts -S 4` lets the queue run and the first 500 jobs'
dispatch rate is measured, next to the same on a queue of 1,000 (the ratio
shows what the queue's length costs). Last, a second queue: job 1 is `sleep`
and the 100,000 others wait for it (`-d`), with a slot free, so the scheduler
has a free slot and a whole queue that cannot use it: submit latency of
`ts -n true` (which starts at once) and the daemon's CPU per submit.

Usage: .venv/bin/python bench/big_queue.py [jobs]    (default 100,000)
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from common import TS, PersonalDaemon, med_ms, time_command

from tsd.model import DependMode, JobSpec
from tsd.store import Store

BATCH = 1000
DISPATCHED = 500


def seed(state_dir: Path, n: int, env: dict[str, str], waiting: bool = False) -> float:
    """Queue n `echo I` jobs (with `env` as their environment) in a new state db; seconds.

    With `waiting`, job 1 is `sleep 3600` and every other job waits for it (-d).
    """
    job_env = tuple(env.items())
    store = Store(state_dir / "state.db", durable=False)
    t0 = time.perf_counter()
    try:
        for first in range(0, n, BATCH):
            specs = []
            for i in range(first, min(n, first + BATCH)):
                if waiting and i == 0:
                    spec = JobSpec(command=("sleep", "3600"), cwd="/tmp", env=job_env)
                elif waiting:
                    spec = JobSpec(command=("echo", str(i)), cwd="/tmp", env=job_env,
                                   depends=(1,), depend_mode=DependMode.AFTER)
                else:
                    spec = JobSpec(command=("echo", str(i)), cwd="/tmp", env=job_env)
                specs.append((spec, i))
            store.add_jobs(os.getuid(), "bench", specs, time.time())
    finally:
        store.close()
    return time.perf_counter() - t0


@dataclass
class BigQueue:
    """What a personal daemon does with a big queue."""

    n: int
    seed_s: float  # seeding the database (not the daemon's work)
    start_s: float  # `ts -S` with no daemon: its start on the full queue plus one call
    rss_start_mib: float  # right after that first call
    start_cpu_s: float = 0.0  # the daemon's CPU (user + system) until then: less noisy
    list_s: list[float] = field(default_factory=list)  # wall seconds of each `ts -l`
    rss_mib: float = 0.0  # the highest RSS seen (after the listings)
    list_cpu_s: float = 0.0  # the daemon's CPU per `ts -l`


def rss_mib(pid: int) -> float:
    """Resident set of a process, MiB."""
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def open_big(n: int, list_runs: int, ts: str = TS) -> tuple[BigQueue, PersonalDaemon]:
    """Seed n jobs, start a daemon (0 slots) on them with `ts`, list them `list_runs` times.

    The caller stops the daemon (it is returned still running, for more measurements).
    """
    # TS_MAXCONN: task-spooler's queue limit (default 1000) must not make submits wait here.
    d = PersonalDaemon(ts=ts, TS_SLOTS="0", TS_MAXCONN=str(2 * n))
    try:
        seeded = seed(d.state_dir, n, d.env)
        t0 = time.perf_counter()
        d.ts("-S")
        cpu = psutil.Process(d.pid()).cpu_times()
        big = BigQueue(n, seeded, time.perf_counter() - t0, rss_mib(d.pid()), cpu.user + cpu.system)
        big.list_s = time_command([ts, "-l"], d.env, list_runs)
        after = psutil.Process(d.pid()).cpu_times()
        big.list_cpu_s = (after.user + after.system - big.start_cpu_s) / max(1, list_runs)
        big.rss_mib = max(big.rss_start_mib, rss_mib(d.pid()))
    except BaseException:
        d.stop()
        raise
    return big, d


def dispatch_rate(d: PersonalDaemon, slots: int, jobs: int) -> float:
    """Jobs per second through `slots` slots, from opening them until job `jobs` ended."""
    t0 = time.perf_counter()
    d.ts("-S", str(slots))
    d.ts("-w", str(jobs))
    rate = jobs / (time.perf_counter() - t0)
    d.ts("-S", "0")
    return rate


def small_dispatch_rate() -> float:
    """`dispatch_rate` on a queue of 1,000 seeded the same way."""
    d = PersonalDaemon(TS_SLOTS="0")
    try:
        seed(d.state_dir, 1000, d.env)
        d.ts("-S")
        return dispatch_rate(d, 4, DISPATCHED)
    finally:
        d.stop()


def waiting_queue(n: int) -> None:
    """n jobs wait on a running one with a slot free: what a submit costs then."""
    d = PersonalDaemon(TS_SLOTS="2", TS_MAXCONN=str(2 * n))
    try:
        seed(d.state_dir, n, d.env, waiting=True)
        t0 = time.perf_counter()
        d.ts("-S")
        print(f"{n} jobs waiting on a running one, a slot free: daemon start "
              f"{time.perf_counter() - t0:.2f} s, RSS {rss_mib(d.pid()):.0f} MiB")
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
    big, d = open_big(n, 3)
    try:
        print(f"seeded {n} jobs in {big.seed_s:.1f} s; daemon start + first call "
              f"{big.start_s:.2f} s (daemon CPU {big.start_cpu_s:.2f} s); "
              f"daemon RSS {big.rss_start_mib:.0f} MiB")
        submit = time_command([TS, "-n", "true"], d.env, 20)
        print(f"submit with {n} queued: median {med_ms(submit):.1f} ms")
        print(f"ts -l with {n} queued: median {med_ms(big.list_s):.0f} ms "
              f"(daemon CPU {big.list_cpu_s * 1000:.0f} ms)")
        from tsd import protocol
        from tsd.client import Client

        os.environ.update(d.env)
        t0 = time.perf_counter()
        jobs = Client().call(protocol.ListJobs())["jobs"]
        print(f"  of which the daemon's answer ({len(jobs)} records, received and decoded): "
              f"{(time.perf_counter() - t0) * 1000:.0f} ms")
        print(f"daemon RSS after: {rss_mib(d.pid()):.0f} MiB")
        rate = dispatch_rate(d, 4, DISPATCHED)
    finally:
        d.stop()
    small = small_dispatch_rate()
    print(f"dispatch, 4 slots, first {DISPATCHED} of {n} queued: {rate:.0f} jobs/s; "
          f"of 1000 queued: {small:.0f} jobs/s (ratio {rate / small:.2f})")
    waiting_queue(n)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)

"""`ts -l` and submit latency with 100,000 jobs queued, and the daemon's RSS.

The queue is seeded straight into a fresh state database (without fsync, which
only the seeding skips), then the daemon starts on it with 0 slots so that
nothing runs. `seed` and `open_big` are what vs_tsp.py's big-queue rows use.

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

from tsd.model import JobSpec
from tsd.store import Store


def seed(state_dir: Path, n: int, env: dict[str, str]) -> float:
    """Queue n `echo I` jobs (with `env` as their environment) in a new state db; seconds."""
    job_env = tuple(env.items())
    store = Store(state_dir / "state.db", durable=False)
    t0 = time.perf_counter()
    try:
        for i in range(n):
            spec = JobSpec(command=("echo", str(i)), cwd="/tmp", env=job_env)
            store.add_job(os.getuid(), "bench", spec, i, time.time())
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
    list_s: list[float] = field(default_factory=list)  # wall seconds of each `ts -l`
    rss_mib: float = 0.0  # the highest RSS seen (after the listings)


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
        big = BigQueue(n, seeded, time.perf_counter() - t0, rss_mib(d.pid()))
        big.list_s = time_command([ts, "-l"], d.env, list_runs)
        big.rss_mib = max(big.rss_start_mib, rss_mib(d.pid()))
    except BaseException:
        d.stop()
        raise
    return big, d


def main(n: int = 100_000) -> None:
    big, d = open_big(n, 5)
    try:
        print(f"seeded {n} jobs in {big.seed_s:.1f} s; daemon start + first call "
              f"{big.start_s:.2f} s; daemon RSS {big.rss_start_mib:.0f} MiB")
        submit = time_command([TS, "-n", "true"], d.env, 20)
        print(f"submit with {n} queued: median {med_ms(submit):.1f} ms")
        print(f"ts -l with {n} queued: median {med_ms(big.list_s):.0f} ms")
        from tsd import protocol
        from tsd.client import Client

        os.environ.update(d.env)
        t0 = time.perf_counter()
        jobs = Client().call(protocol.ListJobs())["jobs"]
        print(f"  of which the daemon's answer ({len(jobs)} records, received and decoded): "
              f"{(time.perf_counter() - t0) * 1000:.0f} ms")
        print(f"daemon RSS after: {rss_mib(d.pid()):.0f} MiB")
    finally:
        d.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)

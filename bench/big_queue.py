"""`ts -l` and submit latency with 100,000 jobs queued, and the daemon's RSS.

The queue is seeded straight into a fresh state database (without fsync, which
only the seeding skips), then the daemon starts on it with 0 slots so that
nothing runs.
"""

from __future__ import annotations

import os
import sys
import time

import psutil
from common import TS, PersonalDaemon, med_ms, time_command

from tsd import protocol
from tsd.client import Client
from tsd.model import JobSpec
from tsd.store import Store


def main(n: int = 100_000) -> None:
    # TS_MAXCONN: task-spooler's queue limit (default 1000) must not make submits wait here.
    d = PersonalDaemon(TS_SLOTS="0", TS_MAXCONN=str(2 * n))
    try:
        env = tuple((k, v) for k, v in d.env.items())
        store = Store(d.state_dir / "state.db", durable=False)
        t0 = time.perf_counter()
        for i in range(n):
            spec = JobSpec(command=("echo", str(i)), cwd="/tmp", env=env)
            store.add_job(os.getuid(), "bench", spec, i, time.time())
        store.close()
        seeded = time.perf_counter() - t0
        t0 = time.perf_counter()
        d.ts("-S")
        startup = time.perf_counter() - t0
        rss = psutil.Process(d.pid()).memory_info().rss
        print(f"seeded {n} jobs in {seeded:.1f} s; daemon start + first call {startup:.2f} s; "
              f"daemon RSS {rss / 2**20:.0f} MiB")
        submit = time_command([TS, "-n", "true"], d.env, 20)
        print(f"submit with {n} queued: median {med_ms(submit):.1f} ms")
        listing = time_command([TS, "-l"], d.env, 5)
        print(f"ts -l with {n} queued: median {med_ms(listing):.0f} ms")
        os.environ.update(d.env)
        t0 = time.perf_counter()
        jobs = Client().call(protocol.ListJobs())["jobs"]
        print(f"  of which the daemon's answer ({len(jobs)} records, received and decoded): "
              f"{(time.perf_counter() - t0) * 1000:.0f} ms")
        rss = psutil.Process(d.pid()).memory_info().rss
        print(f"daemon RSS after: {rss / 2**20:.0f} MiB")
    finally:
        d.ts("-S", "0")
        d.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)

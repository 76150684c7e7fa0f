"""`ts -l` with 100,000 queued jobs: wall time, and the CPU it takes in `ts` and in the daemon.

Wall time on a busy machine says little; the CPU seconds of each side say where
the time goes. Also the same listing as records (what `ts` asked for before
rows, and what older clients still get), received and decoded in process, for
comparison. The queue is seeded straight into a fresh state database (as in
big_queue.py); the daemon runs with 0 slots so that nothing starts.

    .venv/bin/python bench/big_list.py [jobs] [runs]
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time

import psutil
from common import TS, PersonalDaemon

from tsd import protocol
from tsd.client import Client
from tsd.model import JobSpec
from tsd.store import Store


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(n: int = 100_000, runs: int = 5) -> None:
    d = PersonalDaemon(TS_SLOTS="0", TS_MAXCONN=str(2 * n))
    try:
        env = tuple((k, v) for k, v in d.env.items())
        store = Store(d.state_dir / "state.db", durable=False)
        for i in range(n):
            spec = JobSpec(command=("echo", str(i)), cwd="/tmp", env=env)
            store.add_job(os.getuid(), "bench", spec, i, time.time())
        store.close()
        d.ts("-S")
        daemon = psutil.Process(d.pid())
        wall, client, served = [], [], []
        for _ in range(runs):
            c0, d0 = child_cpu(), sum(daemon.cpu_times()[:2])
            t0 = time.perf_counter()
            subprocess.run([TS, "-l"], env=d.env, check=True, stdout=subprocess.DEVNULL)
            wall.append(time.perf_counter() - t0)
            client.append(child_cpu() - c0)
            served.append(sum(daemon.cpu_times()[:2]) - d0)
        print(f"ts -l with {n} queued: wall median {statistics.median(wall):.2f} s "
              f"(min {min(wall):.2f}); CPU: ts {statistics.median(client):.2f} s, "
              f"daemon {statistics.median(served):.2f} s")
        os.environ.update(d.env)
        for name, req in (("rows", {"v": protocol.PROTOCOL_VERSION, "op": "list", "rows": True}),
                          ("records", protocol.ListJobs())):  # fmt: skip
            d0, t0 = sum(daemon.cpu_times()[:2]), time.perf_counter()
            Client().call(req)
            print(f"  the answer as {name}, received and decoded in process: "
                  f"{time.perf_counter() - t0:.2f} s wall, "
                  f"daemon CPU {sum(daemon.cpu_times()[:2]) - d0:.2f} s")
    finally:
        d.ts("-S", "0")
        d.stop()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))

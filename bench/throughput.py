"""Dispatch throughput: 1,000 `true` jobs with 2 slots, submitted by one client, in jobs/s."""

from __future__ import annotations

import os
import sys
import time

from common import PersonalDaemon

from tsd import protocol
from tsd.client import Client
from tsd.model import JobSpec


def main(n: int = 1000) -> None:
    d = PersonalDaemon(TS_SLOTS="2")
    try:
        d.ts("-S", "2")
        os.environ.update(d.env)
        client = Client()
        spec = JobSpec(command=("true",), cwd="/", env=tuple(d.env.items()), store_output=False)
        t0 = time.perf_counter()
        ids = [client.call(protocol.Submit(spec=spec))["id"] for _ in range(n)]
        t_submit = time.perf_counter() - t0
        client.call(protocol.Wait(id=ids[-1]))
        while client.call(protocol.CountRunning())["count"]:
            time.sleep(0.01)
        total = time.perf_counter() - t0
        jobs = client.call(protocol.ListJobs())["jobs"]
        done = sum(1 for j in jobs if j["state"] == "finished" and j["exit"]["code"] == 0)
        print(f"{n} jobs, 2 slots: submitted in {t_submit:.2f} s ({n / t_submit:.0f} submits/s), "
              f"all finished in {total:.2f} s -> {n / total:.1f} jobs/s ({done} exited 0)")
    finally:
        d.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)

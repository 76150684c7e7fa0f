"""A reused supervisor runs SCHED_BATCH, its jobs run as the daemon does (tsd.cpupolicy).

The daemon is started by its first `ts` call, here under a chosen nice value or
CPU policy, which its spawner, supervisors and jobs inherit. Each job prints its own
policy and nice value and its parent's (the supervisor) policy, read from the kernel.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from integration.harness import TS, Env, Runner, queue, wait_state

# The job: its policy, its nice value, its parent's policy.
REPORT = (
    "import os; print(os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0),"
    " os.sched_getscheduler(os.getppid()))"
)


def start_daemon_under(env: Env, setup: Callable[[], None]) -> None:
    """The daemon's start by a `ts` that runs after `setup` (in the child, before exec)."""
    proc = subprocess.run(
        [TS, "-S"], env=env, preexec_fn=setup, capture_output=True, text=True, timeout=30,
        cwd=str(env.tmp),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert env.daemon_pid() is not None


def job_report(ts: Runner, *flags: str) -> tuple[int, int, int]:
    """Run REPORT as a job (with `flags`); its three numbers."""
    job = queue(ts, *flags, sys.executable, "-c", REPORT)
    wait_state(ts, job, "finished")
    assert ts("-i", str(job)).stdout.count("Exit status: died with exit code 0") == 1
    path = ts("-o", str(job)).stdout.strip()
    data = Path(path).read_bytes()
    text = (gzip.decompress(data) if "-z" in flags else data).decode()
    policy, nice, parent = (int(x) for x in text.split())
    return policy, nice, parent


def test_supervisors_run_batch_and_their_jobs_get_the_daemons_policy_and_nice(
    tsd_env: Env, ts: Runner
) -> None:
    start_daemon_under(tsd_env, lambda: os.nice(3) and None)
    # Spawned (the usual path) and forked (-z: gzip's pipe needs a fork), one job each.
    assert job_report(ts) == (os.SCHED_OTHER, 3, os.SCHED_BATCH)
    assert job_report(ts, "-z") == (os.SCHED_OTHER, 3, os.SCHED_BATCH)
    # The same supervisor runs the next job as the first: its policy is given back each time.
    assert job_report(ts) == (os.SCHED_OTHER, 3, os.SCHED_BATCH)


def test_a_daemon_started_under_sched_idle_keeps_it_for_supervisors_and_jobs(
    tsd_env: Env, ts: Runner
) -> None:
    start_daemon_under(tsd_env, lambda: os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)))
    assert job_report(ts) == (os.SCHED_IDLE, 0, os.SCHED_IDLE)
    assert job_report(ts, "-z") == (os.SCHED_IDLE, 0, os.SCHED_IDLE)

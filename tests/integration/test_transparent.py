"""`ts -nf CMD`: task-spooler's transparent mode leaves no finished entry behind.

The job runs through the queue like any other (slots, order, dependencies) and
its exit code becomes `ts`'s, but once it ends it is forgotten: it is not listed,
and asking about its id says the job is unknown, as in task-spooler.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from integration.harness import TS, Env, Runner, queue, wait_state, wait_until


def finished_rows(ts: Runner) -> list[str]:
    """Rows of `ts -l` (after the header) whose state is finished."""
    rows = ts("-l").stdout.splitlines()[1:]
    return [row for row in rows if row.split()[1] == "finished"]


def assert_unknown(ts: Runner, job: int) -> None:
    """Every per-job query about `job` says it does not exist, in one line."""
    for flag in ("-w", "-i", "-c", "-s"):
        proc = ts(flag, str(job), check=False)
        assert proc.returncode == 1, (flag, proc)
        assert proc.stderr.splitlines() == [f"ts: job {job} does not exist"], (flag, proc.stderr)


def test_the_task_spooler_sequence_leaves_five_finished_jobs(ts: Runner) -> None:
    # ts ls; ts -n ls; ts -f ls; ts -nf ls; ts ls; ts cat; ts -w
    queue(ts, "ls")
    ts("-n", "ls")  # prints the id and, as task-spooler's -n, ls's output
    ts("-f", "ls")
    nf = ts("-nf", "ls")
    assert nf.returncode == 0
    assert nf.stdout == "" or not nf.stdout.strip().isdigit()  # -nf prints no id
    queue(ts, "ls")
    queue(ts, "cat")
    ts("-w")
    assert len(finished_rows(ts)) == 5
    records = json.loads(ts("-M", "json").stdout)
    assert len(records) == 5
    assert {r["State"] for r in records} == {"finished"}


def test_nf_passes_a_failing_exit_code_through_and_leaves_no_entry(ts: Runner) -> None:
    before = queue(ts, "true")
    ts("-w", str(before))
    proc = ts("-nf", "sh", "-c", "exit 3", check=False)
    assert proc.returncode == 3, proc
    forgotten = before + 1  # ids are global and increasing
    assert [r["ID"] for r in json.loads(ts("-M", "json").stdout)] == [before]
    assert_unknown(ts, forgotten)
    # The next job gets a new id: the forgotten one is never reused.
    assert queue(ts, "true") == forgotten + 1


def test_nf_behind_a_running_job_waits_its_turn_then_leaves_no_entry(
    ts: Runner, tsd_env: Env
) -> None:
    go = Path(tsd_env.tmp) / "go"
    marker = Path(tsd_env.tmp) / "ran"
    blocker = queue(ts, "sh", "-c", f"while [ ! -e {go} ]; do sleep 0.02; done")
    wait_state(ts, blocker, "running")
    waiter = subprocess.Popen(
        [TS, "-nf", "touch", str(marker)], env=dict(tsd_env), cwd=str(tsd_env.tmp),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        queued = blocker + 1
        # The -nf client starts as this test polls: its job may not exist yet.
        wait_until(lambda: ts("-s", str(queued), check=False).returncode == 0)
        wait_state(ts, queued, "queued")  # in the queue like any job, behind the slot holder
        assert not marker.exists()
        assert waiter.poll() is None
        go.touch()
        _out, err = waiter.communicate(timeout=30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 0, err
    assert marker.exists()
    wait_until(lambda: ts("-s", str(blocker)).stdout.strip() == "finished")
    assert [r["ID"] for r in json.loads(ts("-M", "json").stdout)] == [blocker]
    assert_unknown(ts, queued)

"""The job controls end to end: --hold/--release, --begin, --retry, --array, --priority,
wait reasons and never-start refusals, with the real `ts` against a real personal daemon.

Jobs that must keep running wait on a gate file the test creates; states are polled.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from integration.harness import Env, Runner, one_line_error, queue, state, wait_state, wait_until


def records(ts: Runner) -> dict[int, dict[str, Any]]:
    """ts -M json, by job id."""
    return {rec["ID"]: rec for rec in json.loads(ts("-M", "json").stdout)}


def info_line(ts: Runner, job: int, label: str) -> str:
    """The value of one `Label: value` line of ts -i."""
    text = ts("-i", str(job)).stdout
    for line in text.splitlines():
        if line.startswith(f"{label}: "):
            return line.removeprefix(f"{label}: ")
    raise AssertionError(f"no {label!r} line in ts -i {job}:\n{text}")


def gate(env: Env, name: str) -> Path:
    return Path(env.tmp) / f"gate-{name}"


def gated(env: Env, name: str, then: str = "exit 0", before: str = "") -> tuple[str, ...]:
    """sh -c: `before`, wait for the gate file `name`, then `then`."""
    path = gate(env, name)
    return ("sh", "-c", f"{before} while [ ! -e {path} ]; do sleep 0.05; done; {then}")


def rows(ts: Runner) -> dict[int, str]:
    lines = ts("-l").stdout.splitlines()
    return {int(line.split()[0]): line for line in lines[1:]}


# ------------------------------------------------------------ --hold, --release


def test_hold_submits_a_held_job_that_release_queues_again(ts: Runner) -> None:
    job = queue(ts, "--hold", "true")
    assert state(ts, job) == "held"
    time.sleep(0.5)  # with a free slot it would have run by now
    assert state(ts, job) == "held"
    assert info_line(ts, job, "Wait reason") == f"held: ts --release {job} queues it"
    rec = records(ts)[job]
    assert rec["Held"] is True and rec["Wait_Reason"].startswith("held")
    row = rf"^{job} +held +\(held: ts --release {job} queues it\) +- +true$"
    assert re.search(row, rows(ts)[job])
    assert ts("--release", str(job)).stdout == ""
    assert ts("-w", str(job), check=False).returncode == 0
    assert records(ts)[job]["Held"] is False


def test_hold_id_holds_a_queued_job_at_its_place(ts: Runner, tsd_env: Env) -> None:
    blocker = queue(ts, *gated(tsd_env, "b"))
    wait_state(ts, blocker, "running")
    first, second = queue(ts, "true"), queue(ts, "true")
    ts("--hold", str(first))
    assert state(ts, first) == "held"
    gate(tsd_env, "b").touch()
    assert ts("-w", str(second), check=False).returncode == 0  # the held job held nobody up
    assert state(ts, first) == "held"
    assert next(iter(rows(ts))) == first  # still first in the queue
    ts("--release", str(first))
    assert ts("-w", str(first), check=False).returncode == 0


def test_hold_and_release_refuse_jobs_in_the_wrong_state_in_one_line(
    ts: Runner, tsd_env: Env
) -> None:
    running = queue(ts, *gated(tsd_env, "r"))
    wait_state(ts, running, "running")
    queued = queue(ts, "true")
    assert "running, not queued" in one_line_error(ts("--hold", str(running), check=False))
    assert "queued, not held" in one_line_error(ts("--release", str(queued), check=False))
    assert "does not exist" in one_line_error(ts("--release", "999", check=False))
    assert "takes no command" in one_line_error(ts("--hold", "5", "true", check=False))
    assert state(ts, queued) == "queued"
    gate(tsd_env, "r").touch()


def test_hold_without_an_id_holds_the_last_queued_job(ts: Runner, tsd_env: Env) -> None:
    blocker = queue(ts, *gated(tsd_env, "b"))
    wait_state(ts, blocker, "running")
    job = queue(ts, "true")
    ts("--hold")
    assert state(ts, job) == "held"
    ts("--release")
    gate(tsd_env, "b").touch()
    assert ts("-w", str(job), check=False).returncode == 0


# ------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--array", "5-1"), "range ends before it starts"),
        (("--array", "1-20000"), "over the limit of 10000"),
        (("--array", "1-1001"), "at most 1000 of your jobs may wait (max_queued)"),
        (("--begin", "yesterday"), "is not a time"),
        (("--begin", "2001-01-01T00:00"), "in the past"),
        (("--retry", "-1"), "--retry"),
        (("--retry", "101"), "--retry"),
        (("--priority", "1000"), "--priority"),
        (("--priority", "x"), "--priority"),
        (("--retry", "2", "-O", "log"), "--retry cannot be used with -O"),
        (("--array", "1-3", "-O", "log"), "--array cannot be used with -O"),
        (("--array", "1-3", "-n"), "--array cannot be used with -n"),
        (("--array", "1-3", "-f"), "--array cannot be used with -f"),
    ],
)
def test_bad_control_values_are_one_line_and_queue_nothing(
    ts: Runner, args: tuple[str, ...], says: str
) -> None:
    line = one_line_error(ts(*args, "true", check=False))
    assert says in line
    assert records(ts) == {}


@pytest.mark.parametrize(
    "controls",
    [("--hold",), ("--begin", "+1h"), ("--array", "1-3"), ("--retry", "2"), ("--priority", "9")],
)
def test_a_job_that_can_never_start_is_refused_with_any_control(
    ts: Runner, controls: tuple[str, ...]
) -> None:
    ts("-S", "2")
    line = one_line_error(ts(*controls, "-N", "3", "true", check=False))
    assert "job needs 3 slots but the server has 2" in line
    assert records(ts) == {}


def _has_nvml() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_has_nvml(), reason="this machine has NVML (a GPU driver)")
def test_a_held_gpu_array_without_nvml_is_refused_whole(ts: Runner) -> None:
    line = one_line_error(ts("--hold", "--array", "1-4", "-G", "1", "true", check=False))
    assert "no GPUs" in line
    assert records(ts) == {}


# ----------------------------------------------------------------------- --retry


def test_retry_runs_a_failing_job_again_under_its_id_until_it_succeeds(
    ts: Runner, tsd_env: Env
) -> None:
    counter = Path(tsd_env.tmp) / "counter"
    script = f"n=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 )); echo $n > {counter};"
    script += " [ $n -ge 3 ]"
    job = queue(ts, "--retry", "3", "sh", "-c", script)
    # A waiter from the start must not return on the two failed attempts.
    assert ts("-w", str(job), check=False).returncode == 0
    assert counter.read_text().strip() == "3"
    assert info_line(ts, job, "Attempts") == "3"
    assert info_line(ts, job, "Retries allowed") == "3"
    rec = records(ts)[job]
    assert rec["Attempts"] == 3 and rec["Retry"] == 3 and rec["E-Level"] == 0


def test_retry_gives_up_after_n_more_attempts_with_the_last_exit_code(ts: Runner) -> None:
    job = queue(ts, "--retry", "2", "sh", "-c", "exit 7")
    assert ts("-w", str(job), check=False).returncode == 7
    assert records(ts)[job]["Attempts"] == 3
    assert state(ts, job) == "finished"


def test_a_job_killed_with_k_is_not_retried(ts: Runner) -> None:
    job = queue(ts, "--retry", "5", "sleep", "60")
    wait_state(ts, job, "running")
    ts("-k", str(job))
    assert ts("-w", str(job), check=False).returncode != 0
    assert records(ts)[job]["Attempts"] == 1


def test_a_job_past_its_timeout_is_not_retried(ts: Runner) -> None:
    job = queue(ts, "--retry", "5", "--timeout", "1", "sleep", "60")
    assert ts("-w", str(job), check=False, timeout=60).returncode == 255
    assert records(ts)[job]["Attempts"] == 1


# ----------------------------------------------------------------------- --begin


def test_begin_starts_the_job_after_the_time_not_before(ts: Runner) -> None:
    job = queue(ts, "--begin", "+4s", "true")
    assert state(ts, job) == "queued"
    assert info_line(ts, job, "Wait reason").startswith("begins at ")
    assert records(ts)[job]["Wait_Reason"].startswith("begins at ")
    assert "(begins at " in rows(ts)[job]
    assert ts("-w", str(job), check=False, timeout=20).returncode == 0
    rec = records(ts)[job]
    assert rec["Start"] >= rec["Begin"]
    # "+4s" counts from the client's clock reading, before the daemon's Enqueue stamp
    # (seconds apart on a loaded machine); the start follows the begin time promptly.
    assert rec["Start"] - rec["Begin"] < 4.0  # woken at the time, not by a poll


def test_a_job_waiting_for_its_begin_time_does_not_hold_up_later_jobs(ts: Runner) -> None:
    later = queue(ts, "--begin", "+1h", "true")
    now = queue(ts, "true")
    assert ts("-w", str(now), check=False).returncode == 0
    assert state(ts, later) == "queued"
    ts("-r", str(later))


def test_the_daemon_does_not_poll_while_a_job_waits_for_its_begin_time(
    ts: Runner, tsd_env: Env
) -> None:
    queue(ts, "--begin", "+1h", "true")
    pid = tsd_env.daemon_pid()
    assert pid is not None
    before = _ctx_switches(pid)
    time.sleep(2.0)
    assert _ctx_switches(pid) - before <= 2


def _ctx_switches(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return sum(int(m) for m in re.findall(r"ctxt_switches:\s+(\d+)", text))


# ----------------------------------------------------------------------- --array


def test_array_prints_every_id_and_each_element_gets_its_index(ts: Runner) -> None:
    ts("-S", "4")
    proc = ts("--array", "1-5:2", "sh", "-c", "echo $TS_ARRAY_TASK_ID $TS_ARRAY_JOB_ID")
    ids = [int(line) for line in proc.stdout.splitlines()]
    assert len(ids) == 3 and ids == list(range(ids[0], ids[0] + 3))
    outputs = []
    for job in ids:
        assert ts("-w", str(job), check=False).returncode == 0
        outputs.append(ts("-c", str(job)).stdout.strip())
    assert outputs == [f"1 {ids[0]}", f"3 {ids[0]}", f"5 {ids[0]}"]
    recs = records(ts)
    assert [recs[i]["Array_Task"] for i in ids] == [1, 3, 5]
    assert {recs[i]["Array_Job"] for i in ids} == {ids[0]}
    assert info_line(ts, ids[1], "Array") == f"job {ids[0]}, index 3"


def test_array_list_spec_keeps_its_order(ts: Runner) -> None:
    ts("-S", "0")  # drained: nothing starts, nothing changes
    ids = [int(x) for x in ts("--array", "7,3,5", "true").stdout.split()]
    recs = records(ts)
    assert [recs[i]["Array_Task"] for i in ids] == [7, 3, 5]


def test_array_throttle_never_runs_more_than_k_elements(ts: Runner, tsd_env: Env) -> None:
    ts("-S", "4")
    log = Path(tsd_env.tmp) / "running"
    body = (
        f"echo start >> {log}; while [ ! -e {gate(tsd_env, 'a')} ]; do sleep 0.05; done;"
        f" echo end >> {log}"
    )
    ids = [int(x) for x in ts("--array", "1-5%2", "sh", "-c", body).stdout.split()]
    assert len(ids) == 5
    wait_until(lambda: [state(ts, j) for j in ids].count("running") == 2)
    other = queue(ts, "true")  # the throttle holds nobody else up
    assert ts("-w", str(other), check=False).returncode == 0
    states = [state(ts, j) for j in ids]
    assert states.count("running") == 2 and states.count("queued") == 3
    waiting = next(j for j, s in zip(ids, states, strict=True) if s == "queued")
    assert "of at most 2 elements running (%2)" in info_line(ts, waiting, "Wait reason")
    gate(tsd_env, "a").touch()
    for job in ids:
        assert ts("-w", str(job), check=False).returncode == 0
    # Never more than two between a start and an end, over the whole run.
    depth, most = 0, 0
    for word in log.read_text().split():
        depth += 1 if word == "start" else -1
        most = max(most, depth)
    assert most == 2


# -------------------------------------------------------------------- --priority


def test_priority_orders_the_users_own_queue_higher_first(ts: Runner, tsd_env: Env) -> None:
    blocker = queue(ts, *gated(tsd_env, "b"))
    wait_state(ts, blocker, "running")
    low = queue(ts, "--priority", "-5", "true")
    plain = queue(ts, "true")
    high = queue(ts, "--priority", "10", "true")
    tie = queue(ts, "--priority", "10", "true")
    assert list(rows(ts))[1:5] == [high, tie, plain, low]
    assert info_line(ts, high, "Priority") == "10"
    gate(tsd_env, "b").touch()
    for job in (high, tie, plain, low):
        assert ts("-w", str(job), check=False).returncode == 0
    recs = records(ts)
    starts = [recs[j]["Start"] for j in (high, tie, plain, low)]
    assert starts == sorted(starts)


# --------------------------------------------------------------- across a restart


def test_held_begin_and_retry_state_survive_a_daemon_restart(ts: Runner, tsd_env: Env) -> None:
    ts("-S", "2")
    held = queue(ts, "--hold", "true")
    counter = Path(tsd_env.tmp) / "counter"
    # Attempt 1 fails; attempt 2 waits for the gate, then succeeds.
    script = (
        f"n=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 )); echo $n > {counter};"
        f" [ $n -ge 2 ] || exit 4; while [ ! -e {gate(tsd_env, 'r')} ]; do sleep 0.05; done"
    )
    retried = queue(ts, "--retry", "3", "sh", "-c", script)
    wait_until(lambda: counter.exists() and counter.read_text().strip() == "2")
    wait_state(ts, retried, "running")
    later = queue(ts, "--begin", "+4s", "true")
    pid = tsd_env.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: tsd_env.daemon_pid() is None)

    recs = records(ts)  # a new daemon
    assert recs[held]["State"] == "held"
    assert recs[retried]["Attempts"] == 2 and recs[retried]["State"] == "running"
    assert recs[later]["State"] == "queued" and recs[later]["Begin"] is not None
    gate(tsd_env, "r").touch()
    assert ts("-w", str(retried), check=False).returncode == 0
    assert ts("-w", str(later), check=False, timeout=20).returncode == 0
    recs = records(ts)
    assert recs[later]["Start"] >= recs[later]["Begin"]
    assert recs[retried]["Attempts"] == 2
    time.sleep(0.3)
    assert state(ts, held) == "held"
    ts("--release", str(held))
    assert ts("-w", str(held), check=False).returncode == 0

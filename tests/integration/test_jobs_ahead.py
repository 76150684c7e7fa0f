"""Jobs sent ahead (tsd.ahead) through a real personal daemon: in a burst of short jobs
each runs once with its own exit code; one sent behind a job that runs on is given back
and runs elsewhere; a crash in the middle of a burst loses none and runs none twice."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from integration.harness import Env, Runner, queue, wait_until


def listed(ts: Runner) -> dict[int, dict[str, object]]:
    return {j["ID"]: j for j in json.loads(ts("-M", "json").stdout)}


def array(ts: Runner, size: int, *command: str) -> int:
    """Queue an --array of `size` elements; the last one's id."""
    return int(ts("--array", f"1-{size}", *command).stdout.split()[-1])


def logged(env: Env) -> str:
    return (env.state / "tsd" / "tsd.log").read_text()


def one_waiting_ahead(ts: Runner, window: str, long_s: str, *command: str) -> tuple[int, int]:
    """One slot: a sleep of `long_s` runs, and `command` is sent ahead behind it on the
    same supervisor (its submit's pass sends it: the supervisor's last job was short,
    and the sleep began less than half the window ago): (sleep, job ahead)."""
    ts("-S", "1", extra_env={"TSD_AHEAD_WINDOW": window})
    array(ts, 5, "true")
    long_job = queue(ts, "sleep", long_s)
    wait_until(lambda: listed(ts)[long_job]["State"] == "running", what="the sleep")
    waiting = queue(ts, *command)
    wait_until(lambda: listed(ts)[waiting]["State"] == "running", what="the job ahead")
    return long_job, waiting


def test_a_burst_of_short_jobs_runs_each_once_with_its_own_exit_code(
    ts: Runner, tsd_env: Env
) -> None:
    ran = tsd_env.tmp / "ran"
    ts("-S", "2")
    last = array(ts, 200, "sh", "-c",
                 f'echo "$TS_JOBID" >> {ran}; exit $((TS_ARRAY_TASK_ID % 3))')  # fmt: skip
    ts("-w", str(last), check=False)
    wait_until(lambda: all(j["State"] == "finished" for j in listed(ts).values()))
    jobs = listed(ts)
    assert len(jobs) == 200
    first = min(jobs)
    assert all(j["E-Level"] == (i - first + 1) % 3 for i, j in jobs.items())
    assert sorted(int(x) for x in ran.read_text().split()) == sorted(jobs)


def test_a_job_sent_behind_one_that_runs_on_is_given_back_and_runs_elsewhere(
    ts: Runner, tsd_env: Env
) -> None:
    ran = tsd_env.tmp / "ran"
    # All queued first: then one burst, the long jobs in the middle of it. A window of
    # 0.5 s: the job sent behind a long one surely goes (the burst's passes come often
    # enough) and comes back, whatever the machine's speed.
    ts("-S", "0", extra_env={"TSD_AHEAD_WINDOW": "0.5"})
    short = ["sh", "-c", f'echo "$TS_JOBID" >> {ran}']
    longs = []
    for _ in range(3):  # a short job's supervisor starts a long one, then gets the next
        array(ts, 30, *short)
        longs.append(queue(ts, "sleep", "30"))  # ended by the test's end (ts -T)
    last = array(ts, 30, *short)
    ts("-S", "4")
    ts("-w", str(last), check=False)
    wait_until(lambda: all(listed(ts)[i]["State"] == "finished" for i in range(1, last + 1)
                           if i not in longs), what="the short jobs")  # fmt: skip
    assert "given back by its supervisor" in logged(tsd_env)
    # The short jobs did not wait behind the long ones (4 slots, 3 long jobs of 30 s).
    assert any(listed(ts)[i]["State"] == "running" for i in longs)
    shorts = [i for i in range(1, last + 1) if i not in longs]
    assert sorted(int(x) for x in ran.read_text().split()) == shorts, "each ran once"


def test_a_crash_in_a_burst_loses_no_job_and_runs_none_twice(ts: Runner, tsd_env: Env) -> None:
    ran = tsd_env.tmp / "ran"
    ts("-S", "2")
    ids: list[int] = []
    for _round in range(4):
        last = array(ts, 60, "sh", "-c", f'echo "$TS_JOBID" >> {ran}')
        ids.extend(range(last - 59, last + 1))
        wait_until(lambda: ran.exists() and len(ran.read_text().split()) > len(ids) - 50,
                   interval=0.001)  # fmt: skip
        pid = tsd_env.daemon_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # in the middle of the burst
        wait_until(lambda: tsd_env.daemon_pid() is None)
    for job_id in ids:
        ts("-w", str(job_id), check=False)
    jobs = listed(ts)
    assert all(jobs[i]["State"] == "finished" and jobs[i]["E-Level"] == 0 for i in ids)
    assert sorted(int(x) for x in ran.read_text().split()) == ids, "every job ran exactly once"


def test_a_job_killed_while_it_waits_ahead_ends_killed_and_never_runs(
    ts: Runner, tsd_env: Env
) -> None:
    mark = tsd_env.tmp / "ran"
    _, waiting = one_waiting_ahead(ts, "3", "6", "touch", str(mark))
    assert not mark.exists()
    ts("-k", str(waiting))
    wait_until(lambda: listed(ts)[waiting]["State"] == "finished", what="its end")
    assert "killed before it started" in ts("-i", str(waiting)).stdout
    assert not mark.exists()


def test_ts_p_on_a_job_waiting_ahead_answers_its_pid_once_it_starts(
    ts: Runner, tsd_env: Env
) -> None:
    long_job, waiting = one_waiting_ahead(ts, "3", "0.5", "sleep", "7")
    pid = int(ts("-p", str(waiting)).stdout)  # once the first sleep is over
    assert listed(ts)[long_job]["State"] == "finished"
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", b"7"]
    ts("-k", str(waiting))


def test_no_job_goes_ahead_with_a_window_of_zero(ts: Runner, tsd_env: Env) -> None:
    ts("-S", "0", extra_env={"TSD_AHEAD_WINDOW": "0"})
    array(ts, 5, "true")
    queue(ts, "sleep", "6")
    after = queue(ts, "true")
    ts("-S", "1")
    wait_until(lambda: listed(ts)[after - 1]["State"] == "running", what="the sleep")
    assert listed(ts)[after]["State"] == "queued"  # not running ahead behind it



def crash_with_a_job_ahead(ts: Runner, env: Env, window: str, long_s: str) -> tuple[int, int]:
    """One slot: a sleep of `long_s` runs and a job (it writes its id to tmp/ran) waits
    ahead behind it on the same supervisor when the daemon is killed: (sleep, job)."""
    ran = env.tmp / "ran"
    long_job, waiting = one_waiting_ahead(
        ts, window, long_s, "sh", "-c", f'echo "$TS_JOBID" >> {ran}')
    assert not ran.exists()
    pid = env.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: env.daemon_pid() is None)
    return long_job, waiting


def test_a_crash_with_a_job_ahead_that_starts_in_time_ends_both_once(
    ts: Runner, tsd_env: Env
) -> None:
    long_job, waiting = crash_with_a_job_ahead(ts, tsd_env, "5", "1")
    ts("-w", str(waiting), check=False)  # a new daemon: it re-adopts both
    jobs = listed(ts)
    assert (jobs[long_job]["State"], jobs[long_job]["E-Level"]) == ("finished", 0)
    assert (jobs[waiting]["State"], jobs[waiting]["E-Level"]) == ("finished", 0)
    assert (tsd_env.tmp / "ran").read_text().split() == [str(waiting)]


def test_a_crash_with_a_job_ahead_past_its_deadline_queues_it_again_and_it_runs_once(
    ts: Runner, tsd_env: Env
) -> None:
    long_job, waiting = crash_with_a_job_ahead(ts, tsd_env, "2", "3.5")
    ts("-l")  # a new daemon, while the sleep still runs: its supervisor gives the job back
    wait_until(lambda: listed(ts)[long_job]["State"] == "finished", what="the sleep")
    wait_until(lambda: listed(ts)[waiting]["State"] == "finished", what="the job given back")
    assert listed(ts)[waiting]["E-Level"] == 0
    assert (tsd_env.tmp / "ran").read_text().split() == [str(waiting)]


def test_the_jobs_after_one_waiting_ahead_behind_a_long_job_do_not_wait_for_it(
    ts: Runner, tsd_env: Env
) -> None:
    # Two slots, one burst with a long job in it: the job sent behind the long one waits
    # there (3 s window), and the other slot runs the rest meanwhile.
    ts("-S", "0", extra_env={"TSD_AHEAD_WINDOW": "3"})
    array(ts, 10, "true")
    long_job = queue(ts, "sleep", "10")
    last = array(ts, 20, "true")
    ts("-S", "2")
    trailing = range(last - 19, last + 1)

    def finished() -> int:
        jobs = listed(ts)
        return sum(jobs[i]["State"] == "finished" for i in trailing)

    wait_until(lambda: finished() >= 19, timeout=2.5, what="all but one waiting ahead")
    assert listed(ts)[long_job]["State"] == "running"

"""Jobs sent ahead (tsd.ahead): a reused supervisor given its next job while its job runs
starts it at that job's end without waiting for the daemon, before the deadline only;
the answer to the earlier end is read meanwhile; a job past its deadline is given back."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import time
from pathlib import Path

import pytest
from unit.test_spawner import gated, wait_until
from unit.test_supervisor_pool import read_until, report_in, reusable, said_end, until_end

from tsd import ahead, eligibility, exitreport, launch
from tsd.model import Job, JobSpec, JobState
from tsd.runner import PidfdWatch
from tsd.spawnlink import SpawnerLauncher
from tsd.supervisorpool import Member


def running_first(tmp: Path, spawner: SpawnerLauncher) -> tuple[launch.Launched, Path, Member]:
    """Job 1 sent and running (it waits for the returned gate); its supervisor."""
    gate = tmp / "gate"
    first = spawner.spawn(reusable(tmp, 1, gated(gate, 3)))
    first.go()
    read_until(first, lambda said: "pid " in said)  # it runs (told after TELL_AFTER)
    (member,) = spawner.pool._members.values()
    return first, gate, member


def sent_ahead(
    spawner: SpawnerLauncher, member: Member, p: launch.LaunchPlan, until: float
) -> launch.Launched:
    member.ahead_taken = True  # as take_ahead leaves it
    started = spawner.spawn_on(member, dataclasses.replace(p, ahead_until=until))
    started.go()
    return started


def test_a_job_sent_ahead_starts_at_the_end_before_it_while_that_end_waits_for_its_answer(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, gate, member = running_first(tmp_path, spawner)
    mark = tmp_path / "ran"
    second = sent_ahead(
        spawner, member, reusable(tmp_path, 2, f"touch {mark}; exit 4"), time.monotonic() + 30
    )
    time.sleep(0.2)
    assert not mark.exists()  # not before the job it waits behind ends
    gate.touch()
    said = read_until(first, said_end)
    assert report_in(said).exit.code == 3
    wait_until(mark.exists)  # it runs, and the first end is still not answered
    assert first.answer is not None and first.answer(launch.ACK)
    said = until_end(second)
    assert said.startswith(f"{launch.TAKING}\n") and report_in(said).exit.code == 4
    assert read_until(first, lambda _: False) == ""  # its pipe closed once answered
    os.close(first.report_fd)
    # Both ends ACKed: no report file; and the supervisor is idle again.
    assert not any((tmp_path / "exits").iterdir())
    wait_until(lambda: spawner.pool.idle() == 1)


def test_a_nak_to_the_end_before_a_job_sent_ahead_writes_that_report_file_as_it_runs(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, gate, member = running_first(tmp_path, spawner)
    gate2 = tmp_path / "gate2"
    second = sent_ahead(spawner, member, reusable(tmp_path, 2, gated(gate2, 5)),
                        time.monotonic() + 30)  # fmt: skip
    gate.touch()
    read_until(first, said_end)
    read_until(second, lambda said: "pid " in said)  # job 2 runs
    assert first.answer is not None and first.answer(launch.NAK)
    wait_until(lambda: exitreport.read(tmp_path / "exits", 1) is not None)
    report = exitreport.read(tmp_path / "exits", 1)
    assert report is not None and report.exit.code == 3
    os.close(first.report_fd)
    gate2.touch()
    assert report_in(until_end(second)).exit.code == 5


def late_second(
    tmp: Path, spawner: SpawnerLauncher
) -> tuple[launch.Launched, Path, Member, launch.Launched, Path]:
    """Job 1 running; job 2 (it touches the returned mark) sent ahead with a deadline
    0.1 s away: (job 1, its gate, their supervisor, job 2, the mark)."""
    first, gate, member = running_first(tmp, spawner)
    mark = tmp / "ran"
    second = sent_ahead(
        spawner, member, reusable(tmp, 2, f"touch {mark}"), time.monotonic() + 0.1
    )
    return first, gate, member, second, mark


def test_a_job_sent_ahead_past_its_deadline_is_given_back_and_never_runs(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, gate, _, second, mark = late_second(tmp_path, spawner)
    time.sleep(0.3)
    gate.touch()
    assert report_in(until_end(first)).exit.code == 3
    said = read_until(second, lambda _: False)
    os.close(second.report_fd)
    assert said == f"{launch.TAKING}\n{launch.BACK}\n"
    wait_until(lambda: spawner.pool.idle() == 1)  # it said IDLE for the job given back
    assert not mark.exists()
    assert exitreport.read(tmp_path / "exits", 2) is None  # the daemon queues it again


def test_a_job_given_back_after_its_daemon_died_leaves_the_idle_mark_not_a_report(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, gate, member, second, mark = late_second(tmp_path, spawner)
    pid, start = member.pid, member.start
    member.link.close()  # the daemon dies: no BYE, its end of the link closed
    os.close(first.report_fd)
    os.close(second.report_fd)
    time.sleep(0.3)
    gate.touch()
    exits = tmp_path / "exits"
    wait_until(lambda: exitreport.has_idle_mark(exits, pid, start))
    first_report = exitreport.read(exits, 1)  # no daemon to ACK it: its file
    assert first_report is not None and first_report.exit.code == 3
    assert exitreport.read(exits, 2) is None and not mark.exists()


def job(**kw: object) -> Job:
    spec = JobSpec(command=("true",), cwd="/", env=(), **kw)  # type: ignore[arg-type]
    return Job(id=1, uid=1, user="u", spec=spec, state=JobState.QUEUED, order=1,
               enqueue_time=0.0)  # fmt: skip


def test_only_a_plain_job_may_go_ahead() -> None:
    assert eligibility.may_go_ahead(job(), 0.0)
    assert not eligibility.may_go_ahead(job(slots=2), 0.0)
    assert not eligibility.may_go_ahead(job(gpus=1), 0.0)
    assert not eligibility.may_go_ahead(job(depends=(5,)), 0.0)
    assert not eligibility.may_go_ahead(job(array_throttle=2), 0.0)
    assert not eligibility.may_go_ahead(job(begin=10.0), 0.0)
    assert eligibility.may_go_ahead(job(begin=10.0), 11.0)
    assert not eligibility.may_go_ahead(dataclasses.replace(job(), state=JobState.HELD), 0.0)


def test_one_supervisor_watched_for_two_jobs_tells_both_of_its_exit_once() -> None:
    """After a restart the daemon watches a supervisor for each job recorded on it (one
    it ran, one sent ahead to it): its exit reaches both, once each."""
    loop = asyncio.new_event_loop()
    try:
        child = subprocess.Popen(["sleep", "0.2"])
        heard: list[str] = []
        watch = PidfdWatch(loop)
        assert watch.watch(child.pid, lambda: heard.append("ran"))
        assert watch.watch(child.pid, lambda: heard.append("ahead"))

        async def until_heard() -> None:
            while len(heard) < 2:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # nothing more comes

        loop.run_until_complete(asyncio.wait_for(until_heard(), 10))
        child.wait()
        assert heard == ["ran", "ahead"]
        watch.forget(child.pid)  # as a job's settling does: nothing left, no error
    finally:
        loop.close()


def test_the_window_comes_from_the_environment_and_a_bad_value_keeps_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for value, window in (("0.5", 0.5), ("0", 0.0), ("-1", 0.0), ("abc", 0.02)):
        monkeypatch.setenv("TSD_AHEAD_WINDOW", value)
        assert ahead._window() == window
    monkeypatch.delenv("TSD_AHEAD_WINDOW")
    assert ahead._window() == 0.02

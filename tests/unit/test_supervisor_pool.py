"""Reused supervisors (tsd.spawner.run_member, tsd.supervisorpool): linked to the daemon,
one job at a time each, every job's end intact."""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import time
from pathlib import Path

import pytest
from unit.test_spawner import alive, gated, plan, ppid, wait_until

from tsd import exitreport, launch, supervisorpool
from tsd.spawnlink import SpawnerLauncher


def reusable(tmp: Path, job_id: int, script: str) -> launch.LaunchPlan:
    return dataclasses.replace(plan(tmp, job_id, script), reuse=True)


def read_until(started: launch.Launched, done: object, timeout: float = 20.0) -> str:
    """What the supervisor said on the report pipe, until `done(said)` or end of file."""
    said = b""
    deadline = time.monotonic() + timeout
    while not done(said.decode()):  # type: ignore[operator]
        left = deadline - time.monotonic()
        assert left > 0, f"the supervisor said only {said!r}"
        ready, _, _ = select.select([started.report_fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(started.report_fd, 4096)
        if not chunk:
            break
        said += chunk
    return said.decode()


def said_end(said: str) -> bool:
    return "\nend " in said or said.startswith("end ")


def until_end(started: launch.Launched, answer: bytes | None = launch.ACK) -> str:
    """Read the report pipe as a daemon does: to the end's line, then `answer` it (ACK:
    stored; NAK: write the file; None: the daemon is gone) and read on to the end of file."""
    said = read_until(started, said_end)
    if started.answer is not None:
        started.answer(answer)
    said += read_until(started, lambda _: False)
    os.close(started.report_fd)
    return said


def report_in(said: str) -> exitreport.ExitReport:
    sent = exitreport.decode(launch.parse_report(said)["end"])
    assert sent is not None, said
    return sent


def run_to_end(spawner: SpawnerLauncher, p: launch.LaunchPlan) -> tuple[int, str]:
    """Run a job to its end, ACKed; then wait for its supervisor to be idle again."""
    idle = spawner.pool.idle()
    started = spawner.spawn(p)
    started.go()
    said = until_end(started)
    wait_until(lambda: spawner.pool.idle() > idle - (idle > 0))
    return started.supervisor_pid, said


def test_jobs_one_after_another_run_on_one_supervisor_each_with_its_own_exit_code(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, said = run_to_end(spawner, reusable(tmp_path, 1, "echo one; exit 7"))
    assert ppid(first) == spawner.spawner_pid
    assert report_in(said).exit.code == 7 and "pid " in said and "out " in said
    second, said = run_to_end(spawner, reusable(tmp_path, 2, "echo two; exit 8"))
    assert second == first and alive(first)  # it stayed, and took the next job
    report = report_in(said)
    assert report.exit.code == 8 and report.output is not None
    assert Path(report.output).read_text() == "two\n"
    # ACKed: the daemon stored both ends, so no exit report file was written.
    assert not any((tmp_path / "exits").iterdir())


def test_jobs_at_the_same_time_get_a_supervisor_each(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    gate = tmp_path / "gate"
    a = spawner.spawn(reusable(tmp_path, 1, gated(gate, 1)))
    a.go()
    b = spawner.spawn(reusable(tmp_path, 2, gated(gate, 2)))
    b.go()
    assert a.supervisor_pid != b.supervisor_pid
    gate.touch()
    assert (report_in(until_end(a)).exit.code, report_in(until_end(b)).exit.code) == (1, 2)


def second_job_taken(
    tmp_path: Path, spawner: SpawnerLauncher
) -> tuple[int, Path, launch.Launched]:
    """Job 1 run to its end, then job 2 (it touches the returned mark when it runs) given
    to that same supervisor and not sent yet: (the supervisor's pid, mark, job 2)."""
    first, _ = run_to_end(spawner, reusable(tmp_path, 1, "exit 0"))
    mark = tmp_path / "ran"
    started = spawner.spawn(reusable(tmp_path, 2, f"touch {mark}"))
    assert started.supervisor_pid == first
    return first, mark, started


def test_a_job_runs_only_once_it_is_sent_and_an_abort_gives_the_supervisor_back(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, mark, started = second_job_taken(tmp_path, spawner)
    time.sleep(0.2)
    assert not mark.exists()  # no GO (not stored as running yet): nothing runs
    started.abort()
    os.close(started.report_fd)
    wait_until(lambda: spawner.pool.idle() == 1)  # it dropped the plan and said IDLE
    again = spawner.spawn(reusable(tmp_path, 3, "exit 3"))
    assert again.supervisor_pid == first
    again.go()
    assert report_in(until_end(again)).exit.code == 3 and not mark.exists()


def test_a_kill_that_crossed_the_previous_jobs_end_does_not_reach_the_next_job(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, _ = run_to_end(spawner, reusable(tmp_path, 1, "exit 0"))
    # A ts -k of job 1 sent just as it ended: pending in its supervisor, for job 1.
    os.kill(first, signal.SIGTERM)
    gate = tmp_path / "gate"
    started = spawner.spawn(reusable(tmp_path, 2, gated(gate, 5)))
    assert started.supervisor_pid == first
    started.go()
    time.sleep(0.3)  # time enough for a stale SIGTERM to end the job, were it kept
    gate.touch()
    report = report_in(until_end(started))
    assert report.exit.code == 5 and report.exit.signal is None


def test_a_kill_of_the_current_job_still_ends_it(tmp_path: Path, spawner: SpawnerLauncher) -> None:
    first, _ = run_to_end(spawner, reusable(tmp_path, 1, "exit 0"))
    started = spawner.spawn(reusable(tmp_path, 2, "sleep 300"))
    assert started.supervisor_pid == first
    started.go()
    read_until(started, lambda said: "pid " in said)  # the runner signals only after it
    os.kill(first, signal.SIGTERM)  # what ts -k does on the personal daemon
    assert report_in(until_end(started)).exit.signal == signal.SIGTERM
    assert alive(first)  # and the supervisor serves on


def test_what_a_job_left_running_is_ended_before_its_supervisor_takes_another(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    pid_file = tmp_path / "left.pid"
    script = f"setsid sleep 300 & echo $! > {pid_file}; sleep 300 & echo $! >> {pid_file}; exit 3"
    first, said = run_to_end(spawner, reusable(tmp_path, 1, script))
    left = [int(p) for p in pid_file.read_text().split()]
    assert len(left) == 2 and not any(alive(p) for p in left)
    assert report_in(said).exit.code == 3
    second, said = run_to_end(spawner, reusable(tmp_path, 2, "exit 4"))
    assert second == first and report_in(said).exit.code == 4


def test_an_acked_end_frees_the_supervisor_at_once_and_a_nak_at_its_idle_after_the_file(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    started = spawner.spawn(reusable(tmp_path, 1, "exit 1"))
    started.go()
    assert report_in(until_end(started, answer=launch.ACK)).exit.code == 1
    assert spawner.pool.idle() == 1  # at the ACK: no IDLE to wait for...
    member = spawner.pool.take()
    assert member is not None and member.pid == started.supervisor_pid
    assert select.select([member.link], [], [], 0.3)[0] == []  # ...and none comes
    nak = spawner.pool.launched(member, reusable(tmp_path, 2, "exit 2"))
    nak.go()
    assert report_in(until_end(nak, answer=launch.NAK)).exit.code == 2
    report = exitreport.read(tmp_path / "exits", 2)
    assert report is not None and report.exit.code == 2
    wait_until(lambda: spawner.pool.idle() == 1)  # its IDLE, once the file is written


def test_a_job_reads_dev_null_and_its_supervisor_keeps_none_of_its_outputs(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    # The job gets its outputs as the supervisor's own fds 1 and 2 for the spawn: once
    # it runs, they are /dev/null again (a ts -n reader sees the job's end as its end).
    script = (
        "sleep 0.3; echo x >&0 2>/dev/null && echo stdin-writable; "
        "readlink /proc/$$/fd/0 /proc/$PPID/fd/1 /proc/$PPID/fd/2; echo to-stderr >&2"
    )
    started = spawner.spawn(reusable(tmp_path, 1, script))
    started.go()
    report = report_in(until_end(started))
    assert report.exit.code == 0 and report.output is not None
    lines = Path(report.output).read_text().splitlines()
    assert lines == ["/dev/null", "/dev/null", "/dev/null", "to-stderr"]


def test_a_supervisor_that_died_idle_is_replaced_by_a_new_one(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, _ = run_to_end(spawner, reusable(tmp_path, 1, "exit 0"))
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not alive(first))
    second, said = run_to_end(spawner, reusable(tmp_path, 2, "exit 6"))
    assert second != first and report_in(said).exit.code == 6


def test_a_job_sent_to_a_supervisor_that_just_died_goes_back_to_the_queue(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, mark, started = second_job_taken(tmp_path, spawner)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not alive(first))
    started.go()  # it cannot be sent: the job never ran, and its pipe says so
    assert report_in(until_end(started, answer=None)).aborted and not mark.exists()


def test_a_supervisor_that_dies_with_its_job_gives_the_daemon_an_end_of_file_at_once(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    started = spawner.spawn(reusable(tmp_path, 1, "sleep 300"))
    started.go()
    read_until(started, lambda said: "pid " in said)
    os.kill(started.supervisor_pid, signal.SIGKILL)
    said = read_until(started, lambda _: False, timeout=5)  # end of file, with no report
    assert "end " not in said and exitreport.read(tmp_path / "exits", 1) is None


def test_plans_without_reuse_get_a_supervisor_of_their_own_that_exits(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, _ = run_to_end(spawner, reusable(tmp_path, 1, "exit 0"))
    started = spawner.spawn(plan(tmp_path, 2, "exit 2"))  # a system job: its scope goes with it
    assert started.supervisor_pid != first and started.answer is None
    pidfd = os.pidfd_open(started.supervisor_pid)
    started.go()
    assert "end -" in until_end(started)
    launch.wait_pidfd(pidfd)  # it exits
    report = exitreport.read(tmp_path / "exits", 2)
    assert report is not None and report.exit.code == 2


def test_closing_the_launcher_lets_idle_supervisors_go_and_running_jobs_finish(
    tmp_path: Path,
) -> None:
    spawner = SpawnerLauncher()
    spawner.start()
    gate = tmp_path / "gate"
    busy = spawner.spawn(reusable(tmp_path, 2, gated(gate, 9)))
    busy.go()
    idle, _ = run_to_end(spawner, reusable(tmp_path, 1, "exit 0"))
    assert idle != busy.supervisor_pid
    spawner.close()  # the daemon stops: its report pipes and ACKs go with it
    os.close(busy.report_fd)
    wait_until(lambda: not alive(idle))
    assert alive(busy.supervisor_pid)
    gate.touch()
    wait_until(lambda: not alive(busy.supervisor_pid))  # it leaves once its job is over
    report = exitreport.read(tmp_path / "exits", 2)  # its report is there for the next daemon
    assert report is not None and report.exit.code == 9


def test_a_nak_has_the_report_written_to_its_file_before_the_end_of_file(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    """NAK: the daemon will not record the report it was sent (the daemon's own end is
    in test_closing_the_launcher...): the supervisor writes the file, then closes."""
    started = spawner.spawn(reusable(tmp_path, 1, "exit 11"))
    started.go()
    sent = report_in(until_end(started, answer=launch.NAK))
    assert exitreport.read(tmp_path / "exits", 1) == sent and sent.exit.code == 11
    wait_until(lambda: spawner.pool.idle() == 1)  # and it serves on


def _report_durability(tmp: Path, answer: bytes | None) -> list[bool]:
    """The `durable` of each exit report file a supervisor wrote after sending its
    report, the daemon answering `answer` (None: gone). Run in a forked child: a
    supervisor blocks signals and is a subreaper."""
    ack_r, ack_w = os.pipe()
    rep_r, rep_w = os.pipe()
    out_r, out_w = os.pipe()
    p = reusable(tmp, 1, "exit 0")
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (out_r, rep_r, ack_w):
                os.close(fd)
            asked: list[bool] = []
            real = exitreport.write
            exitreport.write = lambda d, j, r, durable=True: (  # type: ignore[assignment]
                asked.append(durable), real(d, j, r, durable))[-1]
            launch.become_supervisor()
            launch.run_job(p, rep_w, lambda: os.read(ack_r, 1))
            os.write(out_w, b"".join(b"1" if d else b"0" for d in asked) or b"-")
        finally:
            os._exit(0)
    for fd in (out_w, ack_r, rep_w):
        os.close(fd)
    said = b""
    while b"end " not in said:
        said += os.read(rep_r, 4096)
    if answer is not None:
        os.write(ack_w, answer)
    os.close(ack_w)
    written = os.read(out_r, 16)
    assert written, "the supervisor failed"
    os.waitpid(pid, 0)
    os.close(rep_r)
    os.close(out_r)
    return [] if written == b"-" else [c == ord("1") for c in written]


def test_the_exit_report_file_is_written_synced_only_when_no_ack_comes(tmp_path: Path) -> None:
    # An ACK says the daemon's own synced commit holds the end: no file at all. With no
    # ACK (NAK, or no daemon: restarting, crashed) the report alone must survive a crash.
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    assert _report_durability(tmp_path / "a", launch.ACK) == []
    assert _report_durability(tmp_path / "b", launch.NAK) == [True]
    assert _report_durability(tmp_path / "c", None) == [True]


def test_with_an_on_finish_command_the_report_waits_for_it_in_the_file(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    """TS_ONFINISH (and mail) run after the job and may change its report: the daemon
    reads the file then, at the pipe's end of file, not a report sent before."""
    hook = tmp_path / "hook"
    hook.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/hooked\n")
    hook.chmod(0o755)
    p = dataclasses.replace(reusable(tmp_path, 1, "exit 2"), on_finish=str(hook))
    started = spawner.spawn(p)
    assert started.answer is None
    started.go()
    said = until_end(started)
    assert launch.parse_report(said)["end"] == "-"
    assert (tmp_path / "hooked").read_text().startswith("1 2 ")
    report = exitreport.read(tmp_path / "exits", 1)
    assert report is not None and report.exit.code == 2


def test_a_supervisor_whose_end_was_not_read_yet_gets_no_job_another_runs_the_next(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    # Until the daemon has its end (Launched.ending), it may still be running its job.
    first = spawner.spawn(reusable(tmp_path, 1, "exit 1"))
    first.go()
    said = read_until(first, said_end)
    mark = tmp_path / "ran"
    second = spawner.spawn(reusable(tmp_path, 2, f"touch {mark}; exit 2"))
    assert second.supervisor_pid != first.supervisor_pid
    second.go()
    assert report_in(until_end(second)).exit.code == 2 and mark.exists()
    assert first.answer is not None and first.answer(launch.ACK)  # answered only now
    assert report_in(said).exit.code == 1
    assert read_until(first, lambda _: False) == ""  # its pipe: closed after the ACK
    os.close(first.report_fd)
    assert exitreport.read(tmp_path / "exits", 1) is None  # ACKed: no file written
    wait_until(lambda: spawner.pool.idle() == 2)  # both idle again, both kept
    assert run_to_end(spawner, reusable(tmp_path, 3, "exit 3"))[0] in (
        first.supervisor_pid, second.supervisor_pid)  # fmt: skip


def test_a_supervisor_still_waiting_for_its_answer_when_the_daemon_stops_writes_its_report(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first = spawner.spawn(reusable(tmp_path, 1, "exit 1"))
    first.go()
    read_until(first, said_end)
    spawner.close()  # the daemon stops before job 1's end was answered
    wait_until(lambda: exitreport.read(tmp_path / "exits", 1) is not None)
    done = exitreport.read(tmp_path / "exits", 1)
    assert done is not None and done.exit.code == 1  # for the next daemon to record
    wait_until(lambda: not alive(first.supervisor_pid))
    os.close(first.report_fd)


def test_idle_supervisors_beyond_the_kept_number_go_only_after_a_while_idle(
    tmp_path: Path, spawner: SpawnerLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A burst's pool stays for the next burst (no fork per job at each lull), then shrinks.
    monkeypatch.setattr(supervisorpool, "MAX_IDLE", 1)
    gate = tmp_path / "gate"
    jobs = [spawner.spawn(reusable(tmp_path, n, gated(gate, n))) for n in (1, 2, 3)]
    for job in jobs:
        job.go()
    assert len({job.supervisor_pid for job in jobs}) == 3
    gate.touch()
    for n, job in enumerate(jobs, 1):
        assert report_in(until_end(job)).exit.code == n
    wait_until(lambda: spawner.pool.idle() == 3)  # more than MAX_IDLE, idle a moment only
    assert all(alive(job.supervisor_pid) for job in jobs)
    monkeypatch.setattr(supervisorpool, "IDLE_KEEP", 0.0)  # now idle long enough
    assert spawner.pool.idle() == 1
    kept = run_to_end(spawner, reusable(tmp_path, 4, "exit 4"))[0]
    assert kept == jobs[0].supervisor_pid  # the oldest is kept, the newer ones went
    wait_until(lambda: not any(alive(job.supervisor_pid) for job in jobs[1:]))


def test_a_supervisor_taken_for_a_job_not_sent_when_its_daemon_goes_leaves_its_idle_mark(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    # The daemon went (died, or stopped) after job 2's start could have been committed
    # and before its plan and GO went out: the supervisor never heard of job 2, and
    # says so, so that the next daemon queues it again (tsd.runner.recover) rather
    # than take it for a job whose supervisor vanished.
    first, mark, started = second_job_taken(tmp_path, spawner)
    start = launch.proc_start_time(first)
    spawner.close()  # no BYE for a taken supervisor: its link's end of file alone
    wait_until(lambda: not alive(first))
    assert exitreport.idle_marks(tmp_path / "exits") == {(first, start)}
    assert exitreport.read(tmp_path / "exits", 2) is None and not mark.exists()
    os.close(started.report_fd)


def test_supervisors_let_go_leave_no_idle_mark_and_one_whose_daemon_died_does(
    tmp_path: Path
) -> None:
    # A daemon in a child process: one supervisor let go (BYE) by a clean close, then,
    # in another child, one whose daemon dies (os._exit): only that one leaves a mark.
    def daemon_child(die: bool) -> int:
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            code = 1
            try:
                os.close(r)
                s = SpawnerLauncher()
                s.start()
                started = s.spawn(reusable(tmp_path, 1, "exit 0"))
                started.go()
                until_end(started)
                wait_until(lambda: s.pool.idle() == 1)
                os.write(w, str(started.supervisor_pid).encode())
                if not die:
                    s.close()
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        pid = int(os.read(r, 64) or b"0")
        os.close(r)
        assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0 and pid > 0
        return pid

    let_go = daemon_child(die=False)
    wait_until(lambda: not alive(let_go))
    assert exitreport.idle_marks(tmp_path / "exits") == set()
    orphan = daemon_child(die=True)
    wait_until(lambda: not alive(orphan))
    marks = exitreport.idle_marks(tmp_path / "exits")
    assert [pid for pid, _ in marks] == [orphan]
    exitreport.clear_idle_marks(tmp_path / "exits", marks)
    assert exitreport.idle_marks(tmp_path / "exits") == set()


def test_nothing_reaches_a_supervisor_before_its_go_and_the_go_alone_starts_the_job(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, mark, started = second_job_taken(tmp_path, spawner)
    time.sleep(0.1)
    assert alive(first) and not mark.exists()  # taken, idle: the plan waits for the go
    started.go()
    assert report_in(until_end(started)).exit.code == 0 and mark.exists()


def handed_on(
    tmp_path: Path, spawner: SpawnerLauncher
) -> tuple[launch.Launched, launch.Launched, Path]:
    """Job 1 run to its end, its report read and `ending` told as the runner does, its
    answer not given yet; job 2 (it touches the returned mark) then launched, not told
    GO: (job 1, job 2, mark)."""
    first = spawner.spawn(reusable(tmp_path, 1, "exit 1"))
    first.go()
    said = read_until(first, said_end)
    assert report_in(said).exit.code == 1 and first.ending is not None
    first.ending()
    mark = tmp_path / "ran"
    second = spawner.spawn(reusable(tmp_path, 2, f"touch {mark}; exit 2"))
    return first, second, mark


def test_a_supervisor_whose_end_came_takes_the_next_job_which_runs_after_the_ack_and_go(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, second, mark = handed_on(tmp_path, spawner)
    assert second.supervisor_pid == first.supervisor_pid  # no other supervisor woken
    assert spawner.pool.idle() == 0
    time.sleep(0.2)
    assert not mark.exists()  # the plan waits behind the answer, and then for its GO
    assert first.answer is not None and first.answer(launch.ACK)
    # The ACK goes with job 2's GO (both follow one commit), in one message: the
    # supervisor wakes once for both. Until then it still waits for it.
    assert select.select([first.report_fd], [], [], 0.2)[0] == []  # job 1's pipe: open
    assert not mark.exists()
    second.go()
    assert read_until(first, lambda _: False) == ""  # job 1's pipe: closed after the ACK
    os.close(first.report_fd)
    assert report_in(until_end(second)).exit.code == 2 and mark.exists()
    assert not any((tmp_path / "exits").iterdir())  # both ACKed: no report file at all
    wait_until(lambda: spawner.pool.idle() == 1)  # it said IDLE for each, and serves on


@pytest.mark.parametrize("word", [launch.ACK, launch.NAK])
def test_an_answer_and_an_abort_of_the_next_job_run_nothing_and_leave_a_file_only_unacked(
    tmp_path: Path, spawner: SpawnerLauncher, word: bytes
) -> None:
    # Job 2's start was not stored after all: its launch failed after it was taken
    # (ACK: job 1's end is stored), or the commit of both was rolled back (NAK). The
    # answer, kept to go with job 2's plan and GO, goes alone at its abort.
    first, second, mark = handed_on(tmp_path, spawner)
    assert first.answer is not None and first.answer(word)
    second.abort()
    os.close(second.report_fd)
    assert read_until(first, lambda _: False) == ""  # (the file first,) then the pipe closes
    os.close(first.report_fd)
    report = exitreport.read(tmp_path / "exits", 1)
    if word == launch.ACK:
        assert report is None  # ACKed: no report file
    else:
        assert report is not None and report.exit.code == 1
    wait_until(lambda: spawner.pool.idle() == 1)  # IDLE for job 1, nothing for job 2
    again = spawner.spawn(reusable(tmp_path, 3, "exit 3"))
    assert again.supervisor_pid == first.supervisor_pid
    again.go()
    assert report_in(until_end(again)).exit.code == 3 and not mark.exists()


def test_when_the_daemon_dies_with_the_next_job_taken_ahead_both_are_left_for_the_next(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    # Job 1's end unanswered and job 2 never sent: job 1's report goes to its file, and
    # the supervisor leaves its idle mark, for job 2 to be queued again (not lost);
    # nothing of job 2 runs.
    first, second, mark = handed_on(tmp_path, spawner)
    start = launch.proc_start_time(first.supervisor_pid)
    spawner.close()
    wait_until(lambda: not alive(first.supervisor_pid))
    done = exitreport.read(tmp_path / "exits", 1)
    assert done is not None and done.exit.code == 1
    assert exitreport.read(tmp_path / "exits", 2) is None and not mark.exists()
    assert exitreport.idle_marks(tmp_path / "exits") == {(first.supervisor_pid, start)}
    os.close(first.report_fd)
    os.close(second.report_fd)


def test_a_supervisor_is_handed_one_job_ahead_of_its_answer_at_most(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, second, _ = handed_on(tmp_path, spawner)
    second.go()
    third = spawner.spawn(reusable(tmp_path, 3, "exit 3"))
    assert third.supervisor_pid != first.supervisor_pid  # busy with job 2: another one
    third.go()
    assert report_in(until_end(third)).exit.code == 3
    assert first.answer is not None and first.answer(launch.ACK)
    assert report_in(until_end(second)).exit.code == 2
    os.close(first.report_fd)

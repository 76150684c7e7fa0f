"""The runner launches, watches and ends jobs through fakes of the launcher, scopes and pidfds."""

from __future__ import annotations

import asyncio
import errno
import functools
import operator
import os
import pwd
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from unit.daemon_fakes import (
    Events,
    FakeGpuSource,
    FakeLauncher,
    FakeProcs,
    FakeScopes,
    FakeStore,
    spec,
)

from tsd import exitreport, launch, runend
from tsd.config import Config
from tsd.errors import StorageFull, WrongState
from tsd.exitreport import ExitReport
from tsd.jobtable import JobTable
from tsd.model import ExitInfo, Job, JobState
from tsd.runner import Runner, RunnerSettings

ME = os.getuid()


class Rig:
    def __init__(self, tmp: Path, system: bool, scopes: FakeScopes | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.store = FakeStore()
        self.table = JobTable(self.store, Events(), lambda: 1000)
        self.launcher = FakeLauncher()
        self.procs = FakeProcs()
        self.scopes = scopes or FakeScopes()
        self.ended: list[Job] = []
        self.requeued = 0
        self.exits = tmp / "exits"
        self.exits.mkdir()
        self.runner = Runner(
            self.loop, None, RunnerSettings(system, self.exits), lambda: Config(),
            self.table, self.store, FakeGpuSource(), lambda: self.scopes,
            ended=self.ended.append, requeued=self.requeue_seen,
            launcher=self.launcher, procs=self.procs,
        )

    def requeue_seen(self) -> None:
        self.requeued += 1

    def queue(self, *command: str) -> Job:
        return self.table.add(ME, "me", spec(*command))

    def report(self, job_id: int, report: ExitReport) -> None:
        exitreport.write(str(self.exits), job_id, report)

    async def exit(self, job_id: int) -> None:
        """The job's supervisor is done (or gone): it closes its report pipe, and the
        runner, reading end of file there, settles the job."""
        os.close(self.launcher.report_w.pop(job_id))
        await until(lambda: job_id not in self.runner._reports)


async def until(check: Callable[[], object], timeout: float = 5.0) -> None:
    """Let the loop run until `check` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


def test_personal_start_records_the_supervisor_before_it_says_go(tmp_path: Path) -> None:
    async def body() -> None:
        rig = Rig(tmp_path, system=False)
        job = rig.queue("echo", "hi")
        rig.runner.start(job, ())
        row = rig.store.rows[job.id]
        assert row.state is JobState.RUNNING
        assert row.supervisor_pid == rig.launcher.pid_of(job.id) and row.unit is None
        assert rig.launcher.gone == [job.id]
        plan = rig.launcher.plans[job.id]
        assert plan.env["TS_JOBID"] == str(job.id) and plan.env["CUDA_VISIBLE_DEVICES"] == ""
        assert plan.command == ("echo", "hi")
        rig.launcher.close_all()

    run(body)


def test_the_report_pipe_gives_the_job_its_pid_and_output(tmp_path: Path) -> None:
    async def body() -> None:
        rig = Rig(tmp_path, system=False)
        job = rig.queue()
        rig.runner.start(job, ())
        rig.launcher.say(job.id, "pid 777\nout /tmp/ts-out.1.x\n")
        await until(lambda: rig.store.rows[job.id].output_path is not None)
        assert rig.store.rows[job.id].pid == 777
        rig.launcher.close_all()

    run(body)


def test_an_exit_report_finishes_the_job_and_is_then_discarded(tmp_path: Path) -> None:
    async def body() -> None:
        rig = Rig(tmp_path, system=False)
        job = rig.queue()
        rig.runner.start(job, ())
        rig.report(job.id, ExitReport(ExitInfo(code=4, cpu_seconds=0.5), end=9.0, output=None))
        await rig.exit(job.id)
        rig.launcher.close_all()
        done = rig.store.rows[job.id]
        assert done.state is JobState.FINISHED and done.exit == ExitInfo(code=4, cpu_seconds=0.5)
        assert done.end_time == 9.0
        assert [j.id for j in rig.ended] == [job.id]
        assert not os.path.exists(exitreport.path(rig.exits, job.id))

    run(body)


def test_a_report_sent_on_the_pipe_ends_the_job_before_the_pipe_closes(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        rig = Rig(tmp_path, system=False)
        job = rig.queue()
        rig.runner.start(job, ())
        report = ExitReport(ExitInfo(code=3, cpu_seconds=0.25), end=8.0, output="/tmp/o")
        rig.launcher.say(job.id, f"pid 9\nout /tmp/o\nend {exitreport.encode(report)}\n")
        await until(lambda: rig.store.rows[job.id].state is JobState.FINISHED)
        done = rig.store.rows[job.id]
        assert done.exit == ExitInfo(code=3, cpu_seconds=0.25) and done.end_time == 8.0
        assert [j.id for j in rig.ended] == [job.id]
        # The supervisor writes its copy of the report after sending it: that copy goes
        # only once the pipe closes, never while it may still be written.
        rig.report(job.id, report)
        await asyncio.sleep(0.05)
        assert os.path.exists(exitreport.path(rig.exits, job.id))
        os.close(rig.launcher.report_w.pop(job.id))
        await until(lambda: not os.path.exists(exitreport.path(rig.exits, job.id)))
        assert not rig.runner._tails and not rig.runner._early

    run(body)


def acking_start(tmp_path: Path) -> tuple[Rig, Job]:
    """A personal rig whose supervisors wait for the ACK of their reports, and a job
    started on it."""
    rig = Rig(tmp_path, system=False)
    rig.launcher.acks = True
    job = rig.queue()
    rig.runner.start(job, ())
    return rig, job


def test_a_report_on_the_pipe_is_acked_once_stored_and_no_file_is_looked_for(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        rig, job = acking_start(tmp_path)
        report = ExitReport(ExitInfo(code=3), end=8.0, output=None)
        rig.launcher.say(job.id, f"pid 9\nout -\nend {exitreport.encode(report)}\n")
        await until(lambda: rig.store.rows[job.id].state is JobState.FINISHED)
        # The ACK comes once the end is stored, and the runner stops reading the pipe:
        # the supervisor writes nothing more that matters.
        assert os.read(rig.launcher.ack_r[job.id], 8) == launch.ACK
        await until(lambda: not rig.runner._tails and not rig.runner._acks)
        assert not rig.runner._early and not rig.runner._reports
        rig.launcher.close_all()

    run(body)


def test_a_start_told_with_its_end_is_written_once_with_the_end(tmp_path: Path) -> None:
    async def body() -> None:
        rig, job = acking_start(tmp_path)
        writes = rig.store.writes
        report = ExitReport(ExitInfo(code=0), end=8.0, output="/tmp/ts-out.1.x")
        rig.launcher.say(
            job.id, f"pid 9\nout /tmp/ts-out.1.x\nend {exitreport.encode(report)}\n"
        )
        await until(lambda: rig.store.rows[job.id].state is JobState.FINISHED)
        row = rig.store.rows[job.id]
        assert (row.pid, row.output_path) == (9, "/tmp/ts-out.1.x")
        assert rig.store.writes == writes + 1  # the end's row carries the pid and output
        rig.launcher.close_all()

    run(body)


def test_a_report_that_is_not_one_gets_a_nak_and_the_file_is_read_at_the_end(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        rig, job = acking_start(tmp_path)
        rig.launcher.say(job.id, "end {not json\n")
        assert await asyncio.to_thread(os.read, rig.launcher.ack_r[job.id], 8) == launch.NAK
        assert rig.store.rows[job.id].state is JobState.RUNNING
        rig.report(job.id, ExitReport(ExitInfo(code=5), end=2.0))
        await rig.exit(job.id)
        assert rig.store.rows[job.id].exit == ExitInfo(code=5)
        rig.launcher.close_all()

    run(body)


def test_a_job_that_ends_without_a_report_on_the_pipe_gets_no_ack(tmp_path: Path) -> None:
    async def body() -> None:
        rig, job = acking_start(tmp_path)
        rig.report(job.id, ExitReport(ExitInfo(code=6), end=2.0))
        await rig.exit(job.id)
        assert rig.store.rows[job.id].exit == ExitInfo(code=6)
        # Nothing was sent to acknowledge: its ACK pipe is only closed (end of file).
        assert os.read(rig.launcher.ack_r[job.id], 8) == b""
        rig.launcher.close_all()

    run(body)


def test_a_kill_before_the_supervisor_tells_the_pid_waits_for_it(tmp_path: Path) -> None:
    """A reused supervisor drops the signals pending when it takes a job (they were for
    its last one): ts -k of a job it has not started yet is sent once its pid comes."""

    async def body() -> None:
        rig = Rig(tmp_path, system=False)
        stand_in = subprocess.Popen(
            [sys.executable, "-c", "import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *_: print('term', flush=True))\n"
             "print('ready', flush=True); time.sleep(30)"],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert stand_in.stdout is not None and stand_in.stdout.readline() == "ready\n"
            job = rig.queue()
            rig.launcher.real[job.id] = stand_in.pid
            rig.launcher.alive[stand_in.pid] = 1234
            rig.runner.start(job, ())
            await until(lambda: rig.launcher.gone == [job.id])  # stored: go was given
            rig.runner.kill(rig.table.running[job.id])
            ready, _, _ = select.select([stand_in.stdout], [], [], 0.3)
            assert not ready  # held
            rig.launcher.say(job.id, "pid 77\n")
            got = await asyncio.to_thread(stand_in.stdout.readline)
            assert got == "term\n"
        finally:
            stand_in.kill()
            stand_in.wait()
            rig.launcher.close_all()

    run(body)


def test_a_job_whose_supervisor_cannot_be_forked_goes_back_to_the_queue_and_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runend, "STORE_RETRY", 0.05)
    monkeypatch.setattr("tsd.runner.STORE_RETRY", 0.05)

    async def body() -> None:
        rig = Rig(tmp_path, system=False)
        job = rig.queue()
        r, w = os.pipe()
        rig.runner.hold_terminal(job, (r, w))  # a ts -n job: its terminal stays held
        rig.launcher.fail = OSError(errno.EMFILE, "Too many open files")
        rig.runner.start(job, ())
        assert rig.store.rows[job.id].state is JobState.QUEUED
        assert rig.table.pending == [job.id] and rig.runner.terminals_held(ME) == 1
        await until(lambda: rig.requeued == 1)  # the dispatcher is asked again, later
        rig.runner.start(rig.table.get(job.id), ())  # type: ignore[arg-type]
        assert rig.store.rows[job.id].state is JobState.RUNNING
        assert rig.launcher.plans[job.id].out_fds == (r, w)
        rig.launcher.close_all()

    run(body)


def test_a_report_line_cut_short_is_not_taken_and_the_file_is_read_at_the_end(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        rig = Rig(tmp_path, system=False)
        job = rig.queue()
        rig.runner.start(job, ())
        rig.launcher.say(job.id, 'end {"code": 1, "sig')
        await asyncio.sleep(0.05)
        assert rig.store.rows[job.id].state is JobState.RUNNING
        rig.report(job.id, ExitReport(ExitInfo(code=5), end=2.0))
        await rig.exit(job.id)
        assert rig.store.rows[job.id].exit == ExitInfo(code=5)
        assert not os.path.exists(exitreport.path(rig.exits, job.id))

    run(body)


def test_jobs_of_roots_own_personal_daemon_keep_its_identity_and_system_jobs_drop(
    tmp_path: Path,
) -> None:
    """Root's personal daemon runs root's jobs: nothing to drop, so they take the
    supervisor's spawn path like any user's; the system service always drops (as root)."""

    async def body() -> None:
        for system, sub in ((False, "personal"), (True, "system")):
            (tmp_path / sub).mkdir()
            rig = Rig(tmp_path / sub, system=system)
            job = rig.queue()
            rig.runner.start(job, ())
            await until(functools.partial(operator.contains, rig.launcher.plans, job.id))
            plan = rig.launcher.plans[job.id]
            assert plan.drop_privileges is (system and os.getuid() == 0)
            # Groups looked up by the daemon (tsd.userdb), none to set when nothing drops.
            me = pwd.getpwuid(job.uid)
            expected = tuple(os.getgrouplist(me.pw_name, me.pw_gid))
            assert plan.groups == (expected if plan.drop_privileges else None)
            rig.launcher.close_all()

    run(body)


def test_a_supervisor_gone_without_a_report_leaves_the_job_lost(tmp_path: Path) -> None:
    async def body() -> None:
        rig = Rig(tmp_path, system=False)
        job = rig.queue()
        rig.runner.start(job, ())
        await rig.exit(job.id)
        rig.launcher.close_all()
        ex = rig.store.rows[job.id].exit
        assert ex is not None and ex.lost and "vanished" in ex.note

    run(body)


def test_an_aborted_report_puts_the_job_back_in_the_queue(tmp_path: Path) -> None:
    async def body() -> None:
        rig = Rig(tmp_path, system=False)
        job = rig.queue()
        rig.runner.start(job, ())
        rig.report(job.id, ExitReport(ExitInfo(), aborted=True))
        await rig.exit(job.id)
        rig.launcher.close_all()
        assert rig.store.rows[job.id].state is JobState.QUEUED
        assert rig.table.pending == [job.id] and rig.requeued == 1 and rig.ended == []

    run(body)


def test_system_start_runs_the_scope_call_off_the_loop_then_says_go(tmp_path: Path) -> None:
    async def body() -> None:
        rig = Rig(tmp_path, system=True)
        job = rig.queue()
        rig.runner.start(job, ())
        # The launch is under way: the job holds its slot, and runs only once in its scope.
        assert job.id in rig.table.launching and rig.store.rows[job.id].state is JobState.QUEUED
        await until(lambda: rig.launcher.gone == [job.id])
        assert rig.store.rows[job.id].unit == f"tsd-job-{job.id}.scope"
        assert rig.store.rows[job.id].state is JobState.RUNNING
        assert rig.scopes.started[0][:3] == (job.id, ME, [rig.launcher.pid_of(job.id)])
        assert rig.scopes.start_threads != [threading.current_thread().name]
        rig.launcher.close_all()

    run(body)


def test_no_scope_no_job_the_supervisor_is_aborted_and_the_job_lost(tmp_path: Path) -> None:
    async def body() -> None:
        rig = Rig(tmp_path, system=True, scopes=FakeScopes(fail="systemd said no"))
        job = rig.queue()
        rig.runner.start(job, ())
        await until(lambda: rig.ended)
        ex = rig.store.rows[job.id].exit
        assert ex is not None and ex.lost
        assert ex.note == "could not start its scope: systemd said no"
        assert rig.launcher.aborted == [job.id] and rig.launcher.gone == []
        rig.launcher.close_all()

    run(body)


def test_kill_signals_the_scope_off_the_loop_and_refuses_a_job_not_running(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        rig = Rig(tmp_path, system=True)
        job = rig.queue()
        with pytest.raises(WrongState):
            rig.runner.kill(job)
        rig.runner.start(job, ())
        await until(lambda: rig.launcher.gone)
        rig.runner.kill(rig.table.running[job.id])
        await until(lambda: rig.scopes.killed)
        assert rig.scopes.killed == [(f"tsd-job-{job.id}.scope", 15)]
        rig.report(job.id, ExitReport(ExitInfo(signal=15), end=1.0))
        await rig.exit(job.id)
        rig.launcher.close_all()
        await until(lambda: rig.scopes.stopped)  # the scope goes with its job
        await rig.runner.drain()

    run(body)


def test_a_scope_left_empty_by_its_job_is_not_stopped_over_d_bus(tmp_path: Path) -> None:
    async def body() -> None:
        rig = Rig(tmp_path, system=True)
        rig.scopes.left_over = False  # the supervisor ended all; systemd unloads the scope
        job = rig.queue()
        rig.runner.start(job, ())
        await until(lambda: rig.launcher.gone)
        rig.report(job.id, ExitReport(ExitInfo(code=0), end=1.0))
        await rig.exit(job.id)
        await until(lambda: job.id not in rig.table.running)
        await rig.runner.drain()
        assert rig.scopes.stopped == []

    run(body)


def test_recover_readopts_live_supervisors_and_settles_the_rest(tmp_path: Path) -> None:
    async def body() -> None:
        rig = Rig(tmp_path, system=False)
        live, dead = rig.queue(), rig.queue()
        for job in (live, dead):
            rig.table.begin_run(job, (), ())
            rig.table.launched(job.id, rig.launcher.pid_of(job.id), 55, None)
        rig.launcher.alive[rig.launcher.pid_of(live.id)] = 55
        (rig.exits / "999.json").write_text("{}")  # a report nobody waits for
        again = JobTable(rig.store, Events(), lambda: 1000)
        rig.runner.table = again
        rig.runner.recover(again.load())
        assert rig.launcher.pid_of(live.id) in rig.procs.watched
        assert again.jobs[live.id].state is JobState.RUNNING
        ex = again.jobs[dead.id].exit
        assert ex is not None and ex.lost
        assert not (rig.exits / "999.json").exists()

    run(body)


def test_recover_queues_again_a_job_recorded_on_a_supervisor_idle_when_its_daemon_died(
    tmp_path: Path,
) -> None:
    # Its start committed, the daemon died before sending it: its supervisor, idle,
    # left its mark (tsd.exitreport.mark_idle), gone by the restart or, still exiting
    # then, re-adopted and gone after. Another job, on a supervisor gone without a
    # mark (or one from an earlier life of its pid), is lost as before; a mark that
    # names no running job's supervisor goes at once.
    async def body() -> None:
        rig = Rig(tmp_path, system=False)
        unsent, exiting, vanished = rig.queue(), rig.queue(), rig.queue()
        for job in (unsent, exiting, vanished):
            rig.table.begin_run(job, (), ())
            rig.table.launched(job.id, rig.launcher.pid_of(job.id), 55, None)
        exitreport.mark_idle(str(rig.exits), rig.launcher.pid_of(unsent.id), 55)
        exitreport.mark_idle(str(rig.exits), rig.launcher.pid_of(exiting.id), 55)
        rig.launcher.alive[rig.launcher.pid_of(exiting.id)] = 55
        exitreport.mark_idle(str(rig.exits), rig.launcher.pid_of(vanished.id), 56)
        exitreport.mark_idle(str(rig.exits), 999_999, None)
        again = JobTable(rig.store, Events(), lambda: 1000)
        rig.runner.table = again
        rig.runner.recover(again.load())
        assert again.jobs[unsent.id].state is JobState.QUEUED
        assert again.jobs[unsent.id].exit is None
        ex = again.jobs[vanished.id].exit
        assert ex is not None and ex.lost
        assert again.jobs[exiting.id].state is JobState.RUNNING  # re-adopted...
        rig.procs.exit(rig.launcher.pid_of(exiting.id))  # ...and gone, with no report
        await until(lambda: again.jobs[exiting.id].state is JobState.QUEUED)
        await until(lambda: not exitreport.idle_marks(rig.exits))  # each acted on, gone

    run(body)


def test_an_end_that_cannot_be_stored_keeps_its_report_and_is_recorded_once_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runend, "STORE_RETRY", 0.02)

    async def body() -> None:
        rig = Rig(tmp_path, system=False)
        job = rig.queue()
        rig.runner.start(job, ())
        real_save, disk_full = rig.store.save, [True]

        def save(*jobs: Job) -> None:
            if disk_full[0]:
                raise StorageFull("no space left on /var/lib/tsd", "/var/lib/tsd")
            real_save(*jobs)

        monkeypatch.setattr(rig.store, "save", save)
        rig.report(job.id, ExitReport(ExitInfo(code=3), end=9.0, output=None))
        await rig.exit(job.id)
        rig.launcher.close_all()
        await asyncio.sleep(0.1)
        assert job.id in rig.table.running and rig.ended == []
        assert os.path.exists(exitreport.path(rig.exits, job.id))  # kept until recorded
        disk_full[0] = False
        await until(lambda: rig.store.rows[job.id].state is JobState.FINISHED)
        assert rig.store.rows[job.id].exit == ExitInfo(code=3)
        assert [j.id for j in rig.ended] == [job.id]
        assert not os.path.exists(exitreport.path(rig.exits, job.id))

    run(body)


def test_the_log_says_how_a_job_ended_in_words_not_a_repr(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        rig = Rig(tmp_path, system=False)
        job = rig.queue()
        rig.runner.start(job, ())
        start = rig.store.rows[job.id].start_time
        assert start is not None
        rig.report(job.id, ExitReport(ExitInfo(code=0), end=start + 3.2, output=None))
        await rig.exit(job.id)
        rig.launcher.close_all()

    with caplog.at_level("INFO", logger="tsd"):
        run(body)
    assert "job 1 finished: exit 0 after 3.2s" in caplog.messages, caplog.messages


@pytest.mark.parametrize(
    ("info", "words"),
    [
        (ExitInfo(code=3), "exit 3"),
        (ExitInfo(signal=9), "killed by signal 9 (SIGKILL)"),
        (ExitInfo(signal=15, timed_out=True), "timed out"),
        (ExitInfo(lost=True, note="its supervisor vanished"), "lost: its supervisor vanished"),
    ],
)
def test_exit_summary_names_code_signal_timeout_or_loss(info: ExitInfo, words: str) -> None:
    assert info.summary() == words


def _pipe_closed_everywhere(read_end: int) -> bool:
    os.set_blocking(read_end, False)
    try:
        return os.read(read_end, 1) == b""
    except BlockingIOError:
        return False  # a write end is still open somewhere
    finally:
        os.close(read_end)


@pytest.mark.parametrize("system", [False, True])
def test_a_ts_n_terminal_goes_to_the_job_and_the_daemon_closes_its_copies(
    tmp_path: Path, system: bool
) -> None:
    async def body() -> None:
        rig = Rig(tmp_path, system=system)
        job = rig.queue()
        (r1, w1), (r2, w2) = os.pipe(), os.pipe()
        rig.runner.hold_terminal(job, (w1, w2))
        rig.runner.start(job, ())
        await until(lambda: job.id in rig.launcher.plans)
        await until(lambda: rig.store.rows[job.id].supervisor_pid is not None)
        assert rig.launcher.plans[job.id].out_fds == (w1, w2)
        assert _pipe_closed_everywhere(r1) and _pipe_closed_everywhere(r2)
        rig.launcher.close_all()

    run(body)


def test_a_removed_ts_n_job_no_longer_holds_its_terminal(tmp_path: Path) -> None:
    async def body() -> None:
        rig = Rig(tmp_path, system=False)
        job = rig.queue()
        r, w = os.pipe()
        w2 = os.dup(w)
        rig.runner.hold_terminal(job, (w, w2))
        assert rig.runner.terminals_held(ME) == 1
        rig.table.remove(rig.table.jobs[job.id])
        rig.runner.sweep_terminals()
        assert rig.runner.terminals_held(ME) == 0
        assert _pipe_closed_everywhere(r)

    run(body)


def test_a_stopping_daemon_hears_of_no_end_after_it_stops_watching_and_the_report_stays(
    tmp_path: Path,
) -> None:
    """At stop the store closes while the loop still turns a little: an end read then
    could not be stored. The supervisor finds nobody reading and keeps its report."""

    async def body() -> None:
        rig = Rig(tmp_path, system=False)
        job = rig.queue()
        rig.runner.start(job, ())
        rig.runner.kill(rig.table.running[job.id])  # its SIGKILL backstop is timed
        writes = rig.store.writes
        rig.runner.stop_watching()
        report = ExitReport(ExitInfo(code=3), end=8.0, output=None)
        with pytest.raises(BrokenPipeError):  # as the supervisor's write fails
            rig.launcher.say(job.id, f"pid 9\nout -\nend {exitreport.encode(report)}\n")
        rig.report(job.id, report)
        assert rig.launcher.pid_of(job.id) not in rig.procs.watched  # nor its exit
        await asyncio.sleep(0.15)
        assert rig.store.writes == writes and rig.ended == []
        assert [t.cancelled() for t in rig.runner._kill_timers.values()] == [True]
        assert rig.table.running[job.id].state is JobState.RUNNING
        assert os.path.exists(exitreport.path(rig.exits, job.id))  # for the next daemon
        rig.launcher.close_all()

    run(body)

"""Reused supervisors (tsd.spawner's pool): one job at a time each, every job's end intact."""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import time
from pathlib import Path

from unit.test_spawner import alive, gated, plan, ppid, wait_until

from tsd import exitreport, launch
from tsd.spawnlink import SpawnerLauncher


def reusable(tmp: Path, job_id: int, script: str) -> launch.LaunchPlan:
    return dataclasses.replace(plan(tmp, job_id, script), reuse=True)


def until_end(started: launch.Launched, timeout: float = 20.0) -> str:
    """What the supervisor said on the report pipe, read until its end of file (the job's end)."""
    said = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no end of file on the report pipe"
        ready, _, _ = select.select([started.report_fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(started.report_fd, 4096)
        if not chunk:
            os.close(started.report_fd)
            if started.pidfd is not None:
                os.close(started.pidfd)
            return said.decode()
        said += chunk


def run_to_end(spawner: SpawnerLauncher, p: launch.LaunchPlan) -> tuple[int, str]:
    started = spawner.spawn(p)
    started.go()
    return started.supervisor_pid, until_end(started)


def code_of(tmp: Path, job_id: int) -> int | None:
    report = exitreport.read(tmp / "exits", job_id)
    assert report is not None, f"no exit report for job {job_id}"
    return report.exit.code


def test_jobs_one_after_another_run_on_one_supervisor_each_with_its_own_exit_code(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, said = run_to_end(spawner, reusable(tmp_path, 1, "echo one; exit 7"))
    assert ppid(first) == spawner.spawner_pid
    # The end of file comes once the exit report is written: it is there to read.
    assert code_of(tmp_path, 1) == 7
    assert "pid " in said and "out " in said
    second, _ = run_to_end(spawner, reusable(tmp_path, 2, "echo two; exit 8"))
    assert second == first and alive(first)  # it stayed, and took the next job
    assert code_of(tmp_path, 2) == 8
    report = exitreport.read(tmp_path / "exits", 2)
    assert report is not None and report.output is not None
    assert Path(report.output).read_text() == "two\n"


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
    until_end(a)
    until_end(b)
    assert (code_of(tmp_path, 1), code_of(tmp_path, 2)) == (1, 2)


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
    until_end(started)
    report = exitreport.read(tmp_path / "exits", 2)
    assert report is not None and report.exit.code == 5 and report.exit.signal is None


def test_a_kill_of_the_current_job_still_ends_it(tmp_path: Path, spawner: SpawnerLauncher) -> None:
    first, _ = run_to_end(spawner, reusable(tmp_path, 1, "exit 0"))
    started = spawner.spawn(reusable(tmp_path, 2, "sleep 300"))
    assert started.supervisor_pid == first
    started.go()
    time.sleep(0.2)
    os.kill(first, signal.SIGTERM)  # what ts -k does on the personal daemon
    until_end(started)
    report = exitreport.read(tmp_path / "exits", 2)
    assert report is not None and report.exit.signal == signal.SIGTERM
    assert alive(first)  # and the supervisor serves on


def test_what_a_job_left_running_is_ended_before_its_supervisor_takes_another(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    pid_file = tmp_path / "left.pid"
    script = f"setsid sleep 300 & echo $! > {pid_file}; sleep 300 & echo $! >> {pid_file}; exit 3"
    first, _ = run_to_end(spawner, reusable(tmp_path, 1, script))
    left = [int(p) for p in pid_file.read_text().split()]
    assert len(left) == 2 and not any(alive(p) for p in left)
    assert code_of(tmp_path, 1) == 3
    second, _ = run_to_end(spawner, reusable(tmp_path, 2, "exit 4"))
    assert second == first and code_of(tmp_path, 2) == 4


def test_a_pooled_supervisor_that_died_is_replaced_by_a_new_one(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, _ = run_to_end(spawner, reusable(tmp_path, 1, "exit 0"))
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not alive(first))
    time.sleep(0.1)  # the spawner hears its link close
    second, _ = run_to_end(spawner, reusable(tmp_path, 2, "exit 6"))
    assert second != first and code_of(tmp_path, 2) == 6


def test_a_supervisor_that_dies_with_its_job_gives_the_daemon_an_end_of_file_at_once(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    started = spawner.spawn(reusable(tmp_path, 1, "sleep 300"))
    started.go()
    time.sleep(0.2)
    os.kill(started.supervisor_pid, signal.SIGKILL)
    until_end(started, timeout=5)  # the end, with no report: the daemon records it as lost
    assert exitreport.read(tmp_path / "exits", 1) is None


def test_plans_without_reuse_get_a_supervisor_of_their_own_that_exits(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    first, _ = run_to_end(spawner, reusable(tmp_path, 1, "exit 0"))
    started = spawner.spawn(plan(tmp_path, 2, "exit 2"))  # a system job: its scope goes with it
    assert started.supervisor_pid != first
    pidfd = os.pidfd_open(started.supervisor_pid)
    started.go()
    until_end(started)
    launch.wait_pidfd(pidfd)  # it exits
    assert code_of(tmp_path, 2) == 2


def test_closing_the_spawner_lets_idle_supervisors_go_and_running_jobs_finish(
    tmp_path: Path,
) -> None:
    spawner = SpawnerLauncher()
    spawner.start()
    gate = tmp_path / "gate"
    busy = spawner.spawn(reusable(tmp_path, 2, gated(gate, 9)))
    busy.go()
    idle, _ = run_to_end(spawner, reusable(tmp_path, 1, "exit 0"))
    assert idle != busy.supervisor_pid
    spawner.close()  # the daemon stops: its report pipes go with it
    os.close(busy.report_fd)
    wait_until(lambda: not alive(idle))
    assert alive(busy.supervisor_pid)
    gate.touch()
    wait_until(lambda: not alive(busy.supervisor_pid))  # it leaves once its job is over
    assert code_of(tmp_path, 2) == 9  # and its report is there for the next daemon


def _report_durability(tmp: Path, daemon_reads: bool) -> bool:
    """Whether a supervisor asked for a durable exit report, its daemon reading the report
    pipe or gone (run in a forked child: a supervisor blocks signals and is a subreaper)."""
    go_r, go_w = os.pipe()
    rep_r, rep_w = os.pipe()
    out_r, out_w = os.pipe()
    p = reusable(tmp, 1, "exit 0")
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (out_r, rep_r, go_w):
                os.close(fd)
            asked: list[bool] = []
            real = exitreport.write
            exitreport.write = lambda d, j, r, durable=True: (  # type: ignore[assignment]
                asked.append(durable), real(d, j, r, durable))[-1]
            launch.become_supervisor()
            launch.supervise(p, go_r, rep_w)
            os.write(out_w, b"1" if asked == [True] else b"0")
        finally:
            os._exit(0)
    os.close(out_w)
    os.close(go_r)
    os.close(rep_w)
    if not daemon_reads:
        os.close(rep_r)
    os.write(go_w, launch.GO)
    os.close(go_w)
    answer = os.read(out_r, 1)
    os.waitpid(pid, 0)
    if daemon_reads:
        os.close(rep_r)
    os.close(out_r)
    assert code_of(tmp, 1) == 0
    return answer == b"1"


def test_the_exit_report_is_synced_only_when_no_daemon_reads_the_report_pipe(
    tmp_path: Path,
) -> None:
    # A daemon reading the pipe records the end in its own synced commit at once; with
    # none there (restarting, crashed), the report alone must survive a crash.
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    assert _report_durability(tmp_path / "a", daemon_reads=False)
    assert not _report_durability(tmp_path / "b", daemon_reads=True)


def test_a_reused_supervisor_sends_its_report_on_the_pipe_and_leaves_the_same_in_the_file(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    _, said = run_to_end(spawner, reusable(tmp_path, 1, "echo out; exit 6"))
    end = launch.parse_report(said)["end"]
    sent = exitreport.decode(end)
    assert sent is not None and sent.exit.code == 6 and sent.output is not None
    assert sent == exitreport.read(tmp_path / "exits", 1)


def test_with_an_on_finish_command_the_report_waits_for_it_in_the_file(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    """TS_ONFINISH (and mail) run after the job and may change its report: the daemon
    reads the file then, at the pipe's end of file, not a report sent before."""
    hook = tmp_path / "hook"
    hook.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/hooked\n")
    hook.chmod(0o755)
    p = dataclasses.replace(reusable(tmp_path, 1, "exit 2"), on_finish=str(hook))
    _, said = run_to_end(spawner, p)
    assert launch.parse_report(said)["end"] == "-"
    assert (tmp_path / "hooked").read_text().startswith("1 2 ")
    assert code_of(tmp_path, 1) == 2

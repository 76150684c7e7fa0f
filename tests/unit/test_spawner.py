"""The spawner (tsd.spawner, tsd.spawnlink) forks real supervisors; losing it loses no job."""

from __future__ import annotations

import dataclasses
import marshal
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tsd import exitreport, launch, spawner
from tsd.spawnlink import SpawnerLauncher


def gated(gate: Path, code: int) -> str:
    return f"while [ ! -e {gate} ]; do sleep 0.01; done; exit {code}"


def plan(tmp: Path, job_id: int, script: str) -> launch.LaunchPlan:
    exits = tmp / "exits"
    exits.mkdir(exist_ok=True)
    return launch.LaunchPlan(
        job_id=job_id, uid=os.getuid(), gid=os.getgid(), user="me",
        command=("sh", "-c", script), cwd=str(tmp), env={"PATH": os.environ["PATH"]},
        umask=0o022, log_dir=str(tmp), exits_dir=str(exits), drop_privileges=False,
    )


def ppid(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rfind(b")") + 2 :].split()[1])


def alive(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 :].split()[0] != b"Z"


def wait_until(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def finish(started: launch.Launched) -> None:
    """Wait for the supervisor's exit (after go) through the pidfd it came with."""
    assert started.pidfd is not None
    launch.wait_pidfd(started.pidfd)
    os.close(started.report_fd)


def test_a_plan_crosses_to_its_supervisor_whole_and_a_body_not_a_plan_is_refused() -> None:
    """Every field of a plan, each away from its default, comes out of the body as it
    went in (a field added to the plan travels without more ado); the output fds are
    the ones received beside the body, never the sender's."""
    full = launch.LaunchPlan(
        job_id=7, uid=1000, gid=1001, user="alice", command=("a", "b c"), cwd="/w",
        env={"A": "1", "PATH": "/bin"}, umask=0o077, log_dir="/l", exits_dir="/e",
        store_output=False, output_name="o", gzip=True, stderr_apart=True, timeout=2.5,
        grace=3.0, on_finish="/f", mail_to="m@x", drop_privileges=False, groups=(5, 6),
        nofile_soft=512, out_fds=(8, 9), reuse=True, ack_on_go=True, ahead_until=12.5,
    )
    defaults = launch.LaunchPlan(**{
        f.name: getattr(full, f.name) for f in dataclasses.fields(full)
        if f.default is dataclasses.MISSING
    })
    assert all(
        getattr(full, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(full)
        if f.default is not dataclasses.MISSING
    )
    body = spawner.encode(full)[spawner.HEADER.size :]
    assert spawner.decode(body, (3, 4)) == dataclasses.replace(full, out_fds=(3, 4))
    assert spawner.decode(body, None) == dataclasses.replace(full, out_fds=None)
    for bad in (marshal.dumps((1, 2)), marshal.dumps({"job_id": 7}), marshal.dumps("member")):
        with pytest.raises(ValueError, match="not a launch plan"):
            spawner.decode(bad, None)
    # A reused supervisor's request names its exits dir; nothing else is one.
    asked = spawner.member_request("/state/exits")[spawner.HEADER.size :]
    assert spawner._member_exits(asked) == "/state/exits"
    for bad in (marshal.dumps("member"), marshal.dumps(("member", 5)), b"\xff", body,
                marshal.dumps(("member", "/e", "more"))):  # fmt: skip
        assert spawner._member_exits(bad) is None


def test_a_link_reads_each_plan_whole_with_its_own_fds_however_the_bytes_arrive(
    tmp_path: Path,
) -> None:
    """A reused supervisor's link (spawner._Link) reads what is there at once: plans
    and words from several sends in one read, one plan over several reads, and each
    plan gets the fds sent with it, never another's."""
    ours, theirs = socket.socketpair()
    link = spawner._Link(os.dup(theirs.fileno()))
    theirs.close()
    one = plan(tmp_path, 1, "exit 1")
    two = plan(tmp_path, 2, "exit 2")
    body_one, body_two = (spawner.NEXT + spawner.encode(p) for p in (one, two))
    pipes = [os.pipe() for _ in range(3)]
    try:
        spawner.send_with_fds(ours, body_one, [pipes[0][1]])
        spawner.send_with_fds(ours, body_two + launch.ACK + launch.GO,
                              [pipes[1][1], pipes[2][1]])  # fmt: skip
        assert link.answer() == launch.ACK and link.acked  # both plans kept, in order
        got = [link.next() for _ in range(3)]
        assert [kind for kind, _, _ in got] == [spawner.NEXT, spawner.NEXT, launch.GO]
        assert spawner.decode(got[0][1], None).job_id == 1
        assert spawner.decode(got[1][1], None).job_id == 2
        assert [len(fds) for _, _, fds in got] == [1, 2, 0]
        for (_, _, fds), sent in zip(got, ([pipes[0]], pipes[1:]), strict=False):
            for fd, (r, _) in zip(fds, sent, strict=True):
                os.write(fd, b"x")  # each received fd is the write end sent with it
                assert os.read(r, 1) == b"x"
                os.close(fd)
        link.idle()  # after an ACK it says nothing: the ACK is the daemon's word for it
        ours.setblocking(False)
        with pytest.raises(BlockingIOError):
            ours.recv(1)
        # A plan in pieces, its fds with the first: read whole.
        spawner.send_with_fds(ours, body_one[:3], [pipes[0][1]])
        time.sleep(0.05)
        ours.sendall(body_one[3:] + launch.NAK)
        kind, body, fds = link.next()
        assert kind == spawner.NEXT and spawner.decode(body, None).job_id == 1 and len(fds) == 1
        os.close(fds[0])
        assert link.answer() == launch.NAK and not link.acked
        link.idle()  # after a NAK it says IDLE
        ours.setblocking(True)
        assert ours.recv(1) == spawner.IDLE
        ours.close()
        assert link.next()[0] == b""  # the daemon is gone
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        link.sock.close()


def test_the_spawner_forks_a_supervisor_that_records_the_real_exit_code(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    started = spawner.spawn(plan(tmp_path, 1, "echo hi; exit 7"))
    assert ppid(started.supervisor_pid) == spawner.spawner_pid  # not forked from us
    assert started.supervisor_start == launch.proc_start_time(started.supervisor_pid)
    started.go()
    finish(started)
    report = exitreport.read(tmp_path / "exits", 1)
    assert report is not None and report.exit.code == 7
    assert report.output is not None and Path(report.output).read_text() == "hi\n"


def test_an_aborted_start_runs_nothing_and_wait_returns_once_it_is_reported(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    started = spawner.spawn(plan(tmp_path, 2, f"touch {tmp_path}/ran"))
    started.abort()
    started.wait()
    report = exitreport.read(tmp_path / "exits", 2)
    assert report is not None and report.aborted
    assert not (tmp_path / "ran").exists()
    os.close(started.report_fd)


def test_a_killed_spawner_loses_no_running_job_and_the_next_job_gets_a_new_one(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    gate = tmp_path / "gate"
    started = spawner.spawn(plan(tmp_path, 3, gated(gate, 3)))
    started.go()
    first = spawner.spawner_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not alive(first))
    assert alive(started.supervisor_pid)  # the job runs on, its supervisor orphaned
    gate.touch()
    finish(started)
    report = exitreport.read(tmp_path / "exits", 3)
    assert report is not None and report.exit.code == 3

    again = spawner.spawn(plan(tmp_path, 4, "exit 4"))
    assert spawner.spawner_pid not in (None, first)
    assert ppid(again.supervisor_pid) == spawner.spawner_pid
    again.go()
    finish(again)
    report = exitreport.read(tmp_path / "exits", 4)
    assert report is not None and report.exit.code == 4


def test_a_hung_spawner_is_replaced_and_its_request_served_by_the_next(tmp_path: Path) -> None:
    spawner = SpawnerLauncher(reply_timeout=0.5)
    try:
        spawner.start()
        hung = spawner.spawner_pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        started = spawner.spawn(plan(tmp_path, 5, "exit 5"))
        assert not alive(hung)  # killed (by its pid) and reaped
        assert ppid(started.supervisor_pid) == spawner.spawner_pid != hung
        started.go()
        finish(started)
        report = exitreport.read(tmp_path / "exits", 5)
        assert report is not None and report.exit.code == 5
    finally:
        spawner.close()


def test_without_a_spawner_the_supervisor_is_forked_directly(tmp_path: Path) -> None:
    spawner = SpawnerLauncher(python=str(tmp_path / "no-python"))
    try:
        started = spawner.spawn(plan(tmp_path, 6, "exit 6"))
        assert spawner.spawner_pid is None
        assert ppid(started.supervisor_pid) == os.getpid()
        started.go()
        os.waitpid(started.supervisor_pid, 0)
        os.close(started.report_fd)
        report = exitreport.read(tmp_path / "exits", 6)
        assert report is not None and report.exit.code == 6
    finally:
        spawner.close()


def test_closing_ends_the_spawner_but_not_the_jobs(tmp_path: Path) -> None:
    spawner = SpawnerLauncher()
    gate = tmp_path / "gate"
    started = spawner.spawn(plan(tmp_path, 7, gated(gate, 9)))
    started.go()
    pid = spawner.spawner_pid
    assert pid is not None
    spawner.close()
    assert not alive(pid)
    assert alive(started.supervisor_pid)
    gate.touch()
    finish(started)
    report = exitreport.read(tmp_path / "exits", 7)
    assert report is not None and report.exit.code == 9


def test_a_supervisor_told_to_quit_runs_nothing_and_leaves_no_report(tmp_path: Path) -> None:
    # What a daemon does with a request its spawner may have forked without answering.
    go_r, go_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        launch.run_supervisor(plan(tmp_path, 8, f"touch {tmp_path}/ran"), go_r, rep_w, True)
    os.close(go_r)
    os.close(rep_w)
    os.write(go_w, launch.QUIT)
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    os.close(rep_r)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert exitreport.read(tmp_path / "exits", 8) is None
    assert not (tmp_path / "ran").exists()


def test_what_a_job_leaves_running_is_ended_when_it_exits(
    tmp_path: Path, spawner: SpawnerLauncher
) -> None:
    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; setsid sleep 300 & echo $! >> {pid_file}; exit 2"
    started = spawner.spawn(plan(tmp_path, 9, script))
    started.go()
    finish(started)
    report = exitreport.read(tmp_path / "exits", 9)
    assert report is not None and report.exit.code == 2
    left = [int(p) for p in pid_file.read_text().split()]
    assert len(left) == 2
    assert not any(alive(p) for p in left)

"""When a supervisor tells its daemon that the job started (its pid and output): at once
for a job that runs on, together with the end for a job that ends within TELL_AFTER,
so that a short job wakes the daemon once, not twice."""

from __future__ import annotations

import dataclasses
import os
import select
from pathlib import Path

import pytest
from unit.test_spawner import gated, plan

from tsd import exitreport, launch


def said(fd: int, within: float) -> bytes:
    """What the report pipe holds within `within` seconds (b"" when nothing came)."""
    ready, _, _ = select.select([fd], [], [], within)
    return os.read(fd, 65536) if ready else b""


def rest(fd: int) -> bytes:
    """The report pipe read on to its end of file."""
    out = b""
    while True:
        select.select([fd], [], [], 20)
        chunk = os.read(fd, 65536)
        if not chunk:
            return out
        out += chunk


def test_a_job_that_ends_within_the_hold_is_told_in_one_message_start_and_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "TELL_AFTER", 30.0)  # the forked supervisor inherits it
    started = launch.spawn(plan(tmp_path, 1, "sleep 0.3; exit 4"))
    started.go()
    assert said(started.report_fd, 0.15) == b""  # running, not told yet
    message = rest(started.report_fd)
    os.waitpid(started.supervisor_pid, 0)
    os.close(started.report_fd)
    fields = launch.parse_report(message.decode())
    assert fields["pid"].isdigit() and fields["out"].startswith(str(tmp_path))
    assert "end" in fields
    assert message.index(b"pid ") < message.index(b"end ")


def test_a_job_that_runs_on_past_the_hold_has_its_pid_told_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "TELL_AFTER", 0.05)
    gate = tmp_path / "gate"
    started = launch.spawn(plan(tmp_path, 2, gated(gate, 5)))
    started.go()
    first = said(started.report_fd, 20)
    fields = launch.parse_report(first.decode())
    assert fields["pid"].isdigit() and "end" not in fields  # the job still runs
    gate.touch()
    then = launch.parse_report(rest(started.report_fd).decode())
    os.waitpid(started.supervisor_pid, 0)
    os.close(started.report_fd)
    assert "end" in then and "pid" not in then  # the pid was told once


@pytest.mark.parametrize("answer", [launch.ACK, launch.NAK, None])
def test_a_supervisor_forked_for_one_job_waits_on_its_go_pipe_for_the_reports_ack(
    tmp_path: Path, answer: bytes | None
) -> None:
    """The system service's supervisors (ack_on_go): the end comes on the pipe whole, and
    the supervisor, still alive, waits for the answer. ACK: stored, no file is written;
    NAK or the go pipe closed (the daemon gave up, or died): the file, durably."""
    job = dataclasses.replace(plan(tmp_path, 3, "exit 5"), ack_on_go=True)
    started = launch.spawn(job)
    assert started.answer is not None
    started.go()
    message = said(started.report_fd, 20)
    while b"end " not in message:
        message += said(started.report_fd, 20)
    report = exitreport.decode(launch.parse_report(message.decode())["end"])
    assert report is not None and report.exit.code == 5
    assert os.waitpid(started.supervisor_pid, os.WNOHANG) == (0, 0)  # waits for the answer
    assert started.answer(answer)
    assert rest(started.report_fd) == b""
    os.waitpid(started.supervisor_pid, 0)
    os.close(started.report_fd)
    on_file = exitreport.read(tmp_path / "exits", 3)
    if answer == launch.ACK:
        assert on_file is None
    else:
        assert on_file is not None and on_file.exit.code == 5

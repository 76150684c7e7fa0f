"""What other users see of a job, queue order between users, escaping, stored bytes."""

from __future__ import annotations

from dataclasses import replace

import pytest
from unit.daemon_fakes import Events, FakeStore, spec

from tsd import auth, handlers, protocol, render
from tsd.errors import BadRequest, WrongState
from tsd.jobtable import JobTable
from tsd.model import ExitInfo, Job, JobState, Peer


def peer(uid: int, admin: bool = False) -> Peer:
    return Peer(pid=1, uid=uid, gid=uid, user=f"u{uid}", admin=admin)


def finished_job() -> Job:
    s = replace(
        spec(), cwd="/home/alice/secret", env=(("K", "v"),), env_info="secret info",
        label="lbl", output_name="out.txt", timeout=5.0,
    )
    return Job(
        id=7, uid=1000, user="alice", spec=s, state=JobState.FINISHED, order=3,
        enqueue_time=1.0, start_time=2.0, end_time=3.0, pid=42, supervisor_pid=41,
        exit=ExitInfo(code=0, cpu_seconds=1.5, note="/home/alice/secret/out"),
        output_path="/home/alice/secret/out.txt", unit="tsd-job-7.scope",
    )


def test_owner_and_admins_see_a_job_whole() -> None:
    job = finished_job()
    assert auth.visible_to(peer(1000), job) is job
    assert auth.visible_to(peer(2000, admin=True), job) is job


def test_another_user_sees_only_the_listing_fields() -> None:
    seen = auth.visible_to(peer(2000), finished_job())
    assert seen.redacted
    assert (seen.id, seen.user, seen.state, seen.unit) == (7, "alice", JobState.FINISHED,
                                                           "tsd-job-7.scope")
    assert seen.spec.command == finished_job().spec.command and seen.spec.label == "lbl"
    assert seen.spec.env == () and seen.spec.env_info is None and seen.spec.output_name is None
    assert seen.output_path is None and seen.pid is None and seen.supervisor_pid is None
    assert seen.exit == ExitInfo(code=0)
    assert "secret" not in str(protocol.job_to_wire(seen))


def test_a_redacted_record_reads_back_redacted_and_renders_without_path_or_cwd() -> None:
    seen = protocol.job_from_wire(protocol.job_to_wire(auth.visible_to(peer(2), finished_job())))
    assert seen.redacted
    assert render.job_dict(seen)["Cwd"] is None
    assert render.output_shown(seen) == "(hidden)"


def test_printable_escapes_control_characters() -> None:
    assert render.printable("a\nb\x1b[1m\x01\x7f\x85\tc") == "a\\nb\\e[1m\\x01\\x7f\\x85\\tc"
    assert render.printable("one\ntwo\r", keep_newlines=True) == "one\ntwo\\r"
    assert render.printable("plain é ü") == "plain é ü"


def test_urgent_moves_a_job_only_among_its_owners_places() -> None:
    table = JobTable(FakeStore(), Events(), lambda: 1000)
    a1, a2 = (table.add(1, "a", spec()) for _ in range(2))
    b1, b2 = (table.add(2, "b", spec()) for _ in range(2))
    a3 = table.add(1, "a", spec())
    table.move_front(table.jobs[b2.id])
    assert table.pending == [a1.id, a2.id, b2.id, b1.id, a3.id]
    table.move_front(table.jobs[a3.id])
    assert table.pending == [a3.id, a1.id, b2.id, b1.id, a2.id]


def test_swap_refuses_two_users_jobs() -> None:
    table = JobTable(FakeStore(), Events(), lambda: 1000)
    a, b = table.add(1, "a", spec()), table.add(2, "b", spec())
    with pytest.raises(WrongState, match="different users"):
        table.swap(a, b)
    assert table.pending == [a.id, b.id]


def test_stored_bytes_are_counted_per_user_and_given_back_when_forgotten() -> None:
    table = JobTable(FakeStore(), Events(), lambda: 1000)
    s = replace(spec(), command=("echo", "é"), label="xy")
    job = table.add(1, "a", s)
    assert table.stored.of(1) == s.stored_bytes > len("echo") + 2 + 2
    table.remove(job)
    assert table.stored.of(1) == 0


def test_a_record_too_big_for_one_frame_is_refused_at_submit() -> None:
    wire = protocol.spec_to_wire(replace(spec(), command=("true", "\x01" * 120000),
                                         env_info="\x01" * 60000))
    with pytest.raises(BadRequest, match="limit of one record"):
        protocol.parse_spec(wire)


def test_every_answer_and_event_holding_jobs_is_redacted_for_another_user() -> None:
    job, other = finished_job(), peer(2000)
    answers: list[protocol.Response | protocol.Event] = [
        protocol.JobRecord(job),
        protocol.JobList((job, job), 4, 0),
        protocol.GpuReport((), {}, (job,), ""),
        protocol.JobsChunk((job,)),
        protocol.Started(job),
    ]
    for answer in answers:
        wire = str(handlers._visible(other, answer).to_wire())
        assert "secret" not in wire and "alice" in wire, answer
        assert handlers._visible(peer(1000), answer) == answer

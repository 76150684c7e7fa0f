"""Job controls on the system service with real users: who may hold and release a job,
and how --priority and --array behave between users."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from box import Box
from deploy import deploy, jobs, ts, wait_for


@pytest.fixture(scope="module")
def sbox(box: Box) -> Iterator[Box]:
    deploy(box)
    yield box


def job_id(proc: object) -> int:
    return int(proc.stdout.strip())  # type: ignore[attr-defined]


def test_only_the_owner_or_an_admin_holds_and_releases_a_job(sbox: Box) -> None:
    held = job_id(ts(sbox, "alice", "--hold", "true"))
    assert jobs(sbox)[held]["State"] == "held"
    for action in ("--release", "--hold"):
        r = ts(sbox, "bob", action, str(held), check=False)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.strip() == f"ts: job {held} belongs to alice"
    assert jobs(sbox)[held]["State"] == "held"  # unchanged
    # bob sees why it waits (ts -A), not more.
    listing = ts(sbox, "bob", "-A", "-l").stdout
    assert f"(held: ts --release {held} queues it)" in listing
    ts(sbox, "dave", "--release", str(held))  # an admin may
    wait_for(lambda: jobs(sbox)[held]["State"] == "finished")
    assert jobs(sbox)[held]["E-Level"] == 0

    flag = "/tmp/controls-go"
    sbox.run(["rm", "-f", flag])
    blockers = [
        job_id(ts(sbox, "alice", "sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; done"))
        for _ in range(4)
    ]
    wait_for(lambda: all(jobs(sbox)[b]["State"] == "running" for b in blockers))
    queued = job_id(ts(sbox, "alice", "true"))
    assert ts(sbox, "bob", "--hold", str(queued), check=False).returncode == 1
    ts(sbox, "dave", "--hold", str(queued))  # an admin may hold anyone's job
    assert jobs(sbox)[queued]["State"] == "held"
    ts(sbox, "alice", "--release", str(queued))  # and its owner release it
    sbox.run(["touch", flag])
    for job in [*blockers, queued]:
        ts(sbox, "root", "-w", str(job), check=False)
    assert jobs(sbox)[queued]["E-Level"] == 0


def test_priority_never_passes_another_users_job(sbox: Box) -> None:
    flag = "/tmp/prio-go"
    sbox.run(["rm", "-f", flag])
    wait_cmd = f"while [ ! -e {flag} ]; do sleep 0.05; done"
    blockers = [job_id(ts(sbox, "alice", "sh", "-c", wait_cmd)) for _ in range(4)]
    wait_for(lambda: all(jobs(sbox)[b]["State"] == "running" for b in blockers))
    alice_low = job_id(ts(sbox, "alice", "true"))
    bob_job = job_id(ts(sbox, "bob", "true"))
    alice_high = job_id(ts(sbox, "alice", "--priority", "100", "true"))
    order = [j for j, rec in jobs(sbox).items() if rec["State"] == "queued"]
    # alice's urgent job takes the place alice held, before bob's; bob keeps his.
    assert order == [alice_high, bob_job, alice_low]
    sbox.run(["touch", flag])
    for job in [*blockers, alice_low, bob_job, alice_high]:
        ts(sbox, "root", "-w", str(job), check=False)


def test_array_elements_run_as_their_owner_with_their_index(sbox: Box) -> None:
    out = ts(sbox, "alice", "--array", "0-2", "sh", "-c",
             "echo $(id -un) $TS_ARRAY_TASK_ID $TS_ARRAY_JOB_ID").stdout  # fmt: skip
    ids = [int(x) for x in out.split()]
    for job in ids:
        ts(sbox, "alice", "-w", str(job))
    lines = [ts(sbox, "alice", "-c", str(j)).stdout.strip() for j in ids]
    assert lines == [f"alice {i} {ids[0]}" for i in range(3)]


def test_a_job_over_the_users_slot_quota_is_refused_whatever_its_controls(sbox: Box) -> None:
    before = set(jobs(sbox))
    for controls in ((), ("--hold",), ("--array", "1-3"), ("--begin", "+1h")):
        r = ts(sbox, "bob", *controls, "-N", "2", "true", check=False)  # bob: 1 slot
        assert r.returncode == 1 and r.stdout == "", controls
        assert r.stderr == "ts: job needs 2 slots but your quota (max_running_slots) is 1\n"
        r = ts(sbox, "alice", *controls, "-N", "5", "true", check=False)  # the server: 4
        assert r.stderr == "ts: job needs 5 slots but the server has 4\n"
    assert set(jobs(sbox)) == before  # nothing queued

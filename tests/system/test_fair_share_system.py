"""Fair share, reservations and accounting on the system service, with real users.

One box for the module (booting is the slow part); the tests run in order and
each leaves the server idle for the next.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from box import Box
from deploy import deploy, jobs, ts, wait_for

CONFIG = """\
slots: 2
admins: [root, dave]
defaults:
  max_queued: 5000
users:
  erin: {max_running_slots: 1}
scheduler:
  fair_share: {half_life: 7d, gpu_weight: 4}
accounting: {keep_days: 30}
kill_grace_seconds: 3
"""

GATE = "while [ ! -e {flag} ]; do sleep 0.05; done"


@pytest.fixture(scope="module")
def fbox(box: Box) -> Iterator[Box]:
    deploy(box, CONFIG)
    box.add_user("erin", ["tsd"])
    yield box


def queue(box: Box, user: str, *args: str) -> int:
    return int(ts(box, user, *args).stdout.strip())


def gate(box: Box, name: str) -> tuple[str, str]:
    flag = f"/tmp/{name}"
    box.run(["rm", "-f", flag])
    return flag, GATE.format(flag=flag)


def finish(box: Box, *ids: int) -> None:
    for i in ids:
        ts(box, "root", "-w", str(i), check=False, timeout=120)


def stats(box: Box, user: str, *args: str) -> list[dict[str, Any]]:
    out = json.loads(ts(box, user, "--stats", "-M", "json", *args).stdout)
    assert isinstance(out, list)
    return out


def test_past_usage_decides_which_user_starts_first(fbox: Box) -> None:
    # alice has used the server; bob never has.
    used = queue(fbox, "alice", "sleep", "2")
    finish(fbox, used)
    ts(fbox, "root", "-S", "1")
    try:
        flag, wait = gate(fbox, "fs-go")
        blocker = queue(fbox, "root", "sh", "-c", wait)
        wait_for(lambda: jobs(fbox)[blocker]["State"] == "running")
        first = queue(fbox, "alice", "true")  # queued first...
        second = queue(fbox, "bob", "true")  # ...but bob has less usage
        fbox.run(["touch", flag])
        finish(fbox, blocker, first, second)
        listed = jobs(fbox)
        assert listed[second]["Start"] < listed[first]["Start"], listed
    finally:
        ts(fbox, "root", "-S", "2")


def test_a_two_slot_job_is_not_starved_by_another_users_one_slot_stream(fbox: Box) -> None:
    running = [queue(fbox, "bob", "sleep", str(s)) for s in (2, 4)]
    wait_for(lambda: all(jobs(fbox)[i]["State"] == "running" for i in running))
    big = queue(fbox, "alice", "-N", "2", "sleep", "1")
    stream = [queue(fbox, "bob", "sleep", "1") for _ in range(6)]
    seen: set[str] = set()

    def big_started() -> bool:
        seen.add(ts(fbox, "bob", "-i", str(stream[0])).stdout)
        seen.add(ts(fbox, "alice", "-i", str(big)).stdout)
        return jobs(fbox)[big]["State"] != "queued"

    wait_for(big_started, timeout=60, interval=0.1)
    finish(fbox, big, *running, *stream)
    listed = jobs(fbox)
    assert listed[big]["E-Level"] == 0
    assert all(listed[big]["Start"] <= listed[i]["Start"] for i in stream), listed
    # While one slot was free, the stream waited behind the big job's reservation.
    assert any(f"Wait reason: behind reservation for job {big}" in s for s in seen), seen
    assert any("Wait reason: reserved: waits for 2 slots (1 of 2 free)" in s for s in seen)


def test_user_quota_still_holds_and_a_job_over_it_is_refused(fbox: Box) -> None:
    flag, wait = gate(fbox, "fs-quota")
    mine = [queue(fbox, "erin", "sh", "-c", wait) for _ in range(2)]
    wait_for(lambda: jobs(fbox)[mine[0]]["State"] == "running")
    for _ in range(5):
        assert [jobs(fbox)[i]["State"] for i in mine] == ["running", "queued"]
        time.sleep(0.1)
    refused = ts(fbox, "erin", "-N", "2", "true", check=False)
    assert refused.returncode == 1
    assert refused.stderr == (
        "ts: job needs 2 slots but your quota (max_running_slots) is 1\n"
    )
    fbox.run(["touch", flag])
    finish(fbox, *mine)


def test_stats_show_users_their_own_row_and_admins_everyones(fbox: Box) -> None:
    alice = stats(fbox, "alice")
    assert [r["User"] for r in alice] == ["alice"]
    assert alice[0]["Jobs"] == 3 and alice[0]["Failed"] == 0
    # sleep 2 + the two-slot sleep 1 (+ true): at least 4 slot-seconds.
    assert alice[0]["Slot_Hours"] >= 3.9 / 3600
    assert [r["User"] for r in stats(fbox, "bob")] == ["bob"]
    everyone = {r["User"]: r for r in stats(fbox, "dave", "-A", "--since", "1d")}
    assert {"alice", "bob", "erin", "root"} <= set(everyone)
    assert everyone["bob"]["Jobs"] == 9
    assert everyone["alice"] == alice[0]
    refused = ts(fbox, "bob", "--stats", "-A", check=False)
    assert refused.returncode == 1
    assert refused.stderr.startswith("ts: ") and refused.stderr.count("\n") == 1
    assert "admins" in refused.stderr
    text = ts(fbox, "alice", "--stats").stdout.splitlines()
    assert text[0].split()[:3] == ["User", "Jobs", "Failed"] and text[1].split()[:2] == [
        "alice", "3",
    ]
    # The history outlives ts -C, and a restart.
    ts(fbox, "alice", "-C")
    fbox.systemctl("restart", "tsd")
    assert stats(fbox, "alice") == alice


def test_a_job_whose_timeout_ends_before_the_reservation_is_needed_backfills(fbox: Box) -> None:
    # bob fills both slots with jobs that end within 60 s at the latest (their --timeout).
    running = [queue(fbox, "bob", "--timeout", "60", "sleep", str(s)) for s in (2, 8)]
    wait_for(lambda: all(jobs(fbox)[i]["State"] == "running" for i in running))
    big = queue(fbox, "alice", "-N", "2", "sleep", "1")
    short = queue(fbox, "bob", "--timeout", "20", "true")  # surely over before 60 s
    endless = queue(fbox, "dave", "sleep", "1")  # no --timeout: it could delay the big job
    seen: set[str] = set()

    def big_started() -> bool:
        seen.add(ts(fbox, "dave", "-i", str(endless)).stdout)
        return jobs(fbox)[big]["State"] != "queued"

    wait_for(big_started, timeout=60, interval=0.1)
    finish(fbox, big, short, endless, *running)
    listed = jobs(fbox)
    assert listed[short]["Start"] < listed[big]["Start"] <= listed[endless]["Start"], listed
    assert any(f"Wait reason: behind reservation for job {big}" in s for s in seen), seen

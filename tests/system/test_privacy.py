"""What users see of each other, the queue order between them, what they may store
(issue 9), in a booted systemd with real users. One box for the module.

Raw frames are sent with RAW (below) where `ts` would hide what travels: the
listing's pieces, a wait stream's events, error answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from box import Box
from deploy import CONFIG, deploy, jobs, ts, wait_for

# erin has small byte caps; everyone else the defaults.
PRIVACY_CONFIG = CONFIG.replace(
    "  bob: {max_running_slots: 1}\n",
    "  bob: {max_running_slots: 1}\n  erin: {max_job_bytes: 20000, max_stored_bytes: 60000}\n",
)

# Sends each request of argv[1] (a JSON list) on its own connection to the system
# socket and prints, for each, every frame that came back (events and the answer).
RAW = r"""
import json, socket, struct, sys
def exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise SystemExit("connection closed")
        buf += chunk
    return buf
out = []
for req in json.loads(sys.argv[1]):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect("/run/tsd/tsd.sock")
    body = json.dumps(dict(req, v=1)).encode()
    s.sendall(struct.pack(">I", len(body)) + body)
    frames = []
    while not frames or "ok" not in frames[-1]:
        (n,) = struct.unpack(">I", exact(s, 4))
        frames.append(json.loads(exact(s, n)))
    s.close()
    out.append(frames)
print(json.dumps(out))
"""

SECRETS = ("alice-env-secret", "alice-ts-env-secret", "alice-secret-dir")


@pytest.fixture(scope="module")
def sbox(box: Box) -> Iterator[Box]:
    """The system service, users alice/bob/carol/dave from deploy, and erin."""
    deploy(box, PRIVACY_CONFIG)
    box.add_user("erin", ["tsd"])
    box.write_file("/opt/raw.py", RAW)
    yield box


def raw(box: Box, user: str, *requests: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Every frame the daemon answered to each request, sent as `user` over raw frames."""
    r = box.run([box.python, "/opt/raw.py", json.dumps(list(requests))], user=user, timeout=60)
    out: list[list[dict[str, Any]]] = json.loads(r.stdout)
    return out


def job_id(proc: Any) -> int:
    return int(proc.stdout.strip())


def one_error_line(r: Any) -> str:
    """The single `ts: ...` line a failed ts printed, after checking it exited 1."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("ts: "), r
    return str(lines[0])


def queued_order(box: Box) -> list[int]:
    """Every queued job's id, in the daemon's queue order."""
    [[answer]] = raw(box, "root", {"op": "list", "all_users": True})
    return [j["id"] for j in answer["jobs"] if j["state"] in ("queued", "allocating")]


# ------------------------------------------------------ privacy in listings


def test_other_users_see_only_the_listing_fields_of_a_job_through_any_request(
    sbox: Box,
) -> None:
    home = "/home/alice/alice-secret-dir"
    sbox.run(["mkdir", "-p", home], user="alice")
    flag = "/tmp/privacy-go"
    env = {"SECRET": "alice-env-secret", "TS_ENV": "echo alice-ts-env-secret"}
    done = job_id(sbox.run(["ts", "-L", "mine", "true"], user="alice", cwd=home, env=env))
    running = job_id(sbox.run(
        ["ts", "sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; done"],
        user="alice", cwd=home, env=env,
    ))
    wait_for(lambda: jobs(sbox)[running]["State"] == "running"
             and jobs(sbox)[done]["State"] == "finished")
    out_path = jobs(sbox)[done]["Output"]
    assert out_path.startswith("/")
    try:
        answers = raw(
            sbox, "bob",
            {"op": "list", "all_users": True},
            {"op": "get", "id": running},
            {"op": "wait", "id": running, "notify_start": True},
            {"op": "gpu_status"},
        )
        text = json.dumps(answers)
        for secret in (*SECRETS, out_path):
            assert secret not in text, secret
        [listed], get, wait, _ = answers
        seen = {j["id"]: j for j in listed["jobs"]}
        for job in (seen[done], seen[running]):
            assert job["user"] == "alice" and job["spec"]["cwd"] == ""
            assert job["spec"]["env_info"] is None and job["spec"]["env"] == []
            assert job["output"] is None and job["pid"] is None
        assert seen[done]["spec"]["label"] == "mine" and seen[done]["exit"]["code"] == 0
        assert seen[running]["spec"]["command"][0] == "sh" and seen[running]["state"] == "running"
        assert get == [
            {"ok": False, "code": "not_owner", "error": f"job {running} belongs to alice"}
        ]
        assert wait[-1]["ok"] is False and len(wait) == 1
        # ts itself: -A -M json has no cwd for alice's jobs, -A -l no output path
        listing = json.loads(ts(sbox, "bob", "-A", "-M", "json").stdout)
        mine = [j for j in listing if j["User"] == "alice"]
        assert mine and all(j["Cwd"] is None for j in mine)
        assert out_path not in ts(sbox, "bob", "-A", "-l").stdout
        # the owner and an admin still see everything
        for user in ("alice", "dave"):
            [[own]] = raw(sbox, user, {"op": "get", "id": done})
            assert own["job"]["spec"]["cwd"] == home, user
            assert "alice-ts-env-secret" in own["job"]["spec"]["env_info"], user
    finally:
        sbox.run(["touch", flag])
    assert ts(sbox, "alice", "-w", str(running), check=False).returncode == 0


# ------------------------------------------------------ -u and -U


def test_urgent_and_swap_reorder_only_the_owners_own_queue(sbox: Box) -> None:
    ts(sbox, "root", "-S", "0")  # nothing starts: the queue stays as it is
    try:
        a1, a2 = (job_id(ts(sbox, "alice", "true")) for _ in range(2))
        b1, b2 = (job_id(ts(sbox, "bob", "true")) for _ in range(2))
        a3 = job_id(ts(sbox, "alice", "true"))
        assert queued_order(sbox) == [a1, a2, b1, b2, a3]
        ts(sbox, "bob", "-u", str(b2))  # ahead of bob's own b1, never of alice's a1, a2
        assert queued_order(sbox) == [a1, a2, b2, b1, a3]
        ts(sbox, "alice", "-u", str(a3))  # alice's jobs keep alice's places
        assert queued_order(sbox) == [a3, a1, b2, b1, a2]
        ts(sbox, "bob", "-U", f"{b2}-{b1}")
        assert queued_order(sbox) == [a3, a1, b1, b2, a2]
        # not even an admin swaps two users' jobs
        r = ts(sbox, "dave", "-U", f"{a1}-{b1}", check=False)
        assert "different users" in one_error_line(r)
        ts(sbox, "dave", "-u", str(b2))  # an admin's -u moves it within bob's queue
        assert queued_order(sbox) == [a3, a1, b2, b1, a2]
        for job in (a1, a2, a3, b1, b2):
            ts(sbox, "root", "-r", str(job))
    finally:
        ts(sbox, "root", "-S", "4")


# ------------------------------------------------------ control characters


def test_control_characters_are_refused_in_labels_log_dirs_and_output_names(
    sbox: Box,
) -> None:
    before = set(jobs(sbox))
    for args in (
        ["-L", "fake\nline", "true"],
        ["-L", "red\x1b[31m", "true"],
        ["-O", "out\nname", "true"],
        ["--set_logdir", "/tmp/a\nb"],
    ):
        r = sbox.run(["ts", *args], user="alice", check=False)
        assert "control character" in one_error_line(r), args
    assert set(jobs(sbox)) == before  # nothing stored
    assert "\n" not in ts(sbox, "alice", "--get_logdir").stdout.strip()


def test_control_characters_in_commands_are_escaped_in_listings_and_the_journal(
    sbox: Box,
) -> None:
    jid = job_id(sbox.run(["ts", "sh", "-c", "echo a\nFAKE-LINE\x1b[2J"], user="alice"))
    ts(sbox, "alice", "-w", str(jid), check=False)  # (its shell finds no FAKE-LINE command)
    for args in (["-A", "-l"], ["-i", str(jid)], ["-A", "-M", "tab"]):
        out = ts(sbox, "dave", *args).stdout
        assert "\x1b" not in out and "\nFAKE-LINE" not in out, args
        assert "echo a\\nFAKE-LINE\\e[2J" in out, args
    journal = sbox.run(["journalctl", "-u", "tsd", "--no-pager", "-o", "cat"]).stdout
    assert f"job {jid} queued by alice: sh -c echo a\\nFAKE-LINE\\e[2J" in journal
    assert "\nFAKE-LINE" not in journal
    ts(sbox, "alice", "-r", str(jid))


# ------------------------------------------------------ stored bytes


def test_a_user_over_a_stored_bytes_cap_gets_one_line_and_nothing_is_stored(
    sbox: Box,
) -> None:
    before = set(jobs(sbox))
    r = sbox.run(["ts", "true", "x" * 25000], user="erin", check=False)
    assert "max_job_bytes" in one_error_line(r)
    r = sbox.run(["ts", "-L", "y" * 1000, "true", "x" * 19000], user="erin", check=False)
    assert "max_job_bytes" in one_error_line(r)
    assert set(jobs(sbox)) == before
    kept = [job_id(sbox.run(["ts", "true", "x" * 15000], user="erin")) for _ in range(3)]
    r = sbox.run(["ts", "true", "x" * 15000], user="erin", check=False)
    assert "max_stored_bytes" in one_error_line(r)
    r = sbox.run(["ts", "--setenv", "BIG=" + "z" * 15000], user="erin", check=False)
    assert "max_stored_bytes" in one_error_line(r)
    assert ts(sbox, "erin", "--getenv", "BIG").stdout.strip() == ""
    assert set(jobs(sbox)) == before | set(kept)
    # clearing finished jobs gives the room back
    for job in kept:
        ts(sbox, "erin", "-w", str(job), check=False)
    ts(sbox, "erin", "-C")
    again = job_id(sbox.run(["ts", "true", "x" * 15000], user="erin"))
    ts(sbox, "erin", "--setenv", "SMALL=1")
    ts(sbox, "erin", "-w", str(again), check=False)
    ts(sbox, "erin", "-C")

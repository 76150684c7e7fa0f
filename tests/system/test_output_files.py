"""Output files (issue 9): `-O` only ever creates a new file, and root's `ts -c`
never reads what a user planted at a job's output path. In a booted systemd."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from box import Box
from deploy import deploy, ts, wait_for

TMP = {"TMPDIR": "/tmp"}


@pytest.fixture(scope="module")
def sbox(box: Box) -> Iterator[Box]:
    deploy(box)
    yield box


def one_error_line(r: object) -> str:
    err: str = r.stderr  # type: ignore[attr-defined]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ts: "), err
    return lines[0]


def running_job_with_output(box: Box, flag: str) -> tuple[int, str]:
    """A job of alice's that prints a line and waits for `flag`; its id and output path."""
    box.run(["rm", "-f", flag])
    jid = int(ts(box, "alice", "sh", "-c",
                 f"echo mine; while [ ! -e {flag} ]; do sleep 0.05; done", env=TMP).stdout)
    wait_for(lambda: ts(box, "alice", "-o", str(jid), check=False).returncode == 0)
    return jid, ts(box, "alice", "-o", str(jid)).stdout.strip()


def test_root_reading_output_refuses_a_symlink_the_user_planted(sbox: Box) -> None:
    jid, path = running_job_with_output(sbox, "/tmp/plant-go")
    # After the job started, alice swaps her output file for a link to /etc/shadow.
    sbox.run(["sh", "-c", f"rm -f {path} && ln -s /etc/shadow {path}"], user="alice")
    sbox.run(["touch", "/tmp/plant-go"])
    assert ts(sbox, "alice", "-w", str(jid), check=False).returncode == 0
    for flag in ("-c", "-t"):
        r = ts(sbox, "root", flag, str(jid), check=False, timeout=30)
        assert r.returncode == 1, flag
        assert "symbolic link" in one_error_line(r)
        assert "root:" not in r.stdout and r.stdout == ""


def test_root_reading_output_refuses_a_fifo_and_a_file_of_another_owner(sbox: Box) -> None:
    jid, path = running_job_with_output(sbox, "/tmp/fifo-go")
    sbox.run(["sh", "-c", f"rm -f {path} && mkfifo {path}"], user="alice")
    sbox.run(["touch", "/tmp/fifo-go"])
    ts(sbox, "alice", "-w", str(jid), check=False)
    r = ts(sbox, "root", "-c", str(jid), check=False, timeout=30)  # a FIFO must not block it
    assert r.returncode == 1 and "not a regular file" in one_error_line(r)
    # A regular file that is not alice's (here: root's own) is not the job's output either.
    sbox.run(["sh", "-c", f"rm -f {path} && echo ROOTS > {path}"])
    r = ts(sbox, "root", "-c", str(jid), check=False, timeout=30)
    assert r.returncode == 1 and "not to the job's user" in one_error_line(r)
    assert "ROOTS" not in r.stdout


def test_reading_a_normal_output_still_works_for_root_and_owner(sbox: Box) -> None:
    jid, _ = running_job_with_output(sbox, "/tmp/normal-go")
    sbox.run(["touch", "/tmp/normal-go"])
    ts(sbox, "alice", "-w", str(jid), check=False)
    assert ts(sbox, "root", "-c", str(jid)).stdout == "mine\n"
    assert ts(sbox, "alice", "-t", str(jid)).stdout == "mine\n"


def test_O_refuses_another_users_file_a_fifo_and_a_device(sbox: Box) -> None:
    sbox.run("umask 0 && echo bobs > /tmp/bobs.log", user="bob")  # writable by all
    sbox.run(["mkfifo", "/tmp/pipe.log"], user="alice")
    cases = [("bobs.log", TMP), ("pipe.log", TMP), ("null", {"TMPDIR": "/dev"})]
    for name, env in cases:
        r = ts(sbox, "alice", "-O", name, "echo", "pwned", check=False, env=env, timeout=30)
        assert r.returncode == 1, name
        assert "already exists" in one_error_line(r), name
        assert r.stdout == ""
    assert sbox.read_file("/tmp/bobs.log") == "bobs\n"


def test_O_name_taken_after_submit_fails_the_job_with_a_note(sbox: Box) -> None:
    flag = "/tmp/late-go"
    sbox.run(["rm", "-f", flag, "/tmp/late.log"])
    blocker = int(ts(sbox, "alice", "sh", "-c",
                     f"while [ ! -e {flag} ]; do sleep 0.05; done").stdout)
    jid = int(ts(sbox, "alice", "-D", str(blocker), "-O", "late.log", "echo", "pwned",
                 env=TMP).stdout)
    # Between submit and start, bob puts a world-writable file there.
    sbox.run("umask 0 && echo bobs > /tmp/late.log", user="bob")
    sbox.run(["touch", flag])
    assert ts(sbox, "alice", "-w", str(jid), check=False).returncode != 0
    assert sbox.read_file("/tmp/late.log") == "bobs\n"
    info = ts(sbox, "alice", "-i", str(jid)).stdout
    assert "/tmp/late.log already exists" in info


def test_O_creates_a_new_private_file_as_the_user(sbox: Box) -> None:
    sbox.run(["rm", "-f", "/tmp/fresh.log"])
    jid = int(ts(sbox, "alice", "-O", "fresh.log", "echo", "hello", env=TMP).stdout)
    assert ts(sbox, "alice", "-w", str(jid), check=False).returncode == 0
    assert sbox.run(["stat", "-c", "%U %a", "/tmp/fresh.log"]).stdout.split() == ["alice", "600"]
    assert sbox.read_file("/tmp/fresh.log") == "hello\n"

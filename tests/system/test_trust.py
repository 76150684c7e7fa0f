"""Trustworthy as root (issue 9), in a booted systemd with real users.

One box for the module. The tests of ts's own checks run first, before the
system service is installed (`plain`); the rest run against the service
(`sbox`), each leaving it running as it found it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from box import Box
from deploy import deploy, ts, wait_for

# A hostile "daemon": listens on PATH, never answers, and logs how many bytes
# each connection sent. It stops when STOP exists.
LISTENER = r"""
import os, socket, sys
path, log, stop = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o777)
s.listen(8)
s.settimeout(0.05)
open(log, "w").write("ready\n")
while not os.path.exists(stop):
    try:
        c, _ = s.accept()
    except TimeoutError:
        continue
    c.settimeout(0.5)
    n = 0
    try:
        while chunk := c.recv(65536):
            n += len(chunk)
    except OSError:
        pass
    c.close()
    open(log, "a").write(f"conn {n}\n")
open(log, "a").write("done\n")
"""


@pytest.fixture(scope="module")
def plain(box: Box) -> Iterator[Box]:
    """The box with ts on PATH and two users, and no tsd system service."""
    box.run(["ln", "-sf", f"{box.repo}/.venv/bin/ts", "/usr/local/bin/ts"])
    box.add_user("vic")
    box.add_user("mallory")
    box.write_file("/opt/listener.py", LISTENER)
    yield box


@pytest.fixture(scope="module")
def sbox(plain: Box) -> Iterator[Box]:
    """The same box with the tsd system service installed and its socket listening."""
    deploy(plain)
    yield plain


def start_listener(box: Box, path: str, tag: str) -> tuple[str, str]:
    """Run LISTENER as mallory on `path`; return its log and stop-file paths."""
    log, stop = f"/tmp/{tag}.log", f"/tmp/{tag}.stop"
    box.run(
        f"python3 /opt/listener.py {path} {log} {stop} >/dev/null 2>&1 &",
        user="mallory",
    )
    wait_for(lambda: box.exists(log), timeout=15)
    return log, stop


def bytes_received(box: Box, log: str, stop: str) -> list[int]:
    """Stop the listener; the byte count of every connection it accepted."""
    box.run(["touch", stop])
    wait_for(lambda: "done" in box.read_file(log), timeout=15)
    return [int(line.split()[1]) for line in box.read_file(log).splitlines()
            if line.startswith("conn ")]


def one_error_line(r: object) -> str:
    """The single `ts: ...` line a failed ts printed (and nothing else)."""
    err: str = r.stderr  # type: ignore[attr-defined]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ts: "), err
    return lines[0]


# ------------------------------------------------ ts verifies its daemon


def test_ts_refuses_a_personal_socket_dir_another_user_made_and_sends_nothing(
    plain: Box,
) -> None:
    uid = plain.uid("vic")
    directory = f"/tmp/tsd-{uid}"
    plain.run(f"mkdir -m 0777 {directory}", user="mallory")
    log, stop = start_listener(plain, f"{directory}/tsd.sock", "squat")
    try:
        r = plain.run(["ts", "echo", "secret"], user="vic", check=False, timeout=30)
        assert r.returncode == 1
        assert directory in one_error_line(r)
    finally:
        got = bytes_received(plain, log, stop)
        plain.run(["rm", "-rf", directory])
    assert got == []  # not even a connection: the directory alone gave it away


def test_ts_refuses_a_daemon_that_runs_as_another_user_and_sends_nothing(plain: Box) -> None:
    uid, evil = plain.uid("vic"), plain.uid("mallory")
    directory = f"/tmp/tsd-{uid}"
    plain.run(f"mkdir -m 0700 {directory}", user="vic")  # vic's own, as it should be
    plain.run("mkdir -m 0700 /tmp/mal", user="mallory")
    log, stop = start_listener(plain, "/tmp/mal/tsd.sock", "peer")
    try:
        # The socket file lands in vic's trusted directory; only SO_PEERCRED can tell.
        plain.run(["mv", "/tmp/mal/tsd.sock", f"{directory}/tsd.sock"])
        r = plain.run(["ts", "-l"], user="vic", check=False, timeout=30)
        assert r.returncode == 1
        assert f"uid {evil}" in one_error_line(r)
    finally:
        got = bytes_received(plain, log, stop)
        plain.run(["rm", "-rf", directory, "/tmp/mal"])
    assert got == [0]  # connected, checked, hung up: zero bytes


def test_without_the_system_service_ts_starts_the_users_personal_daemon(plain: Box) -> None:
    r = plain.run(["ts", "-l"], user="vic", timeout=30)
    assert r.stdout.startswith("ID")
    plain.run(["ts", "-K"], user="vic")


# ------------------------------------------------ against the system service


def test_each_job_gets_its_own_session_keyring_owned_by_its_user(sbox: Box) -> None:
    alice, bob = sbox.uid("alice"), sbox.uid("bob")
    flag = "/tmp/keyring-go"
    sbox.run(["rm", "-f", flag])
    a = int(ts(sbox, "alice", "sh", "-c",
               "keyctl add user tsd-secret s3cret @s; keyctl rdescribe @s; keyctl show @s; "
               f"while [ ! -e {flag} ]; do sleep 0.05; done").stdout)
    wait_for(lambda: ts(sbox, "alice", "-o", str(a), check=False).returncode == 0)
    out_a = ts(sbox, "alice", "-o", str(a)).stdout.strip()
    wait_for(lambda: len(sbox.read_file(out_a).splitlines()) >= 2)
    key_id, alice_ring = sbox.read_file(out_a).splitlines()[:2]
    try:
        # While alice's job still runs, bob's job neither finds her key in its
        # session keyring nor can read it by its serial number.
        b = int(ts(sbox, "bob", "sh", "-c",
                   "keyctl rdescribe @s; keyctl search @s user tsd-secret || echo absent; "
                   f"keyctl print {key_id} || echo denied").stdout)
        ts(sbox, "bob", "-w", str(b), check=False)
        bob_out = ts(sbox, "bob", "-c", str(b)).stdout.splitlines()
    finally:
        sbox.run(["touch", flag])
    assert ts(sbox, "alice", "-w", str(a), check=False).returncode == 0
    # keyring;UID;GID;PERM;description: a keyring per job, owned by its user
    assert alice_ring.split(";")[:2] == ["keyring", str(alice)]
    assert bob_out[0].split(";")[:2] == ["keyring", str(bob)]
    assert "absent" in bob_out and "denied" in bob_out
    assert "s3cret" not in bob_out


def test_installed_service_with_its_socket_down_is_reported_never_replaced(sbox: Box) -> None:
    uid = sbox.uid("alice")
    sbox.systemctl("stop", "tsd.socket", "tsd.service")
    try:
        r = ts(sbox, "alice", "-l", check=False, timeout=30)
        assert r.returncode == 1
        assert "not running" in one_error_line(r)
        # No personal daemon was started behind the user's back.
        assert not sbox.exists(f"/tmp/tsd-{uid}")
        assert sbox.run(["pgrep", "-u", "alice", "-f", "tsd.daemon"], check=False).stdout == ""
        # Asked for explicitly, a personal daemon is fine.
        r = ts(sbox, "alice", "-l", env={"TS_PERSONAL": "1"}, timeout=30)
        assert r.stdout.startswith("ID")
        ts(sbox, "alice", "-K", env={"TS_PERSONAL": "1"})
    finally:
        sbox.run(["rm", "-rf", f"/tmp/tsd-{uid}"])
        sbox.systemctl("start", "tsd.socket")
    assert ts(sbox, "alice", "-l", timeout=30).returncode == 0


def test_a_daemon_that_cannot_start_is_given_up_and_ts_says_so_within_30s(sbox: Box) -> None:
    ts(sbox, "root", "-l")  # the daemon has made its state.db
    sbox.systemctl("stop", "tsd.socket", "tsd.service")
    db = "/var/lib/tsd/state.db"
    sbox.run(f"cp -a {db} /root/state.db.good && rm -f {db}-wal {db}-shm && "
             f"head -c 8192 /dev/urandom > {db}")
    try:
        since = int(time.time()) - 1
        sbox.systemctl("start", "tsd.socket")
        t0 = time.monotonic()
        r = ts(sbox, "alice", "-l", check=False, timeout=45)
        took = time.monotonic() - t0
        assert r.returncode != 0
        assert "tsd service" in one_error_line(r)
        assert took < 30, took
        wait_for(lambda: sbox.systemctl("is-failed", "tsd.service", check=False)
                 .stdout.strip() == "failed", timeout=60)
        # Each try logged one line naming the file and what to do, and no traceback.
        journal = sbox.run(["journalctl", "-u", "tsd.service", "-o", "cat", "--no-pager",
                            "--since", f"@{since}"], check=False).stdout
        assert f"{db} is not a database (corrupt): move it aside and start tsd again" in journal
        assert "Traceback" not in journal, journal
        # Now the socket is gone too: the answer is immediate.
        t0 = time.monotonic()
        r = ts(sbox, "alice", "-l", check=False, timeout=30)
        assert r.returncode == 1 and "not running" in one_error_line(r)
        assert time.monotonic() - t0 < 5
    finally:
        sbox.systemctl("stop", "tsd.socket", "tsd.service", check=False)
        sbox.run(f"cp -a /root/state.db.good {db}")
        sbox.systemctl("reset-failed", "tsd.service", "tsd.socket", check=False)
        sbox.systemctl("start", "tsd.socket")
    assert ts(sbox, "alice", "-l", timeout=30).returncode == 0

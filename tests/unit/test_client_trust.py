"""ts's client verifies a daemon before sending to it, and never hangs on a silent one."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tsd import client
from tsd.client import (
    Client,
    Connection,
    ServerUnavailable,
    Untrusted,
    check_socket_dir,
    system_service_installed,
)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A listening socket that accepts nothing, in a private directory."""
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    path = str(directory / "tsd.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    yield sock, path
    sock.close()


def test_socket_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    bad.chmod(0o777)
    with pytest.raises(Untrusted, match="refusing"):
        check_socket_dir(str(bad / "tsd.sock"), {os.getuid()})


def test_socket_dir_of_another_uid_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Untrusted, match=f"belongs to uid {os.getuid()}"):
        check_socket_dir(str(tmp_path / "tsd.sock"), {os.getuid() + 4242})


def test_socket_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(Untrusted, match="not a directory"):
        check_socket_dir(str(tmp_path / "link" / "tsd.sock"), {os.getuid()})


def test_own_private_or_missing_socket_dir_passes(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir(mode=0o700)
    check_socket_dir(str(own / "tsd.sock"), {os.getuid()})
    check_socket_dir(str(tmp_path / "missing" / "tsd.sock"), {os.getuid()})


def test_daemon_listening_as_an_untrusted_uid_gets_no_bytes(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    c = Client(path=path, may_start=False)
    c.trusted = frozenset({os.getuid() + 4242})  # as if the listener were someone else
    # As if the directory were trusted (someone renamed a socket into it): SO_PEERCRED decides.
    monkeypatch.setattr(client, "check_socket_dir", lambda path, owners: None)
    with pytest.raises(Untrusted, match=f"served by uid {os.getuid()}"):
        c.connect()
    sock.settimeout(1)
    conn, _ = sock.accept()  # the refused connection, still in the backlog
    conn.settimeout(1)
    assert conn.recv(100) == b""  # closed without a byte sent
    conn.close()


def test_a_request_nobody_reads_times_out_with_one_line(
    listener: tuple[socket.socket, str],
) -> None:
    _sock, path = listener
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(path)
    conn = Connection(raw, answer_timeout=0.5)
    conn.send_wire({"v": 1, "op": "list"})
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match=r"did not answer in 0\.5s"):
        conn.recv()
    assert time.monotonic() - t0 < 3
    conn.close()


def test_a_request_read_by_the_daemon_may_wait_past_the_timeout(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(path)
    conn = Connection(raw, answer_timeout=0.3)
    conn.send_wire({"v": 1, "op": "wait"})

    def daemon() -> None:
        peer, _ = sock.accept()
        peer.recv(1 << 16)  # read the request at once, answer much later (ts -w)
        time.sleep(1.0)
        peer.sendall(client.framing.encode({"ok": True}))
        peer.close()

    t = threading.Thread(target=daemon)
    t.start()
    assert conn.recv() == {"ok": True}
    t.join()
    conn.close()


def test_listener_closed_before_answering_says_the_service_is_not_running(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(path)
    conn = Connection(raw, answer_timeout=5)
    conn.send_wire({"v": 1, "op": "list"})
    sock.close()  # what systemd does when it gives up starting tsd.service
    with pytest.raises(ServerUnavailable, match="not running"):
        conn.recv()
    conn.close()


def test_service_counts_as_installed_only_with_systemd_and_a_unit_or_config(
    tmp_path: Path,
) -> None:
    root = str(tmp_path)
    assert not system_service_installed(root)
    (tmp_path / "etc/tsd").mkdir(parents=True)
    (tmp_path / "etc/tsd/tsd.yaml").write_text("slots: 1\n")
    assert not system_service_installed(root)  # no systemd running: personal is fine
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    assert system_service_installed(root)
    (tmp_path / "etc/tsd/tsd.yaml").unlink()
    assert not system_service_installed(root)
    unit_dir = tmp_path / "usr/lib/systemd/system"
    unit_dir.mkdir(parents=True)
    (unit_dir / "tsd.socket").write_text("[Socket]\n")
    assert system_service_installed(root)


def test_explicit_personal_switch_and_ts_socket_win_over_an_installed_service(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(client, "system_service_installed", lambda root="/": True)
    monkeypatch.setattr(client, "SYSTEM_SOCKET", str(tmp_path / "absent.sock"))
    env = {"TMPDIR": str(tmp_path)}
    assert client.choose_socket(env) == (str(tmp_path / "absent.sock"), False)
    personal = client.choose_socket({**env, "TS_PERSONAL": "1"})
    assert personal == (os.path.join(str(tmp_path), f"tsd-{os.getuid()}", "tsd.sock"), True)
    assert client.choose_socket({**env, "TS_SOCKET": "/x/y.sock"}) == ("/x/y.sock", True)


def _groups(monkeypatch: pytest.MonkeyPatch, members: list[str], session: list[int]) -> None:
    import grp
    import pwd

    me = pwd.getpwuid(os.getuid())
    monkeypatch.setattr(
        grp, "getgrnam", lambda name: grp.struct_group(("tsd", "x", 4242, members))
    )
    monkeypatch.setattr(
        pwd, "getpwuid", lambda uid: pwd.struct_passwd((me.pw_name, *me[1:3], 7, *me[4:]))
    )
    monkeypatch.setattr(os, "getgroups", lambda: session)
    monkeypatch.setattr(os, "getegid", lambda: 7)


def test_permission_denied_asks_for_the_group_only_when_not_a_member(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _groups(monkeypatch, members=["someone-else"], session=[7])
    assert client.tsd_group_advice() == "ask an admin to add you to group tsd"


def test_permission_denied_after_being_added_says_log_in_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pwd

    _groups(monkeypatch, members=[pwd.getpwuid(os.getuid()).pw_name], session=[7])
    advice = client.tsd_group_advice()
    assert "log in again" in advice and "newgrp tsd" in advice and "add you" not in advice


def test_permission_denied_as_a_member_in_session_points_at_the_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _groups(monkeypatch, members=[], session=[7, 4242])
    assert "socket's group and mode" in client.tsd_group_advice()

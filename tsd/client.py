"""Connect to a daemon and call it; start the personal daemon when needed.

Kept light on purpose: `ts` imports this on every call, so it pulls in only
the standard library and the error tree. `ts` sends its requests as they
travel (plain dicts, tsd.cli_request.wire); the typed protocol (thirty
dataclasses) loads only when a caller hands over a typed request.
"""

# No `from __future__ import annotations` here: this module is on the way of
# `ts COMMAND` (tsd.plainsubmit), and that import loads __future__ (0.12 ms of each
# call). Annotations that name what only mypy imports are strings instead.

import errno
import posix
import select
import sys
import time

# The C socket type, not socket.py's subclass of it: that module (with enum and
# selectors) would be a tenth of a quick `ts` call, for nothing used here.
from _socket import AF_UNIX, SCM_RIGHTS, SO_PEERCRED, SOCK_STREAM, SOL_SOCKET
from _socket import socket as Socket

# _stat, not stat, for the reason tsd.leanos gives.
from _stat import S_IMODE, S_ISDIR

# struct.py only re-exports _struct, which is built in: one file fewer for every `ts` call.
from _struct import calcsize, pack, unpack

from tsd import framing, leanos
from tsd.errors import ProtocolError, ServerUnavailable, TsdError, from_wire
from tsd.paths import SUBMIT_GROUP, SYSTEM_CONFIG, SYSTEM_SOCKET

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ts a few ms at start and only mypy needs it here
    from collections.abc import Collection, Iterator, Mapping, Sequence
    from typing import Any

    from tsd import protocol

    # A typed request, or one as it travels (tsd.cli_request.wire).
    Req = protocol.Request | dict[str, Any]


class Untrusted(ServerUnavailable):
    """The socket, or whoever listens on it, is not the daemon `ts` may talk to."""


# Where a unit file of the system service may be; /usr/local/lib/... is install.sh's.
UNIT_DIRS = (
    "/etc/systemd/system",
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/usr/local/lib/systemd/system",
)
START_TIMEOUT = 10.0
# How long a socket-activated daemon may leave a request unread: tsd.socket keeps
# listening while tsd.service is (re)starting or has failed, so the kernel accepts
# our connection either way; past this, say so instead of hanging.
ANSWER_TIMEOUT = 20.0
NOT_RUNNING = "the tsd service is not running (systemctl status tsd)"


def personal_socket_path(env: "Mapping[str, str] | None" = None) -> str:
    """Where a personal daemon listens.

    `$XDG_RUNTIME_DIR/tsd/tsd.sock`, else `$TMPDIR/tsd-<uid>/tsd.sock`.
    """
    env = leanos.environ() if env is None else env
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and leanos.isdir(runtime):
        return leanos.join(runtime, "tsd", "tsd.sock")
    tmp = env.get("TMPDIR") or "/tmp"
    return leanos.join(tmp, f"tsd-{posix.getuid()}", "tsd.sock")


def choose_socket(env: "Mapping[str, str] | None" = None) -> tuple[str, bool]:
    """Which socket `ts` talks to, and whether it is a personal one we may start.

    TS_SOCKET wins, then TS_PERSONAL=1 (the user asks for a personal daemon);
    then the system socket if it exists or the system service is installed (a
    missing socket is then reported, never replaced by a personal daemon that
    nobody asked for); else the personal one.
    """
    env = leanos.environ() if env is None else env
    explicit = env.get("TS_SOCKET")
    if explicit:
        return explicit, not leanos.exists(explicit) or _is_own(explicit)
    if env.get("TS_PERSONAL") == "1":
        return personal_socket_path(env), True
    if leanos.exists(SYSTEM_SOCKET) or system_service_installed():
        return SYSTEM_SOCKET, False
    return personal_socket_path(env), True


def system_service_installed(root: str = "/") -> bool:
    """Whether this machine has the tsd system service: its config or a unit file,
    on a machine that systemd runs.

    Without systemd as init (a container, a chroot) the units cannot run, so the
    personal daemon is the only one there can be.
    """
    if not leanos.isdir(leanos.join(root, "run/systemd/system")):  # sd_booted()
        return False
    candidates = [leanos.join(root, SYSTEM_CONFIG.lstrip("/"))]
    for unit_dir in UNIT_DIRS:
        for unit in ("tsd.socket", "tsd.service"):
            candidates.append(leanos.join(root, unit_dir.lstrip("/"), unit))
    return any(leanos.lexists(path) for path in candidates)


def trusted_uids(path: str) -> frozenset[int]:
    """The uids that may own `path`'s directory and listen on it.

    Root for the system socket, the user for the personal one, either for any
    other path (TS_SOCKET): no one else can be trusted with our requests, which
    carry our environment and commands.
    """
    uid = posix.getuid()
    if path == SYSTEM_SOCKET:
        return frozenset({0})
    if path == personal_socket_path():
        return frozenset({uid})
    return frozenset({uid, 0})


def _is_own(path: str) -> bool:
    try:
        return posix.stat(path).st_uid == posix.getuid()
    except OSError:
        return True


def check_socket_dir(path: str, owners: "Collection[int]") -> None:
    """Refuse a socket whose directory someone else could have made or written to.

    Raises Untrusted unless the directory is a real directory (not a symlink)
    owned by one of `owners` and not writable by group or others. A missing
    directory passes: there is nothing to talk to yet.
    """
    directory = leanos.dirname(leanos.abspath(path))
    try:
        st = posix.lstat(directory)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise Untrusted(f"cannot check {directory}: {exc.strerror}") from None
    if not S_ISDIR(st.st_mode):
        raise Untrusted(f"{directory} is not a directory: refusing to use {path}")
    if st.st_uid not in owners or st.st_mode & 0o022:
        raise Untrusted(
            f"{directory} belongs to uid {st.st_uid} with mode {S_IMODE(st.st_mode):04o}: "
            "refusing to use it (point TMPDIR or TS_SOCKET elsewhere)"
        )


def peer_uid(sock: Socket) -> tuple[int, int]:
    """(pid, uid) of the process that listens on the other end (SO_PEERCRED)."""
    creds = sock.getsockopt(SOL_SOCKET, SO_PEERCRED, calcsize("3i"))
    pid, uid, _gid = unpack("3i", creds)
    return pid, uid


class Connection:
    """One connection to a daemon: send a request, read frames back.

    With `answer_timeout`, a request the daemon has not even read after that
    many seconds is ServerUnavailable; once it has been read, waiting for the
    answer is unbounded (ts -w may wait for hours).
    """

    def __init__(self, sock: Socket, answer_timeout: float | None = None) -> None:
        self.sock = sock
        self.answer_timeout = answer_timeout
        self._unanswered = False  # a request is out and no frame has come back yet

    def send(self, req: "Req") -> None:
        """Send one request frame: a typed request, or one as it travels."""
        if isinstance(req, dict):  # as it travels (tsd.cli_request.wire)
            self.send_wire(req)
            return
        from tsd import protocol

        self.send_wire(protocol.request_to_wire(req))

    def send_wire(self, obj: "Mapping[str, Any]", fds: "Sequence[int]" = ()) -> None:
        """Send a request already in its wire form (ts builds submits as plain dicts).

        `fds` travel with the frame's first bytes (SCM_RIGHTS): `ts -n`'s stdout and
        stderr, which the daemon hands to the job.
        """
        data = framing.encode(obj, plain=True)  # _json loads after the send (below)
        try:
            if self.answer_timeout is None:
                self._send(data, fds)
            else:
                # A frame larger than the socket buffer blocks until someone reads it.
                self.sock.settimeout(self.answer_timeout)
                try:
                    self._send(data, fds)
                except TimeoutError:
                    raise ServerUnavailable(self._not_answering()) from None
                finally:
                    self.sock.settimeout(None)
        except (BrokenPipeError, ConnectionResetError):
            # The daemon answered without reading (over a per-user connection cap)
            # and hung up: its error frame is waiting for recv().
            pass
        self._unanswered = True
        # The answer's decoder loads while the daemon works on the request, not before
        # the request leaves (tsd.framing).
        framing.ready_to_decode()

    def _send(self, data: bytes, fds: "Sequence[int]") -> None:
        if fds:
            # socket.send_fds, spelled out (see the import of _socket above).
            rights = pack(f"{len(fds)}i", *fds)
            sent = self.sock.sendmsg([data], [(SOL_SOCKET, SCM_RIGHTS, rights)])
            data = data[sent:]
        if data:
            self.sock.sendall(data)

    def recv(self) -> "dict[str, Any]":
        """Read one frame; a closed connection is ServerUnavailable."""
        if self._unanswered and self.answer_timeout is not None:
            self._await_reader()
        header = self._read_exact(framing.HEADER.size)
        self._unanswered = False
        body = self._read_exact(framing.frame_length(header))
        return framing.decode(body)

    def _await_reader(self) -> None:
        """Wait until an answer comes or the daemon has read our request, within the timeout."""
        deadline = time.monotonic() + (self.answer_timeout or 0.0)
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.sock], [], [], max(0.0, min(0.25, left)))
            if ready or _unread_by_peer(self.sock) == 0:
                return
            if left <= 0:
                raise ServerUnavailable(self._not_answering())

    def _not_answering(self) -> str:
        return f"the tsd service did not answer in {self.answer_timeout:g}s (systemctl status tsd)"

    def _read_exact(self, n: int) -> bytes:
        chunks: list[bytes] = []
        while n:
            try:
                chunk = self.sock.recv(min(n, 1 << 16))
            except ConnectionError:
                chunk = b""
            if not chunk:
                if self._unanswered and self.answer_timeout is not None:
                    # systemd closes the socket, dropping the connections nobody
                    # accepted, when it gives up starting the service.
                    raise ServerUnavailable(NOT_RUNNING)
                raise ServerUnavailable("the daemon closed the connection")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def fileno(self) -> int:
        """For select(): readable when the daemon has sent something."""
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def _unread_by_peer(sock: Socket) -> int:
    """Bytes we sent that the other end has not read yet (SIOCOUTQ); 0 when unknown."""
    import fcntl
    import termios

    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0  # cannot tell: trust the daemon rather than time out a long wait
    return int(unpack("i", buf)[0])


def _check(frame: "dict[str, Any]") -> "dict[str, Any]":
    ok = frame.get("ok")
    if ok is True:
        return frame
    if ok is False:
        raise from_wire(str(frame.get("code", "error")), str(frame.get("error", "unknown error")))
    raise ProtocolError("malformed response from the daemon")


def group_advice(member: bool, in_session: bool, group: str = SUBMIT_GROUP) -> str:
    """What a user refused by the system socket should do, given their membership.

    `member`: /etc/group (or the primary group) lists them; `in_session`: this
    process has the group. Group changes reach only new logins, so a user just
    added must log in again, not ask an admin a second time.
    """
    if in_session:
        return f"you are in group {group}, so ask an admin to check the socket's group and mode"
    if member:
        return (
            f"you were added to group {group} after this session began: "
            f"log in again (or run `newgrp {group}`)"
        )
    return f"ask an admin to add you to group {group}"


def tsd_group_advice(group: str = SUBMIT_GROUP) -> str:
    """group_advice() for the calling user, from the group database and os.getgroups()."""
    import grp
    import os  # an error's path only (see tsd.leanos)
    import pwd

    try:
        gid = grp.getgrnam(group).gr_gid
        members = grp.getgrnam(group).gr_mem
    except KeyError:
        return group_advice(False, False, group)
    try:
        me = pwd.getpwuid(os.getuid())
        member = me.pw_name in members or me.pw_gid == gid
    except KeyError:
        member = False
    in_session = gid in os.getgroups() or os.getegid() == gid
    return group_advice(member, in_session, group)


class Client:
    """Talks to the daemon `ts` should use, starting a personal one if there is none.

    Before sending anything it verifies the daemon: the socket's directory must
    belong to a trusted uid and be writable by nobody else, and the process that
    listens must run as a trusted uid (SO_PEERCRED): root for the system socket,
    the user for the personal one, either for a TS_SOCKET path.
    """

    def __init__(self, path: str | None = None, may_start: bool | None = None) -> None:
        chosen, personal = choose_socket()
        self.path = path or chosen
        self.may_start = personal if may_start is None else may_start
        self.trusted = trusted_uids(self.path)

    def connect(self) -> Connection:
        """Open a connection, starting the personal daemon on the first call."""
        check_socket_dir(self.path, self.trusted)
        try:
            return self._connect_once()
        except Untrusted:
            raise
        except OSError as exc:
            if not self.may_start or exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                raise self._unavailable(exc) from None
        self._start_daemon()
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.002
        while True:
            try:
                return self._connect_once()
            except Untrusted:
                raise
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise self._unavailable(exc) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def _connect_once(self) -> Connection:
        sock = Socket(AF_UNIX, SOCK_STREAM)
        try:
            # connect() blocks while the listener's backlog is full.
            sock.settimeout(ANSWER_TIMEOUT)
            sock.connect(self.path)
            sock.settimeout(None)
            pid, uid = peer_uid(sock)
        except OSError:
            sock.close()
            raise
        if uid not in self.trusted:
            sock.close()
            raise Untrusted(
                f"{self.path} is served by uid {uid}, not by "
                f"{' or '.join(f'uid {u}' for u in sorted(self.trusted))}: refusing to talk to it"
            )
        # pid 1 listening: socket activation. systemd accepts connections for a
        # daemon that may be failing to start, so bound the wait for it.
        return Connection(sock, ANSWER_TIMEOUT if pid == 1 else None)

    def _unavailable(self, exc: OSError) -> ServerUnavailable:
        if exc.errno == errno.EACCES and self.path == SYSTEM_SOCKET:
            return ServerUnavailable(f"permission denied on {self.path}: {tsd_group_advice()}")
        if self.path == SYSTEM_SOCKET and exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return ServerUnavailable(f"{NOT_RUNNING}; TS_PERSONAL=1 runs a personal daemon")
        if isinstance(exc, TimeoutError):
            return ServerUnavailable(f"the tsd daemon at {self.path} does not accept connections")
        return ServerUnavailable(f"cannot reach the tsd daemon at {self.path}: {exc.strerror}")

    def _start_daemon(self) -> None:
        # The daemon locks its state dir, so racing clients starting two daemons is harmless:
        # the loser exits and everyone connects to the winner.
        import subprocess  # only on the first call: keep it off every other start

        env = dict(leanos.environ())
        subprocess.Popen(
            [sys.executable, "-m", "tsd.daemon_entry", "--user", "--socket", self.path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            env=env,
            cwd="/",
        )

    def call(self, req: "Req") -> "dict[str, Any]":
        """One request, one final response; errors come back as TsdError.

        A long job list arrives in pieces (`jobs` or `rows` events, each under
        the frame limit) before the final frame: records are put back together
        in `jobs`; pieces of rows are listed in `pieces`, the final frame last.
        """
        conn = self.connect()
        jobs: list[Any] = []
        pieces: list[dict[str, Any]] = []  # of a listing in rows (tsd.codec.piece)
        try:
            conn.send(req)
            while True:
                frame = conn.recv()
                event = frame.get("event")
                if event == "jobs":
                    piece = frame.get("jobs")
                    if not isinstance(piece, list):
                        raise ProtocolError("malformed job list from the daemon")
                    jobs.extend(piece)
                elif event == "rows":
                    pieces.append(frame)
                elif event is None:
                    final = _check(frame)
                    if jobs:
                        last = final.get("jobs") or []
                        if not isinstance(last, list):
                            raise ProtocolError("malformed job list from the daemon")
                        final["jobs"] = jobs + last
                    if "rows" in final:
                        # Every piece of the listing in order, the final frame's last.
                        final["pieces"] = [*pieces, final]
                    return final
        finally:
            conn.close()

    def stream(self, req: "Req") -> "Iterator[dict[str, Any]]":
        """Events of a streaming request, then its final response (last item)."""
        conn = self.connect()
        try:
            conn.send(req)
            while True:
                frame = conn.recv()
                if "event" in frame:
                    yield frame
                    continue
                yield _check(frame)
                return
        finally:
            conn.close()


__all__ = [
    "Client",
    "Connection",
    "TsdError",
    "Untrusted",
    "check_socket_dir",
    "choose_socket",
    "personal_socket_path",
    "system_service_installed",
    "trusted_uids",
]

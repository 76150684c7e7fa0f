"""The spawner: a small process that forks job supervisors for the daemon.

Forking the daemon costs what its size costs (page tables copied, pages copied
on write, all of it torn down at exit), twice per job: once for the supervisor,
once for the job. The spawner is a fresh Python that loads only tsd.launch, so
both forks are forks of a small process. The daemon starts it with exec at its
own start (tsd.spawnlink) and talks to it over a socketpair only the two hold:
the spawner takes requests from nobody else, and it does nothing but fork
supervisors, so on the system service (where it runs as root, like the daemon)
everything a job runs still goes through tsd.launch's privilege drop.

Once loaded, it says so (READY); then one request at a time, in order, answered
before the next is read:

    daemon -> spawner   header (body length) + marshal(plan fields), and by
                        SCM_RIGHTS: go pipe read end, report pipe write end,
                        and the ts -n output fds, if any
    spawner -> daemon   (pid, start time), and by SCM_RIGHTS a pidfd of the new
                        supervisor; or (-errno, 0) when fork failed

A plan with `reuse` (the personal daemon's) goes to an idle supervisor of the
pool (_Pool) when there is one: the same pid, start time and pidfd come back,
and the supervisor runs that job next. Other plans, and reusable ones when none
is idle, get a new fork.

The supervisors are the spawner's children (it reaps them), and they outlive it:
they are setsid'd, the spawner exits once the daemon's end of the socket closes
(its daemon stopped or died), a pooled supervisor exits once its job is over
and the spawner is gone, and the daemon follows each job by its report pipe,
not as the supervisor's parent. Nothing here blocks on anything but the
daemon's socket and a pooled supervisor's link.
"""

from __future__ import annotations

import contextlib
import errno
import marshal
import os
import select
import signal
import socket
import struct
from dataclasses import dataclass, fields
from typing import NoReturn

from tsd import launch, privdrop

HEADER = struct.Struct("=I")  # length of the marshalled plan that follows
REPLY = struct.Struct("=iq")  # pid (or -errno), start time (-1: unknown)
READY = b"R"  # sent once, when the spawner has loaded and may be asked
MAX_FDS = 4  # go, report, and ts -n's stdout and stderr
MAX_BODY = 64 << 20  # a plan is a command and an environment: far below this
# The plan's fields that travel in the body; the fds travel beside it.
PLAN_FIELDS = tuple(f.name for f in fields(launch.LaunchPlan) if f.name != "out_fds")


def encode(plan: launch.LaunchPlan) -> bytes:
    """The request body for `plan` (header included), without its fds."""
    values = {name: getattr(plan, name) for name in PLAN_FIELDS}
    values["env"] = dict(plan.env)
    body = marshal.dumps(values)
    return HEADER.pack(len(body)) + body


def decode(body: bytes, out_fds: tuple[int, int] | None) -> launch.LaunchPlan:
    """The plan of a request body, with the received output fds."""
    values = marshal.loads(body)
    if not isinstance(values, dict) or set(values) != set(PLAN_FIELDS):
        raise ValueError("not a launch plan")
    return launch.LaunchPlan(**values, out_fds=out_fds)


def fds_space() -> int:
    """Ancillary buffer size for the most fds a message carries."""
    return socket.CMSG_SPACE(MAX_FDS * 4)


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds an SCM_RIGHTS message brought (all of them, to close what is unwanted)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"={usable // 4}i", data[:usable]))
    return fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Gone(Exception):
    """The daemon's end of the socket closed."""


def _read_request(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One request: its body and its fds. Raises _Gone at end of file."""
    data, ancdata, _, _ = sock.recvmsg(1 << 16, fds_space(), socket.MSG_CMSG_CLOEXEC)
    fds = received_fds(ancdata)
    try:
        if not data:
            raise _Gone
        while len(data) < HEADER.size:
            more = sock.recv(HEADER.size - len(data))
            if not more:
                raise _Gone
            data += more
        (length,) = HEADER.unpack_from(data)
        if length > MAX_BODY:
            raise ValueError("request too large")
        body = bytearray(data[HEADER.size :])
        while len(body) < length:
            more = sock.recv(min(1 << 20, length - len(body)))
            if not more:
                raise _Gone
            body += more
        return bytes(body), fds
    except BaseException:
        _close(fds)
        raise


IDLE = b"i"  # pooled supervisor -> spawner: its job's turn is over, it may take another
TAKEN = b"t"  # pooled supervisor -> spawner: it holds the request, old signals dropped
MAX_IDLE = 32  # idle pooled supervisors kept; more are let go after a burst


@dataclass
class _Pooled:
    """A reusable supervisor as the spawner sees it: its identity and its link."""

    pid: int
    start: int | None
    pidfd: int  # the spawner's own, duplicated into each answer to the daemon
    link: socket.socket
    idle: bool = False


class _Pool:
    """Supervisors kept for plans with `reuse`: one job at a time each, then the next.

    A fork of even this small process, and the pages the forked Python touches
    before it has started the job, cost several times what the job's own
    posix_spawn does; a supervisor that stays costs them once. Each is linked
    to the spawner by a socketpair: the spawner hands it a request (the same
    bytes and fds the daemon sent) and waits for TAKEN, so that every signal
    sent for its previous job is dropped before the daemon learns it runs the
    next one; it says IDLE when its job's turn is over.
    """

    def __init__(self) -> None:
        self.members: dict[int, _Pooled] = {}  # link fd -> member

    def add(self, member: _Pooled) -> None:
        """A supervisor forked for a reusable plan: busy with that job now."""
        self.members[member.link.fileno()] = member

    def take(self) -> _Pooled | None:
        """An idle member, now busy; None when none is idle."""
        for member in self.members.values():
            if member.idle:
                member.idle = False
                return member
        return None

    def drop(self, member: _Pooled) -> None:
        """Let a member go: at end of file on its link it exits (or it is gone already)."""
        self.members.pop(member.link.fileno(), None)
        member.link.close()
        with contextlib.suppress(OSError):
            os.close(member.pidfd)

    def heard(self, fd: int) -> None:
        """A member's link is readable: IDLE, or end of file (it died)."""
        member = self.members[fd]
        try:
            word = member.link.recv(1)
        except OSError:
            word = b""
        if word != IDLE:
            self.drop(member)
            return
        member.idle = True
        idle = [m for m in self.members.values() if m.idle]
        for extra in idle[MAX_IDLE:]:
            self.drop(extra)

    def hand(self, member: _Pooled, body: bytes, fds: list[int]) -> bool:
        """Give a request to an idle member; False (and the member dropped) if it failed."""
        try:
            data = HEADER.pack(len(body)) + body
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"={len(fds)}i", *fds))]
            # MSG_NOSIGNAL: a member dead since the last select is EPIPE here, not a
            # SIGPIPE that would end the spawner (its signals are at their defaults).
            sent = member.link.sendmsg([data], rights, socket.MSG_NOSIGNAL)
            if sent < len(data):
                member.link.sendall(data[sent:], socket.MSG_NOSIGNAL)
            word = member.link.recv(1)
        except OSError:
            word = b""
        if word == TAKEN:
            return True
        if word:  # it holds the request and said something else: it must not run it
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(member.pidfd, signal.SIGKILL)
        self.drop(member)
        return False


def _answer(sock: socket.socket, pid: int, start: int | None, pidfd: int) -> None:
    sock.sendmsg(
        [REPLY.pack(pid, -1 if start is None else start)],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=i", pidfd))],
    )


def _supervisor_for(sock: socket.socket, body: bytes, fds: list[int], pool: _Pool) -> None:
    """Give a request a supervisor, pooled or forked, and answer with its pid and a pidfd."""
    pidfd = -1
    kept = False
    try:
        try:
            if len(fds) not in (2, 4):
                raise ValueError(f"a request brings 2 or 4 fds, not {len(fds)}")
            go_r, rep_w = fds[:2]
            plan = decode(body, (fds[2], fds[3]) if len(fds) == 4 else None)
        except (ValueError, TypeError, EOFError):
            sock.sendall(REPLY.pack(-errno.EINVAL, -1))
            return
        if plan.reuse:
            member = pool.take()
            while member is not None:
                if pool.hand(member, body, fds):
                    _answer(sock, member.pid, member.start, member.pidfd)
                    return
                member = pool.take()
        try:
            links = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) if plan.reuse else None
            pid = os.fork()
        except OSError as exc:
            sock.sendall(REPLY.pack(-(exc.errno or 1), -1))
            return
        if pid == 0:
            if links is not None:
                run_pooled(plan, go_r, rep_w, links[1].fileno())
            launch.run_supervisor(plan, go_r, rep_w, inherited=False)
        # Before the loop reaps anything: the pid is still ours, not reused.
        pidfd = os.pidfd_open(pid)
        start = launch.proc_start_time(pid)
        if links is not None:
            links[1].close()
            pool.add(_Pooled(pid, start, pidfd, links[0]))
            kept = True
        _answer(sock, pid, start, pidfd)
    finally:
        _close(fds)
        if pidfd >= 0 and not kept:
            os.close(pidfd)


def run_pooled(plan: launch.LaunchPlan, go_r: int, rep_w: int, link_fd: int) -> NoReturn:
    """In a freshly forked child: supervise this job, then each one the spawner hands
    over on `link_fd`, until the spawner lets go (or a job never ran), then exit."""
    code = 70
    try:
        launch.reset_process_state([go_r, rep_w, link_fd, *(plan.out_fds or ())], False)
        launch.become_supervisor()
        link = socket.socket(fileno=link_fd)
        link.setblocking(True)
        while launch.supervise(plan, go_r, rep_w):
            try:
                # IDLE once the job's end is stored (ACK) or its report file written:
                # the spawner hands over no job before this one's end is settled.
                link.sendall(IDLE)
                os.close(rep_w)
                body, fds = _read_request(link)
            except (_Gone, OSError):
                break  # the spawner is gone (its daemon stopped) or let us go
            if len(fds) not in (2, 4):
                break  # closing them: the daemon sees the job's end at once
            go_r, rep_w = fds[:2]
            plan = decode(body, (fds[2], fds[3]) if len(fds) == 4 else None)
            launch.forget_signals()
            link.sendall(TAKEN)
        code = 0
    except BaseException:
        code = 70
    finally:
        os._exit(code)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(sock_fd: int) -> None:
    """Answer the daemon's requests on `sock_fd` until it closes its end."""
    launch.default_signals()
    privdrop.prepare()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
    signal.set_wakeup_fd(wake_w)  # SIGCHLD wakes the select below: supervisors are reaped
    sock = socket.socket(fileno=sock_fd)
    sock.setblocking(True)
    pool = _Pool()
    sock.sendall(READY)
    while True:
        readable, _, _ = select.select([sock_fd, wake_r, *pool.members], [], [])
        if wake_r in readable:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            _reap()
        for fd in readable:
            if fd in pool.members:  # first: a supervisor just idle serves the request below
                pool.heard(fd)
        if sock_fd in readable:
            try:
                body, fds = _read_request(sock)
            except (_Gone, ConnectionError):
                return
            _supervisor_for(sock, body, fds, pool)


def main(argv: list[str]) -> None:
    """Entry point: `python -I -S -c ... ROOT FD` (see tsd.spawnlink)."""
    serve(int(argv[-1]))

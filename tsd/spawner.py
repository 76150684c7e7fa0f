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

Or the body is marshal(("member", exits dir)) with one fd, a socket (the link):
the spawner forks a reused supervisor (the personal daemon's), which keeps the
link and runs, one at a time, each job the daemon sends it there (`run_member`;
the daemon's side is tsd.supervisorpool). A fork of even this small process, and
the pages the forked Python touches before it has started the job, cost several
times what the job's own posix_spawn does; a supervisor that stays costs them
once, and the daemon hands it a job with a plan and a GO, no spawner in between.

The supervisors are the spawner's children (it reaps them), and they outlive it:
they are setsid'd, the spawner exits once the daemon's end of the socket closes
(its daemon stopped or died), a reused supervisor exits once its job is over
and its link is closed, and the daemon follows each job by its report pipe,
not as the supervisor's parent. Nothing here blocks on anything but the
daemon's socket.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import marshal
import operator
import os
import select
import signal
import socket
import struct
import time
from dataclasses import fields
from typing import NoReturn

from tsd import cpupolicy, exitreport, launch, privdrop

HEADER = struct.Struct("=I")  # length of the marshalled plan that follows
REPLY = struct.Struct("=iq")  # pid (or -errno), start time (-1: unknown)
READY = b"R"  # sent once, when the spawner has loaded and may be asked
MAX_FDS = 4  # go, report, and ts -n's stdout and stderr
MAX_BODY = 64 << 20  # a plan is a command and an environment: far below this
LINK_READ = 65536  # bytes a reused supervisor reads at once (a plan is a few KiB)
# The plan's fields, in order, travel in the body as one tuple (no names: cheaper both
# ways); out_fds travels beside it (SCM_RIGHTS), None in its place in the tuple.
PLAN_FIELDS = tuple(f.name for f in fields(launch.LaunchPlan))
_OUT_AT = PLAN_FIELDS.index("out_fds")
_ENV_AT = PLAN_FIELDS.index("env")
_plan_values = operator.attrgetter(*PLAN_FIELDS)


def encode(plan: launch.LaunchPlan) -> bytes:
    """The request body for `plan` (header included), without its fds."""
    values = list(_plan_values(plan))
    values[_OUT_AT] = None
    values[_ENV_AT] = dict(plan.env)  # a plain dict, whatever Mapping the plan holds
    body = marshal.dumps(tuple(values))
    return HEADER.pack(len(body)) + body


def decode(body: bytes, out_fds: tuple[int, int] | None) -> launch.LaunchPlan:
    """The plan of a request body, with the received output fds."""
    values = marshal.loads(body)
    if not isinstance(values, tuple) or len(values) != len(PLAN_FIELDS):
        raise ValueError("not a launch plan")
    fields_ = list(values)
    fields_[_OUT_AT] = out_fds
    return launch.make_plan(*fields_)


def fds_space() -> int:
    """Ancillary buffer size for the most fds a message carries."""
    return socket.CMSG_SPACE(MAX_FDS * 4)


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send `data` with `fds` (SCM_RIGHTS, with its first bytes), all of it. MSG_NOSIGNAL:
    a peer gone is EPIPE here, not a SIGPIPE."""
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"={len(fds)}i", *fds))]
    sent = sock.sendmsg([data], rights, socket.MSG_NOSIGNAL)
    if sent < len(data):
        sock.sendall(data[sent:], socket.MSG_NOSIGNAL)


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
    """One request: its body and its fds, and not a byte more (a reused supervisor's go
    may follow its plan at once). Raises _Gone at end of file."""
    data, ancdata, _, _ = sock.recvmsg(HEADER.size, fds_space(), socket.MSG_CMSG_CLOEXEC)
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


IDLE = b"i"  # reused supervisor -> daemon, on its link: its job's turn is over
BYE = b"q"  # daemon -> reused supervisor: exit (once idle), nothing is left unsent
NEXT = b"p"  # daemon -> reused supervisor: a plan follows (header, body; fds with this byte)
MEMBER = "member"  # marshal((MEMBER, exits dir)): the request for a reused supervisor


def _answer(sock: socket.socket, pid: int, start: int | None, pidfd: int) -> None:
    sock.sendmsg(
        [REPLY.pack(pid, -1 if start is None else start)],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=i", pidfd))],
    )


def _supervisor_for(sock: socket.socket, body: bytes, fds: list[int]) -> None:
    """Fork a supervisor for a plan (it waits for go), or a reused supervisor that waits
    for jobs on its link (the request's one fd), and answer with its pid and a pidfd."""
    pidfd = -1
    try:
        # A member's exits dir, else a plan.
        asked: str | launch.LaunchPlan | None = _member_exits(body) if len(fds) == 1 else None
        try:
            if asked is None:
                if len(fds) not in (2, 4):
                    raise ValueError(f"a request brings 1, 2 or 4 fds, not {len(fds)}")
                asked = decode(body, (fds[2], fds[3]) if len(fds) == 4 else None)
        except (ValueError, TypeError, EOFError):
            sock.sendall(REPLY.pack(-errno.EINVAL, -1))
            return
        try:
            pid = os.fork()
        except OSError as exc:
            sock.sendall(REPLY.pack(-(exc.errno or 1), -1))
            return
        if pid == 0:
            if isinstance(asked, str):
                run_member(fds[0], asked)
            launch.run_supervisor(asked, fds[0], fds[1], inherited=False)
        # Before the loop reaps anything: the pid is still ours, not reused.
        pidfd = os.pidfd_open(pid)
        _answer(sock, pid, launch.proc_start_time(pid), pidfd)
    finally:
        _close(fds)
        if pidfd >= 0:
            os.close(pidfd)


def member_request(exits_dir: str) -> bytes:
    """The request (header included) for a reused supervisor that leaves its marks in
    `exits_dir` (`run_member`)."""
    body = marshal.dumps((MEMBER, exits_dir))
    return HEADER.pack(len(body)) + body


def _member_exits(body: bytes) -> str | None:
    """The exits dir of a request for a reused supervisor; None for any other body."""
    try:
        asked = marshal.loads(body)
    except (ValueError, TypeError, EOFError):
        return None
    ok = isinstance(asked, tuple) and len(asked) == 2 and asked[0] == MEMBER
    return asked[1] if ok and isinstance(asked[1], str) else None


class _Link:
    """A reused supervisor's end of its link: the daemon's messages, in order. What
    comes while the supervisor waits for the answer to its job's end (the next job's
    plan and GO, sent with that answer) is kept for after it.

    It reads what is there at once, not a message at a time: a job's plan, the answer
    before it and its GO come in one send, and cost one read. The fds of a plan come
    with the read that brings its first bytes, and one read never brings the fds of
    two sends (the kernel stops a read after a send that carried fds); every plan
    carries fds and nothing else does, so the k-th plan's are the k-th fds read."""

    def __init__(self, link_fd: int) -> None:
        self.sock = socket.socket(fileno=link_fd)
        self.sock.setblocking(True)
        self._kept: collections.deque[tuple[bytes, bytes, list[int]]] = collections.deque()
        # ACK and NAK read before they were asked for (a job ahead runs meanwhile): the
        # daemon answers ends in the order they came, so the first is the oldest's.
        self._answers: collections.deque[bytes] = collections.deque()
        self._gone = False  # the end of file was read (the daemon is gone)
        self._buf = bytearray()
        self._fds: collections.deque[list[int]] = collections.deque()
        self.acked = False  # the last answer was an ACK: the daemon counts us idle from it

    def next(self) -> tuple[bytes, bytes, list[int]]:
        """The next message but answers: (NEXT, body, fds) for a plan, else (word, b"",
        []); the word is b"" at the end of file (the daemon is gone) or on an error."""
        while True:
            if self._kept:
                return self._kept.popleft()
            message = self._route(self._read())
            if message is not None:
                return message

    def answer(self) -> bytes:
        """The daemon's answer to the job's end (ACK, NAK, or b"" when it is gone)."""
        while not self._answers and not self._gone:
            message = self._route(self._read())
            if message is not None:
                self._kept.append(message)
        word = self._answers.popleft() if self._answers else b""
        self.acked = word == launch.ACK
        return word

    def answer_now(self) -> bytes | None:
        """answer() if it came (what is there is read, without waiting for more); None
        when it has not."""
        while not self._answers and not self._gone and (self._buf or _readable(self.sock)):
            message = self._route(self._read())
            if message is not None:
                self._kept.append(message)
        if not self._answers and not self._gone:
            return None
        return self.answer()

    def has_plan(self) -> bool:
        """Whether a plan was read and waits: one sent ahead, if no answer came with it."""
        return any(kind == NEXT for kind, _, _ in self._kept)

    def idle(self) -> None:
        """Say IDLE, unless the job's end was ACKed: the daemon takes the ACK for it
        (tsd.supervisorpool). With the daemon gone, a plan kept may still wait for
        its "aborted" report: no error here, the end of file is read next."""
        if self.acked:
            self.acked = False
            return
        with contextlib.suppress(OSError):
            self.sock.send(IDLE, socket.MSG_NOSIGNAL)

    def _route(
        self, message: tuple[bytes, bytes, list[int]]
    ) -> tuple[bytes, bytes, list[int]] | None:
        """An answer goes to the answers (None); anything else is the caller's."""
        if message[0] in (launch.ACK, launch.NAK):
            self._answers.append(message[0])
            return None
        if message[0] == b"":
            self._gone = True
        return message

    def _fill(self, need: int) -> bool:
        """Read until the buffer holds `need` bytes; False at the end of file or on an
        error."""
        while len(self._buf) < need:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(
                    LINK_READ, fds_space(), socket.MSG_CMSG_CLOEXEC)
            except OSError:
                return False
            fds = received_fds(ancdata)
            if fds:
                self._fds.append(fds)
            if not data:
                return False
            self._buf += data
        return True

    def _read(self) -> tuple[bytes, bytes, list[int]]:
        if not self._fill(1):
            return b"", b"", []
        word = bytes(self._buf[:1])
        if word != NEXT:
            del self._buf[:1]
            return word, b"", []
        head = 1 + HEADER.size
        if not self._fill(head):
            return b"", b"", []
        (length,) = HEADER.unpack_from(self._buf, 1)
        if length > MAX_BODY or not self._fill(head + length):
            return b"", b"", []
        body = bytes(self._buf[head : head + length])
        del self._buf[: head + length]
        return NEXT, body, self._fds.popleft() if self._fds else []


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


@dataclasses.dataclass
class _Unanswered:
    """A job's end sent to the daemon, its answer not read yet: the next job, sent
    ahead, started at once (its report pipe stays open until then)."""

    plan: launch.LaunchPlan
    report: exitreport.ExitReport
    rep_w: int

    def settle(self, link: _Link, word: bytes) -> None:
        """The answer came (b"": the daemon is gone): the report file unless ACKed,
        the pipe's end of file, and IDLE for the job unless ACKed."""
        launch.settle(self.plan, self.report, word)
        os.close(self.rep_w)
        link.idle()


def _take(plan: launch.LaunchPlan, rep_w: int) -> bool:
    """Whether to start a job sent ahead, now that the job before it ended: TAKING is
    written before the clock is read, so that a daemon which finds no TAKING at the
    deadline knows the job is given back; past the deadline it is, with BACK."""
    launch.report_line(rep_w, launch.TAKING)
    assert plan.ahead_until is not None
    if time.monotonic() < plan.ahead_until:
        return True
    launch.report_line(rep_w, launch.BACK)
    return False


def run_member(link_fd: int, exits_dir: str) -> NoReturn:
    """In a freshly forked child: a reused supervisor. It runs each job its daemon sends
    on `link_fd` (the job's plan with its GO, in one message, sent once the job is
    stored as running), says IDLE after each whose end the daemon did not ACK (an
    ACK says it for us), and exits once the daemon lets it go (BYE) or is gone (end
    of file). The next job may come while it waits for the answer to its job's end
    (tsd.supervisorpool): it is taken up after that answer.

    A daemon gone without a BYE (it died) may have recorded a job as running on this
    supervisor and died before sending it: an idle supervisor leaves a mark in
    `exits_dir` then (tsd.exitreport.mark_idle), so that the next daemon queues that
    job again rather than take it for a job whose supervisor vanished. A plan cut off
    before its GO (the daemon died while sending it) leaves an "aborted" exit report,
    as a job supervisor whose go pipe closed does (tsd.launch)."""
    code = 70
    try:
        launch.reset_process_state([link_fd], False)
        launch.become_supervisor()
        cpupolicy.yield_to_jobs()
        link = _Link(link_fd)
        unanswered: _Unanswered | None = None

        def settle_unanswered() -> None:
            nonlocal unanswered
            if unanswered is not None:
                done, unanswered = unanswered, None
                done.settle(link, link.answer())

        def answer_or_later() -> bytes:
            settle_unanswered()  # the daemon answers ends in order: that one's first
            word = link.answer_now()
            if word is not None:
                return word
            return launch.LATER if link.has_plan() else link.answer()

        def poll() -> bool:
            nonlocal unanswered
            if unanswered is None:
                return False
            word = link.answer_now()
            if word is None:
                return True
            done, unanswered = unanswered, None
            done.settle(link, word)
            return False

        gave_back = False  # a job sent ahead was given back (see the mark below)
        while True:
            if not link.has_plan():
                settle_unanswered()  # nothing to start meanwhile: wait for the answer
            kind, body, fds = link.next()
            if kind != NEXT or len(fds) not in (1, 3):
                _close(fds)
                settle_unanswered()
                # The daemon died (see above), or let us go after we gave a job back
                # that it may not have heard of (it stopped): the next daemon queues
                # such a job again from the mark, as one never sent.
                if kind == b"" or gave_back:
                    me = os.getpid()
                    exitreport.mark_idle(exits_dir, me, launch.proc_start_time(me))
                break  # let go, gone, or not a daemon we know
            rep_w = fds[0]
            plan = decode(body, (fds[1], fds[2]) if len(fds) == 3 else None)
            if link.next()[0] != launch.GO:
                _close(fds)
                # One try, as a job supervisor does (tsd.launch.supervise).
                exitreport.write(plan.exits_dir, plan.job_id, exitreport.ABORTED)
                settle_unanswered()
                break
            if plan.ahead_until is not None and not _take(plan, rep_w):
                # Given back: the daemon queues it again (or, gone, queues it again
                # from this supervisor's idle mark). Its turn is over.
                _close(fds)
                gave_back = True
                link.acked = False
                link.idle()
                continue
            # Signals sent for the previous job (a ts -k that crossed its end) are not
            # for this one; the daemon sends none for this one before its "pid" line.
            launch.forget_signals()
            pending: exitreport.ExitReport | None = None
            try:
                pending = launch.run_job(
                    plan, rep_w, answer_or_later if launch.acks_end(plan) else None,
                    poll if unanswered is not None else None,
                )
            finally:
                if pending is None:
                    os.close(rep_w)  # the job's end of file, then: idle
            if pending is None:
                link.idle()
            else:
                unanswered = _Unanswered(plan, pending, rep_w)
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
    sock.sendall(READY)
    while True:
        readable, _, _ = select.select([sock_fd, wake_r], [], [])
        if wake_r in readable:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            _reap()
        if sock_fd in readable:
            try:
                body, fds = _read_request(sock)
            except (_Gone, ConnectionError):
                return
            _supervisor_for(sock, body, fds)


def main(argv: list[str]) -> None:
    """Entry point: `python -I -S -c ... ROOT FD` (see tsd.spawnlink)."""
    serve(int(argv[-1]))

"""The asyncio unix-socket server: framing, identity, limits; one task per connection.

It knows nothing of jobs. It reads one request frame, identifies the caller by
SO_PEERCRED, hands the typed request to the daemon's handler and writes back
its events and final response (tsd.protocol's dataclasses, encoded here).
A malformed, oversized or missing frame costs the daemon one log line and
that one connection, nothing else.

It also keeps one user from taking the service away from the others: each
user may hold only so many connections (and so many waiting `ts -w` calls) at
once, the excess getting one error frame; all users together stay below the
process's file limit, and past the overall cap the server stops accepting
(callers wait in the listen backlog) instead of running out of descriptors.
Should descriptors run out anyway (EMFILE on accept), accepting pauses until
a connection closes or a second has passed, with one log line a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import errno
import logging
import os
import resource
import socket
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tsd import protocol
from tsd.auth import peer_credentials
from tsd.errors import Internal, ProtocolError, TooManyConnections, TsdError

log = logging.getLogger("tsd.server")

READ_TIMEOUT = 30.0  # a client that connects and says nothing is dropped after this
SD_LISTEN_FDS_START = 3
# Descriptors kept for everything but connections: the database, the log, and a
# pidfd and a report pipe per running job. Connections get the rest, at most.
FD_RESERVE = 256
ACCEPT_BATCH = 64  # connections accepted per wakeup, so a flood cannot starve other work
OUT_OF_FDS_RETRY = 1.0  # seconds before trying accept() again when nothing closed meanwhile
OUT_OF_FDS_LOG_EVERY = 60.0  # at most one log line per this many seconds while out of fds
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# Descriptors a request may carry (SCM_RIGHTS): `ts -n`'s stdout and stderr, nothing else.
MAX_PASSED_FDS = 2
RECV_CHUNK = 65536

SendEvent = Callable[[protocol.Event], Awaitable[None]]
Handler = Callable[
    [tuple[int, int, int], protocol.Request, SendEvent], Awaitable[protocol.Response]
]
_Write = Callable[[dict[str, Any]], Awaitable[None]]

# Whether the caller of the request being handled is still connected. Set for each
# connection's handler task (a contextvar: the handler signature stays as it is).
_caller_there: contextvars.ContextVar[Callable[[], bool]] = contextvars.ContextVar(
    "tsd_caller_there", default=lambda: True
)


def caller_still_there() -> bool:
    """Whether the client of the request being handled has not hung up yet.

    A handler asks right before it commits something the client must hear about
    (a submit): a client that gave up (Ctrl-C, a timeout, killed) would otherwise
    leave a job it believes was never queued. True outside a connection.
    """
    return _caller_there.get()()


def _peer_open(fd: int) -> bool:
    """The client has not closed its end: no EOF waiting in the socket."""
    try:
        peek = socket.socket(fileno=fd)  # borrows the fd; detach() below, never close
    except OSError:
        return False
    try:
        return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return True  # nothing to read, no EOF: still connected
    except OSError:
        return False  # reset
    finally:
        peek.detach()


def inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed us (socket activation), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    sock.set_inheritable(False)
    return sock


def bind_personal(path: str) -> socket.socket:
    """Bind the personal socket in a 0700 directory, recovering a stale socket file.

    Raises FileExistsError when a live daemon already answers on `path`.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    # Someone else's directory (or a symlink planted in /tmp) must not get our socket.
    if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{directory} is not a directory of ours")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(directory, 0o700)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: its daemon is gone
        else:
            raise FileExistsError(f"a daemon already listens on {path}")
        finally:
            probe.close()
    return _listen(path, 0o077)


def bind_system(path: str, group: str) -> socket.socket:
    """Without socket activation: make the system socket root:`group` 0660 ourselves."""
    import grp

    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = _listen(path, 0o117)
    try:
        os.chown(path, 0, grp.getgrnam(group).gr_gid)
    except KeyError:
        os.chmod(path, 0o600)
    return sock


def _listen(path: str, umask: int) -> socket.socket:
    # The umask makes the socket file's mode right from the start, not after a chmod.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(umask)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections the server holds open at once; None: no per-user cap.

    Over `total` the server stops accepting and callers wait in the listen
    backlog (task-spooler's TS_MAXCONN behaviour); over a per-user cap the
    caller gets one error frame and the connection is closed. root is never
    capped per user (an admin must always get through), only counted.
    """

    total: int = 1000
    per_user: int | None = None
    waiting_per_user: int | None = None


def descriptor_budget() -> int:
    """The most connections this process can hold and still have descriptors for the rest.

    Half the soft RLIMIT_NOFILE at least, FD_RESERVE below it at most.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft // 2, soft - FD_RESERVE)


class Server:
    """Serves requests on a listening unix socket, within `limits()` (read at each accept)."""

    def __init__(
        self, sock: socket.socket, handler: Handler, limits: Callable[[], ConnectionLimits],
        durable: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.sock = sock
        self.handler = handler
        self.limits = limits
        # Until everything the daemon changed so far is on disk (tsd.jobtable's
        # `durable`): awaited before any frame goes out, so no answer gets ahead of
        # the state it tells of. StorageFull when that state was rolled back.
        self.durable = durable
        self.fd_budget = descriptor_budget()
        self.tasks: set[asyncio.Task[None]] = set()
        self.open = 0  # accepted and not yet closed
        self.per_uid: Counter[int] = Counter()
        self.waiting: Counter[int] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        self._out_of_fds_since: float | None = None
        self._out_of_fds_logged = 0.0
        self._out_of_fds_count = 0

    def cap(self) -> int:
        """Connections open at once, all users together: below the file limit."""
        return max(1, min(self.limits().total, self.fd_budget))

    async def start(self) -> None:
        """Start accepting connections."""
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        limits = self.limits()
        log.info(
            "at most %d connections at once (file limit allows %d), %s per user, %s waiting",
            self.cap(), self.fd_budget, limits.per_user or "any", limits.waiting_per_user or "any",
        )
        self._resume()

    async def close(self) -> None:
        """Stop accepting and drop open connections."""
        self._closed = True
        self._pause()
        for task in list(self.tasks):
            task.cancel()

    # -- accepting, paused at the cap and when descriptors run out

    def _resume(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._closed or self._accepting or self.open >= self.cap() or self._loop is None:
            return
        self._loop.add_reader(self.sock.fileno(), self._accept_ready)
        self._accepting = True

    def _pause(self) -> None:
        if self._accepting and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self._accepting = False

    def _accept_ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.open >= self.cap():
                # Callers wait in the kernel's backlog until a connection closes.
                self._pause()
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    self._out_of_fds(exc)
                else:  # ECONNABORTED and the like: that caller is gone, nobody else is
                    log.debug("accept: %s", exc)
                return
            self._fds_back()
            self._start_connection(conn)

    def _out_of_fds(self, exc: OSError) -> None:
        # The listening socket stays readable while the backlog is full: watching it
        # now would spin. Try again when a connection closes, or after a pause
        # (jobs that end free descriptors too).
        self._pause()
        assert self._loop is not None
        if self._retry is None:
            self._retry = self._loop.call_later(OUT_OF_FDS_RETRY, self._resume)
        now = time.monotonic()
        self._out_of_fds_count += 1
        if self._out_of_fds_since is None:
            self._out_of_fds_since = now
        if now - self._out_of_fds_logged >= OUT_OF_FDS_LOG_EVERY or self._out_of_fds_count == 1:
            self._out_of_fds_logged = now
            log.warning(
                "out of file descriptors (%s) with %d connections open: not accepting until "
                "some close (logged once a minute)", exc.strerror, self.open,
            )

    def _fds_back(self) -> None:
        if self._out_of_fds_since is not None:
            log.info(
                "accepting connections again after %.0fs out of file descriptors",
                time.monotonic() - self._out_of_fds_since,
            )
            self._out_of_fds_since = None
            self._out_of_fds_count = 0

    def _start_connection(self, conn: socket.socket) -> None:
        assert self._loop is not None
        try:
            creds = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        conn.setblocking(False)
        self.open += 1
        # Decided now, in accept order: later connections must not count against this
        # one. A refused connection lives only to carry its error: it counts toward
        # the total (a descriptor), not toward its user's cap.
        refused = self._over_cap(creds[1], waiting=False)
        if refused is None:
            self.per_uid[creds[1]] += 1
        task = self._loop.create_task(self._connection(conn, creds, refused))
        self.tasks.add(task)

    def _connection_closed(self, uid: int, counted: bool) -> None:
        self.open -= 1
        if counted:
            self.per_uid[uid] -= 1
            if self.per_uid[uid] <= 0:
                del self.per_uid[uid]
        self._resume()

    async def _connection(
        self, conn: socket.socket, creds: tuple[int, int, int], refused: TsdError | None
    ) -> None:
        # The bare socket throughout, no asyncio streams: descriptors ride beside the
        # request's bytes (streams would drop them, and the kernel close them), and a
        # stream's transport and protocol cost more than the few sends a connection makes.
        task = asyncio.current_task()
        passed = protocol.PassedFds(())
        try:
            frame: bytes | TsdError | None = None
            if refused is None:
                frame = await _read_frame(conn, passed)
            await self._serve(conn, creds, refused, frame, passed)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except OSError as exc:
            log.warning("connection from pid %d: %s", creds[0], exc)
        finally:
            passed.close()  # whatever the request did not take: none stays in the daemon
            if task is not None:
                self.tasks.discard(task)
            conn.close()
            self._connection_closed(creds[1], counted=refused is None)

    def _over_cap(self, uid: int, waiting: bool) -> TooManyConnections | None:
        """The error for a new connection (or, `waiting`, a new wait) over a per-user cap."""
        if uid == 0:
            return None
        limits = self.limits()
        if not waiting and limits.per_user is not None and self.per_uid[uid] >= limits.per_user:
            return TooManyConnections(
                f"too many connections from uid {uid} at once (at most {limits.per_user}); "
                "try again when some of yours have ended"
            )
        if waiting and limits.waiting_per_user is not None and (
            self.waiting[uid] >= limits.waiting_per_user
        ):
            return TooManyConnections(
                f"too many waiting calls (ts -w/-t/-c/-f) from uid {uid} at once "
                f"(at most {limits.waiting_per_user})"
            )
        return None

    async def _serve(
        self,
        conn: socket.socket,
        creds: tuple[int, int, int],
        refused: TsdError | None,
        frame: bytes | TsdError | None,
        passed: protocol.PassedFds,
    ) -> None:
        loop = asyncio.get_running_loop()

        async def write(frame: dict[str, Any]) -> None:
            if self.durable is not None and frame.get("ok") is not False:  # not errors
                await self.durable()
            await loop.sock_sendall(conn, protocol.encode(frame))

        async def send(event: protocol.Event) -> None:
            await write(event.to_wire())

        if refused is not None:
            # Answer before reading: the caller's request is never looked at.
            await _reply_error(write, refused)
            return
        if frame is None:
            return  # said nothing, or hung up mid-frame: nobody to answer
        try:
            if isinstance(frame, TsdError):
                raise frame
            request = protocol.parse_request(protocol.decode(frame))
        except TsdError as exc:
            log.info("pid %d uid %d: %s", creds[0], creds[1], exc)
            await _reply_error(write, exc)
            return
        request = _with_fds(request, passed)

        waiting = isinstance(request, protocol.Wait)
        if waiting:
            refused = self._over_cap(creds[1], waiting=True)
            if refused is not None:
                await _reply_error(write, refused)
                return
            self.waiting[creds[1]] += 1
        try:
            await self._answer(loop, conn.fileno(), write, creds, request, send)
        finally:
            if waiting:
                self.waiting[creds[1]] -= 1
                if self.waiting[creds[1]] <= 0:
                    del self.waiting[creds[1]]

    async def _answer(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        write: _Write,
        creds: tuple[int, int, int],
        request: protocol.Request,
        send: SendEvent,
    ) -> None:
        # The caller may hang up while we wait for a job: stop waiting then. Anything
        # readable on the socket once the request is read (its end of file, or bytes
        # it had no business sending) cancels the handling, in this task.
        task = asyncio.current_task()
        gone = False

        def hung_up() -> None:
            nonlocal gone
            loop.remove_reader(fd)
            gone = True
            if task is not None:
                task.cancel()

        _caller_there.set(lambda: not gone and _peer_open(fd))
        # The answer is written by the task that computed it, in the same step where
        # nothing had to wait: a waiter woken by a job's end answers before whatever
        # the loop does next (the next job's launch).
        loop.add_reader(fd, hung_up)
        try:
            await self._handle_and_answer(write, creds, request, send)
        finally:
            if not gone:
                loop.remove_reader(fd)

    async def _handle_and_answer(
        self,
        write: _Write,
        creds: tuple[int, int, int],
        request: protocol.Request,
        send: SendEvent,
    ) -> None:
        try:
            response = await self.handler(creds, request, send)
            await write({"ok": True, **response.to_wire()})
        except TsdError as exc:
            await _reply_error(write, exc)
        except ConnectionError:
            pass  # the caller is gone: nobody to answer
        except Exception:
            log.exception("internal error serving %s", type(request).__name__)
            await _reply_error(write, Internal("internal error in the daemon (see its log)"))


def _with_fds(request: protocol.Request, passed: protocol.PassedFds) -> protocol.Request:
    """The request with the descriptors that came with it, where they belong.

    Only a `ts -n` submit may carry them, exactly two (its stdout and stderr);
    on any other request they stay in `passed`, which the connection closes.
    """
    if (
        isinstance(request, protocol.Submit)
        and not request.spec.store_output
        and len(passed.peek()) == MAX_PASSED_FDS
    ):
        return dataclasses.replace(request, terminal=passed)
    return request


async def _read_frame(conn: socket.socket, passed: protocol.PassedFds) -> bytes | TsdError | None:
    """The request frame's body read off the bare socket, with the descriptors sent
    beside it collected in `passed`; an error to answer; None when the caller hung
    up or said nothing within READ_TIMEOUT (nobody to answer).

    More than MAX_PASSED_FDS descriptors, or a truncated control message, is an
    error; the ones received are closed with `passed` either way.
    """
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            header = await _recv_exactly(conn, protocol.HEADER.size, passed)
            if header is None:
                return None
            length = protocol.frame_length(header)
            return await _recv_exactly(conn, length, passed)
    except TimeoutError:
        return None
    except TsdError as exc:
        return exc


async def _recv_exactly(conn: socket.socket, n: int, passed: protocol.PassedFds) -> bytes | None:
    """`n` bytes (None on EOF first), collecting any descriptors that come with them."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < n:
        try:
            # MSG_CMSG_CLOEXEC: a received descriptor must never reach a process the
            # daemon starts unless it is handed over on purpose.
            chunk, fds, flags, _ = socket.recv_fds(
                conn, min(n - len(data), RECV_CHUNK), MAX_PASSED_FDS, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            await _readable(loop, conn)
            continue
        passed.add(tuple(fds))
        if flags & socket.MSG_CTRUNC or len(passed.peek()) > MAX_PASSED_FDS:
            # The kernel dropped the descriptors that did not fit; close the rest.
            passed.close()
            raise ProtocolError(f"a request carries at most {MAX_PASSED_FDS} descriptors")
        if not chunk:
            return None
        data += chunk
    return bytes(data)


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(conn.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())


async def _reply_error(write: _Write, exc: TsdError) -> None:
    with contextlib.suppress(ConnectionError, ProtocolError):
        await write({"ok": False, "code": exc.code, "error": exc.message})

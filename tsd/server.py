"""The asyncio unix-socket server: framing, identity, limits; one task per connection.

It knows nothing of jobs. It reads one request frame, identifies the caller by
SO_PEERCRED, hands the typed request to the daemon's handler and writes back
its events and final response (tsd.protocol's dataclasses, encoded here).
A malformed, oversized or missing frame costs the daemon one log line and
that one connection, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

from tsd import protocol
from tsd.auth import peer_credentials
from tsd.errors import Internal, ProtocolError, TsdError

log = logging.getLogger("tsd.server")

READ_TIMEOUT = 30.0  # a client that connects and says nothing is dropped after this
SD_LISTEN_FDS_START = 3

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


def _peer_open(reader: asyncio.StreamReader, fd: int) -> bool:
    """The client has not closed its end: no EOF seen or waiting in the socket."""
    if reader.at_eof():
        return False
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


class Server:
    """Serves requests on a listening unix socket."""

    def __init__(self, sock: socket.socket, handler: Handler, max_connections: int) -> None:
        self.sock = sock
        self.handler = handler
        self.slots = asyncio.Semaphore(max(1, max_connections))
        self.server: asyncio.base_events.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Start accepting connections."""
        self.sock.setblocking(False)
        self.server = await asyncio.start_unix_server(self._connection, sock=self.sock)

    async def close(self) -> None:
        """Stop accepting and drop open connections."""
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            # TS_MAXCONN: callers beyond the limit wait, as task-spooler's do.
            async with self.slots:
                await self._serve(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self.tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        creds = peer_credentials(sock)

        async def write(frame: dict[str, Any]) -> None:
            writer.write(protocol.encode(frame))
            await writer.drain()

        async def send(event: protocol.Event) -> None:
            await write(event.to_wire())

        try:
            header = await asyncio.wait_for(reader.readexactly(protocol.HEADER.size), READ_TIMEOUT)
            length = protocol.frame_length(header)
            body = await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT)
            request = protocol.parse_request(protocol.decode(body))
        except (asyncio.IncompleteReadError, TimeoutError):
            return  # said nothing, or hung up mid-frame: nobody to answer
        except TsdError as exc:
            log.info("pid %d uid %d: %s", creds[0], creds[1], exc)
            await _reply_error(write, exc)
            return

        # The caller may hang up while we wait for a job: stop waiting then.
        fd = sock.fileno()
        _caller_there.set(lambda: _peer_open(reader, fd))
        handling = asyncio.ensure_future(self.handler(creds, request, send))
        hangup = asyncio.ensure_future(reader.read(1))
        try:
            done, _ = await asyncio.wait({handling, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if handling not in done:
                handling.cancel()
                return
            try:
                response = handling.result()
            except TsdError as exc:
                await _reply_error(write, exc)
                return
            except Exception:
                log.exception("internal error serving %s", type(request).__name__)
                await _reply_error(write, Internal("internal error in the daemon (see its log)"))
                return
            await write({"ok": True, **response.to_wire()})
        finally:
            hangup.cancel()
            if not handling.done():
                handling.cancel()


async def _reply_error(write: _Write, exc: TsdError) -> None:
    with contextlib.suppress(ConnectionError, ProtocolError):
        await write({"ok": False, "code": exc.code, "error": exc.message})

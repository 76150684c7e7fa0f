"""Connect to a daemon and call it; start the personal daemon when needed.

Kept light on purpose: `ts` imports this on every call, so it pulls in only
the standard library and the error tree; the protocol (thirty dataclasses)
loads when a request is first sent, since queueing a job (tsd.cli's quick
submit) sends its frame without it.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping

from tsd import framing
from tsd.errors import ProtocolError, ServerUnavailable, TsdError, from_wire

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ts a few ms at start and only mypy needs it here
    from typing import Any

    from tsd import protocol

SYSTEM_SOCKET = "/run/tsd/tsd.sock"
START_TIMEOUT = 10.0


def personal_socket_path(env: Mapping[str, str] | None = None) -> str:
    """`$XDG_RUNTIME_DIR/tsd/tsd.sock`, else `$TMPDIR/tsd-<uid>/tsd.sock` (DESIGN.md)."""
    env = os.environ if env is None else env
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "tsd", "tsd.sock")
    tmp = env.get("TMPDIR") or "/tmp"
    return os.path.join(tmp, f"tsd-{os.getuid()}", "tsd.sock")


def choose_socket(env: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """Which socket `ts` talks to, and whether it is a personal one we may start.

    TS_SOCKET wins; then the system socket if it exists; then the personal one.
    """
    env = os.environ if env is None else env
    explicit = env.get("TS_SOCKET")
    if explicit:
        return explicit, not os.path.exists(explicit) or _is_own(explicit)
    if os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET, False
    return personal_socket_path(env), True


def _is_own(path: str) -> bool:
    try:
        return os.stat(path).st_uid == os.getuid()
    except OSError:
        return True


class Connection:
    """One connection to a daemon: send a request, read frames back."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, req: protocol.Request) -> None:
        """Send one request frame."""
        from tsd import protocol

        self.send_wire(protocol.request_to_wire(req))

    def send_wire(self, obj: Mapping[str, Any]) -> None:
        """Send a request already in its wire form (ts's quick submit)."""
        self.sock.sendall(framing.encode(obj))

    def recv(self) -> dict[str, Any]:
        """Read one frame; a closed connection is ServerUnavailable."""
        header = self._read_exact(framing.HEADER.size)
        body = self._read_exact(framing.frame_length(header))
        return framing.decode(body)

    def _read_exact(self, n: int) -> bytes:
        chunks: list[bytes] = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 16))
            if not chunk:
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


def _check(frame: dict[str, Any]) -> dict[str, Any]:
    ok = frame.get("ok")
    if ok is True:
        return frame
    if ok is False:
        raise from_wire(str(frame.get("code", "error")), str(frame.get("error", "unknown error")))
    raise ProtocolError("malformed response from the daemon")


class Client:
    """Talks to the daemon `ts` should use, starting a personal one if there is none."""

    def __init__(self, path: str | None = None, may_start: bool | None = None) -> None:
        chosen, personal = choose_socket()
        self.path = path or chosen
        self.may_start = personal if may_start is None else may_start

    def connect(self) -> Connection:
        """Open a connection, starting the personal daemon on the first call."""
        try:
            return Connection(self._connect_once())
        except OSError as exc:
            if not self.may_start or exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                raise self._unavailable(exc) from None
        self._start_daemon()
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.002
        while True:
            try:
                return Connection(self._connect_once())
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise self._unavailable(exc) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def _connect_once(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock

    def _unavailable(self, exc: OSError) -> ServerUnavailable:
        if exc.errno == errno.EACCES and self.path == SYSTEM_SOCKET:
            return ServerUnavailable(
                f"permission denied on {self.path}: ask an admin to add you to group tsd"
            )
        return ServerUnavailable(f"cannot reach the tsd daemon at {self.path}: {exc.strerror}")

    def _start_daemon(self) -> None:
        # The daemon locks its state dir, so racing clients starting two daemons is harmless:
        # the loser exits and everyone connects to the winner.
        import subprocess  # only on the first call: keep it off every other start

        env = dict(os.environ)
        subprocess.Popen(
            [sys.executable, "-m", "tsd.daemon", "--user", "--socket", self.path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            env=env,
            cwd="/",
        )

    def call(self, req: protocol.Request) -> dict[str, Any]:
        """One request, one final response; errors come back as TsdError.

        A long job list arrives in pieces (`jobs` events, each under the frame
        limit) before the final frame; they are put back together here.
        """
        conn = self.connect()
        pieces: list[Any] = []
        try:
            conn.send(req)
            while True:
                frame = conn.recv()
                if frame.get("event") == "jobs":
                    pieces.extend(frame.get("jobs") or [])
                elif "event" not in frame:
                    final = _check(frame)
                    if pieces:
                        final["jobs"] = pieces + list(final.get("jobs") or [])
                    return final
        finally:
            conn.close()

    def stream(self, req: protocol.Request) -> Iterator[dict[str, Any]]:
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


__all__ = ["Client", "Connection", "TsdError", "choose_socket", "personal_socket_path"]

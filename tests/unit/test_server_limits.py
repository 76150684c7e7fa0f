"""The server's connection caps, on a real unix socket with a stand-in handler."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import tempfile
import time
from pathlib import Path

import pytest

import tsd.server as server
from tsd import protocol
from tsd.server import ConnectionLimits, Server


async def _parked(creds: tuple[int, int, int], req: protocol.Request, send: object) -> None:
    await asyncio.sleep(60)


def _answers(path: str, count: int, first: bytes = b"") -> list[str]:
    """Open `count` connections (sending `first` on each); what each got within a second."""
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        if first:
            with contextlib.suppress(OSError):  # refused first: the answer waits for recv
                s.sendall(first)
        socks.append(s)
    time.sleep(1.0)
    out = []
    for s in socks:
        s.settimeout(0.2)
        try:
            raw = s.recv(65536)
        except TimeoutError:
            out.append("open")
        else:
            out.append(json.loads(raw[4:])["code"] if raw else "closed")
        s.close()
    return out


def _serve_and_call(
    limits: ConnectionLimits, count: int, first: bytes = b"", uid: int = 1234
) -> list[str]:
    async def body() -> list[str]:
        with tempfile.TemporaryDirectory() as d:
            path = str(Path(d) / "s")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            sock.listen(128)
            srv = Server(sock, _parked, lambda: limits)  # type: ignore[arg-type]
            await srv.start()
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    None, _answers, path, count, first
                )
            finally:
                await srv.close()
                sock.close()

    original = server.peer_credentials
    server.peer_credentials = lambda s: (1, uid, uid)
    try:
        return asyncio.run(body())
    finally:
        server.peer_credentials = original


def test_a_user_over_the_connection_cap_gets_one_error_frame_and_is_closed() -> None:
    got = _serve_and_call(ConnectionLimits(total=100, per_user=4), 10)
    assert got == ["open"] * 4 + ["too_many_connections"] * 6


def test_root_is_never_capped_per_user() -> None:
    assert _serve_and_call(ConnectionLimits(total=100, per_user=4), 10, uid=0) == ["open"] * 10


def test_waiting_calls_have_their_own_cap() -> None:
    wait = protocol.encode(protocol.request_to_wire(protocol.Wait(id=1)))
    got = _serve_and_call(ConnectionLimits(total=100, per_user=10, waiting_per_user=3), 6, wait)
    assert got == ["open"] * 3 + ["too_many_connections"] * 3


def test_over_the_total_callers_wait_in_the_backlog_unanswered() -> None:
    assert _serve_and_call(ConnectionLimits(total=3), 6) == ["open"] * 6


@pytest.mark.parametrize(("soft", "budget"), [(64, 32), (1024, 768), (65536, 65280)])
def test_the_total_stays_below_the_file_limit(
    soft: int, budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.resource, "getrlimit", lambda _: (soft, soft))
    assert server.descriptor_budget() == budget


def test_a_caller_that_hangs_up_mid_wait_has_its_handling_cancelled_and_its_counts_freed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cancelled: list[str] = []

    async def waits(creds: tuple[int, int, int], req: protocol.Request, send: object) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(type(req).__name__)
            raise

    async def body() -> tuple[int, int, int]:
        with tempfile.TemporaryDirectory() as d:
            path = str(Path(d) / "s")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            sock.listen(8)
            srv = Server(sock, waits, lambda: ConnectionLimits(total=10))  # type: ignore[arg-type]
            await srv.start()
            loop = asyncio.get_running_loop()
            try:
                caller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                await loop.sock_connect(caller, path)
                await loop.sock_sendall(
                    caller, protocol.encode(protocol.request_to_wire(protocol.Wait(id=1))))
                for _ in range(200):  # until the daemon side waits on the handler
                    if srv.waiting[1234]:
                        break
                    await asyncio.sleep(0.01)
                open_then, waiting_then = srv.open, srv.waiting[1234]
                caller.close()  # ts -w killed: its end of file
                for _ in range(200):
                    if not srv.open:
                        break
                    await asyncio.sleep(0.01)
                left = srv.open + sum(srv.waiting.values()) + len(srv.tasks)
                return open_then, waiting_then, left
            finally:
                await srv.close()
                sock.close()

    monkeypatch.setattr(server, "peer_credentials", lambda s: (1, 1234, 1234))
    open_then, waiting_then, left = asyncio.run(body())
    assert (open_then, waiting_then) == (1, 1)
    assert cancelled == ["Wait"]
    assert left == 0  # no connection, waiting call or task left behind

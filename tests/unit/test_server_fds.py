"""Descriptors sent with a request (SCM_RIGHTS): only ts -n's two reach the handler,
and the daemon keeps none it was not meant to keep."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import tempfile
from pathlib import Path

import tsd.server as server
from tsd import protocol
from tsd.model import JobSpec
from tsd.server import ConnectionLimits, Server


def _submit(store_output: bool) -> bytes:
    spec = JobSpec(command=("true",), cwd="/", env=(), store_output=store_output)
    return protocol.encode(protocol.request_to_wire(protocol.Submit(spec=spec)))


LIST = protocol.encode(protocol.request_to_wire(protocol.ListJobs()))


def _closed_everywhere(read_end: int) -> bool:
    """True once every copy of the pipe's write end is closed (EOF within 5 s)."""
    ready, _, _ = select.select([read_end], [], [], 5.0)
    return bool(ready) and os.read(read_end, 1) == b""


def _exchange(frame: bytes, nfds: int, take: bool = False) -> tuple[dict[str, object], list[
    protocol.Request], list[bool]]:
    """Send `frame` with the write ends of `nfds` pipes; the answer, the requests the
    handler saw, and for each pipe whether the daemon side kept no copy of it."""
    seen: list[protocol.Request] = []

    async def handler(
        creds: tuple[int, int, int], req: protocol.Request, send: object
    ) -> protocol.Response:
        seen.append(req)
        if take and isinstance(req, protocol.Submit) and req.terminal is not None:
            for fd in req.terminal.take():
                os.close(fd)  # taken: now the handler's, as the runner's would be
        return protocol.Done()

    def client(path: str) -> tuple[dict[str, object], list[bool]]:
        pipes = [os.pipe() for _ in range(nfds)]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            socket.send_fds(s, [frame], [w for _, w in pipes])
            for _, w in pipes:
                os.close(w)
            s.settimeout(10)
            raw = b""
            while len(raw) < 4 or len(raw) < 4 + int.from_bytes(raw[:4], "big"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                raw += chunk
        closed = [_closed_everywhere(r) for r, _ in pipes]
        for r, _ in pipes:
            os.close(r)
        return json.loads(raw[4:]), closed

    async def body() -> tuple[dict[str, object], list[bool]]:
        with tempfile.TemporaryDirectory() as d:
            path = str(Path(d) / "s")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            sock.listen(8)
            srv = Server(sock, handler, lambda: ConnectionLimits())
            await srv.start()
            try:
                return await asyncio.get_running_loop().run_in_executor(None, client, path)
            finally:
                await srv.close()
                sock.close()

    original = server.peer_credentials
    server.peer_credentials = lambda s: (1, 1234, 1234)
    try:
        answer, closed = asyncio.run(body())
    finally:
        server.peer_credentials = original
    return answer, seen, closed


def test_more_than_two_descriptors_is_refused_and_all_are_closed() -> None:
    answer, seen, closed = _exchange(_submit(store_output=False), 3)
    assert answer["ok"] is False and answer["code"] == "protocol"
    assert seen == []
    assert closed == [True, True, True]


def test_descriptors_on_a_non_submit_request_are_closed_and_it_is_served() -> None:
    answer, seen, closed = _exchange(LIST, 2)
    assert answer["ok"] is True
    assert [type(r) for r in seen] == [protocol.ListJobs]
    assert closed == [True, True]


def test_descriptors_on_a_submit_that_stores_its_output_are_not_passed_on() -> None:
    answer, seen, closed = _exchange(_submit(store_output=True), 2)
    assert answer["ok"] is True
    assert isinstance(seen[0], protocol.Submit) and seen[0].terminal is None
    assert closed == [True, True]


def test_ts_n_submit_hands_its_two_descriptors_to_the_handler() -> None:
    answer, seen, closed = _exchange(_submit(store_output=False), 2, take=True)
    assert answer["ok"] is True
    assert isinstance(seen[0], protocol.Submit) and seen[0].terminal is not None
    assert closed == [True, True]


def test_descriptors_the_handler_leaves_are_closed_after_the_answer() -> None:
    answer, seen, closed = _exchange(_submit(store_output=False), 2, take=False)
    assert answer["ok"] is True and seen[0].terminal is not None  # type: ignore[union-attr]
    assert closed == [True, True]


def test_one_descriptor_alone_is_not_a_terminal() -> None:
    answer, seen, closed = _exchange(_submit(store_output=False), 1)
    assert answer["ok"] is True
    assert isinstance(seen[0], protocol.Submit) and seen[0].terminal is None
    assert closed == [True]

"""AioSyncer: the WAL's fdatasync run by the kernel (Linux AIO), its result read by the loop."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tsd import aiosync, groupcommit
from tsd.aiosync import AioSyncer, open_aio_syncer
from tsd.store import Store


def _syncer(
    fd: int, loop: asyncio.AbstractEventLoop, done: Callable[[BaseException | None], None]
) -> AioSyncer:
    syncer = open_aio_syncer(fd, loop, done)
    if syncer is None:  # pragma: no cover (a kernel or architecture without AIO fsync)
        pytest.skip("no AIO fsync here")
    return syncer


def _wal_syncer(tmp: Path) -> tuple[int, list[BaseException | None], AioSyncer]:
    """A file, the results told for it, and its syncer on the running loop."""
    fd = os.open(tmp / "wal", os.O_RDWR | os.O_CREAT, 0o600)
    results: list[BaseException | None] = []
    return fd, results, _syncer(fd, asyncio.get_running_loop(), results.append)


async def _until(check: Callable[[], object], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.001)


def test_each_ask_is_one_fdatasync_told_on_the_loop_and_one_asked_meanwhile_follows(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        fd, results, syncer = _wal_syncer(tmp_path)
        os.write(fd, b"x" * 4096)
        syncer.ask()
        syncer.ask()  # while the first is under way: it runs after it, not beside it
        assert results == []  # told on the loop, never from inside ask()
        await _until(lambda: len(results) == 2)
        assert results == [None, None]
        syncer.ask()
        await _until(lambda: len(results) == 3)
        await asyncio.sleep(0.05)
        assert results == [None, None, None]  # one result per ask, no more
        syncer.stop()
        os.close(fd)

    asyncio.run(body())


def test_a_failed_fdatasync_reaches_done_as_an_oserror(tmp_path: Path) -> None:
    async def body() -> None:
        fd, results, syncer = _wal_syncer(tmp_path)
        # The same file number is now a pipe, which has no fsync: the kernel refuses it.
        r, w = os.pipe()
        os.dup2(r, fd)
        syncer.ask()
        await _until(lambda: results)
        assert isinstance(results[0], OSError) and results[0].errno == errno.EINVAL
        syncer.stop()
        for each in (fd, r, w):
            os.close(each)

    asyncio.run(body())


def test_stop_waits_for_the_fdatasync_under_way_and_tells_nobody(tmp_path: Path) -> None:
    async def body() -> None:
        fd, results, syncer = _wal_syncer(tmp_path)
        os.write(fd, b"y" * 65536)
        syncer.ask()
        syncer.stop()
        await asyncio.sleep(0.05)
        assert results == []  # the caller syncs on its own after stop (close_group)
        os.close(fd)

    asyncio.run(body())


async def _grouped_write(tmp: Path) -> object:
    """One write through a grouped store, waited for until durable; its syncer."""
    store = Store(tmp / "tsd.db")
    store.group(asyncio.get_running_loop())
    syncer = store._syncer
    heard: list[str] = []
    with store.deferred():
        store.set_usage(1, 2.0, 3.0)
    store.after_commit(lambda: heard.append("durable"))
    await _until(lambda: heard)
    store.close_group()
    return syncer


def test_where_aio_is_unknown_the_group_commit_syncs_in_its_thread_and_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aiosync.platform, "machine", lambda: "vax")

    async def body() -> None:
        assert open_aio_syncer(0, asyncio.get_running_loop(), lambda _: None) is None
        syncer = await _grouped_write(tmp_path)
        assert isinstance(syncer, groupcommit._Syncer)
        assert Store(tmp_path / "tsd.db").load_usage() == {1: (2.0, 3.0)}

    asyncio.run(body())


def test_the_daemons_group_commit_uses_the_kernels_fdatasync_here(tmp_path: Path) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        assert open_aio_syncer(-1, loop, lambda _: None) is None  # not a file: refused
        fd = os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT, 0o600)
        _syncer(fd, loop, lambda _: None).stop()  # skips where there is no AIO fsync
        os.close(fd)
        assert isinstance(await _grouped_write(tmp_path), AioSyncer)

    asyncio.run(body())

"""fdatasync of the WAL without a thread: Linux AIO's IOCB_CMD_FDSYNC.

The group commit (tsd.groupcommit) fdatasyncs the WAL off the event loop, so that
the loop serves on meanwhile. A Python thread for that costs more than the sync
itself once the loop is busy: the thread must take the GIL back from the loop
after every fdatasync, and hand the result over through the loop's self-pipe,
a handful of futex wake-ups and context switches per commit. With AIO the kernel
runs the fdatasync on one of its own workers (Linux >= 4.18, any file system)
and signals an eventfd, which the loop reads like any other fd: no thread, no
GIL.

`open_aio_syncer` gives None where AIO cannot be used (another architecture, no
io_setup, a seccomp filter, an old kernel without AIO fsync): the caller uses
its thread then. Nothing but system calls through ctypes; the layouts are
linux/aio_abi.h's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import platform
from collections.abc import Callable

# (io_setup, io_destroy, io_getevents, io_submit), by architecture: the asm-generic
# numbers where the architecture has no older table of its own.
_SYSCALLS = {
    "x86_64": (206, 207, 208, 209),
    "aarch64": (0, 1, 4, 2),
    "riscv64": (0, 1, 4, 2),
}
IOCB_CMD_FDSYNC = 3
IOCB_FLAG_RESFD = 1  # signal aio_resfd (an eventfd) at completion


# syscall(2) is variadic: every argument goes as a long, never as ctypes' default int.
_ZERO, _ONE = ctypes.c_long(0), ctypes.c_long(1)


class _Iocb(ctypes.Structure):
    # Little-endian order of aio_key and aio_rw_flags (all the architectures above).
    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _IoEvent(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class AioSyncer:
    """Each `ask()` fdatasyncs `fd` once more, in the kernel; `done` gets the result (None,
    or the OSError) on the loop. One at a time: the group commit never asks again
    before its `done`, and an ask meanwhile waits for the one under way."""

    def __init__(
        self, libc: ctypes.CDLL, numbers: tuple[int, int, int, int], ctx: int, fd: int,
        loop: asyncio.AbstractEventLoop, done: Callable[[BaseException | None], None],
    ) -> None:
        self._libc = libc
        _, self._destroy, self._getevents, self._submit = numbers
        self._ctx = ctypes.c_ulong(ctx)
        self._loop = loop
        self._done = done
        self._event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._iocb = _Iocb(
            aio_lio_opcode=IOCB_CMD_FDSYNC, aio_fildes=fd, aio_flags=IOCB_FLAG_RESFD,
            aio_resfd=self._event,
        )
        self._iocbs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(self._iocb))
        self._events = (_IoEvent * 1)()
        self._now = _Timespec(0, 0)
        self._busy = False
        self._asked = 0  # asks waiting for the fdatasync under way
        loop.add_reader(self._event, self._completed)

    def submit(self) -> int:
        """Start one fdatasync; 0, or the errno of io_submit."""
        ctypes.set_errno(0)
        if self._libc.syscall(self._submit, self._ctx, _ONE, self._iocbs) == 1:
            return 0
        return ctypes.get_errno() or errno.EIO

    def ask(self) -> None:
        """fdatasync once more (after the one under way, if any)."""
        if self._busy:
            self._asked += 1
            return
        self._start()

    def _start(self) -> None:
        err = self.submit()
        if err:
            # Not started (out of memory, EAGAIN): the loop tells `done` on its next turn,
            # like a failed fdatasync, rather than from inside ask().
            self._loop.call_soon(self._done, OSError(err, os.strerror(err)))
            return
        self._busy = True

    def _reap(self, block: bool) -> list[BaseException | None]:
        results: list[BaseException | None] = []
        while True:
            got = self._libc.syscall(
                self._getevents, self._ctx, _ONE if block else _ZERO, _ONE,
                self._events, None if block else ctypes.byref(self._now),
            )
            if got < 0 and ctypes.get_errno() == errno.EINTR:
                continue
            if got <= 0:
                return results
            res = self._events[0].res
            results.append(None if res >= 0 else OSError(-res, os.strerror(-res)))
            block = False

    def _completed(self) -> None:
        try:
            os.eventfd_read(self._event)
        except BlockingIOError:
            return
        for result in self._reap(block=False):
            self._busy = False
            if self._asked:
                self._asked -= 1
                self._start()
            self._done(result)

    def stop(self) -> None:
        """Let the fdatasync under way finish (its `done` is not called), then close."""
        self._loop.remove_reader(self._event)
        if self._busy:
            self._reap(block=True)
            self._busy = False
        self._libc.syscall(self._destroy, self._ctx)
        os.close(self._event)


def open_aio_syncer(
    fd: int, loop: asyncio.AbstractEventLoop, done: Callable[[BaseException | None], None],
) -> AioSyncer | None:
    """An AioSyncer for `fd`, tried once; None where AIO fsync does not work here."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
    except (OSError, AttributeError):
        return None
    ctx = ctypes.c_ulong(0)
    if libc.syscall(numbers[0], _ONE, ctypes.byref(ctx)) != 0:
        return None
    syncer = AioSyncer(libc, numbers, ctx.value, fd, loop, done)
    # One fdatasync now, waited for: a kernel without AIO fsync refuses it (EINVAL).
    if syncer.submit() != 0 or any(r is not None for r in syncer._reap(block=True)):
        syncer.stop()
        return None
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(syncer._event)  # that sync's signal
    return syncer

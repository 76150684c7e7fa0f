"""Group commit for the store: the writes of one event-loop turn in one transaction.

`tsd.store.Store` builds on `GroupCommit`; see its module docstring for the two
ways a write is committed. The daemon calls `group()` once; from then on the
writes its hot paths make inside `deferred()` share one open transaction, each
after the first in its own savepoint (a failed write undoes only itself), and
`commit()` (scheduled once per turn) makes them all durable with one fsync.

In group mode SQLite's commit does not fsync (synchronous=NORMAL, still crash-
consistent: WAL frames carry checksums and a torn tail is dropped at recovery);
the WAL file is fdatasynced here instead, by the kernel through Linux AIO
(tsd.aiosync: no thread, no GIL handed back and forth) or, where that cannot be
used, in one worker thread, and a group's `after_commit` callbacks run once an
fdatasync that began after its COMMIT has returned. The loop keeps serving
meanwhile, and one fsync covers every group committed while the previous one
was under way. A write committed on its own fsyncs inline before it returns,
as before.

What must run just before a group's COMMIT, so that its writes join the group
(a job's end's dispatch pass, tsd.dispatch), registers with `before_commit`: it
runs at the loop's own commit, never inside another write.

A group is committed as soon as something waits for it (`after_commit`: a
reply, waking the clients waiting on a job's end; `after_write`: a
supervisor's go), on the next turn of the loop; a group nobody waits for (a
job's pid and output path, a queued/allocating label, forgetting jobs beyond
the finished cap) within LAZY_COMMIT seconds, so that it mostly rides along
with the next urgent one. Nobody is ever told of such a change before it is
on disk: any answer waits for the group first (tsd.server), which makes it
urgent.

`after_write` callbacks run right after their group's COMMIT, and its
fdatasync is started right after them: starting it wakes the kernel worker
that runs it, which on a busy CPU runs before io_submit returns (~50 us here),
and a supervisor's go or ACK need not wait for that. A committed group
survives a crash of the daemon (the WAL's pages are in the kernel's page
cache, which the next daemon reads); only
a crash of the machine can lose it. That is enough for a supervisor's go: a job
whose start record dies with the machine is queued again after the reboot (as
it would be had the machine died a moment before its start), and nobody was
told it ran. It takes the fsync off the path from one job's end to the next
one's start.

Nor need a commit that only the daemon itself waits on be fdatasynced at once
(`after_commit(..., lazy=True)`: the end of a job no client waits for, whose
after-the-fsync work is a log line): its fdatasync is started with the next one
somebody waits for (a reply, a -w waiter), or LAZY_SYNC after its COMMIT,
whichever comes first. Starting one per job's end cost the daemon ~0.1 ms a job
at 2 slots: the kernel's worker preempts it inside io_submit. Nobody is told
anything sooner (every answer still waits for its fsync), a crash of the daemon
still loses nothing, and a crash of the machine can lose only what it could
lose before, over LAZY_SYNC instead of one fdatasync.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from queue import SimpleQueue
from types import TracebackType

from tsd.aiosync import AioSyncer, open_aio_syncer
from tsd.errors import StorageFull

log = logging.getLogger("tsd")

_Callbacks = tuple[Callable[[], None], Callable[[StorageFull], None] | None]

SQLITE_FULL = 13  # SQLite's primary result code for a full disk (sqlite3.h)
LAZY_COMMIT = 0.1  # seconds a group nobody waits for stays open, at most
LAZY_SYNC = 0.01  # seconds a commit only the daemon itself waits on stays unsynced, at most


def primary(exc: sqlite3.Error) -> int:
    """SQLite's primary result code of an error."""
    return int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


class _Write:
    """The context of one write (`GroupCommit._tx`). A class rather than a generator:
    every write on the daemon's hot path enters one."""

    __slots__ = ("_gc", "_grouped", "_saved")

    def __init__(self, gc: GroupCommit) -> None:
        self._gc = gc
        self._grouped = False
        self._saved = False  # in a savepoint of its own (not the group's first write)

    def __enter__(self) -> None:
        gc = self._gc
        if gc._deferring and gc._loop is not None:
            self._saved = gc._join_group()
            self._grouped = True
            return
        if gc.db.in_transaction:
            # A write that must be durable when it returns, while a group is open:
            # the group goes first (its callbacks run from the loop, not from here,
            # and so does what was to run before its commit: see before_commit).
            gc._commit_group(inline=False)
        gc._begin_own()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A failure not turned into StorageFull here goes on as it is.
        if self._grouped:
            self._gc._leave_group(exc, self._saved)
        else:
            self._gc._end_own(exc)


class _Deferred:
    """`GroupCommit.deferred()`: a counter, so blocks may nest."""

    __slots__ = ("_gc",)

    def __init__(self, gc: GroupCommit) -> None:
        self._gc = gc

    def __enter__(self) -> None:
        self._gc._deferring += 1

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._gc._deferring -= 1


class _Syncer:
    """One thread that fdatasyncs the WAL each time it is asked, and hands each result
    (None, or the exception) to `done` on the loop. Leaner than an executor: no future,
    no condition, per commit."""

    def __init__(
        self, fd: int, loop: asyncio.AbstractEventLoop,
        done: Callable[[BaseException | None], None],
    ) -> None:
        self._asks: SimpleQueue[bool] = SimpleQueue()
        self._thread = threading.Thread(
            target=_serve_syncs, args=(self._asks, fd, loop, done), name="tsd-fsync",
            daemon=True,
        )
        self._thread.start()

    def ask(self) -> None:
        """fdatasync once more (after the one under way, if any)."""
        self._asks.put(True)

    def stop(self) -> None:
        """Let the fdatasyncs asked for finish, then end the thread."""
        self._asks.put(False)
        self._thread.join()


def _serve_syncs(
    asks: SimpleQueue[bool], fd: int, loop: asyncio.AbstractEventLoop,
    done: Callable[[BaseException | None], None],
) -> None:
    while asks.get():
        exc: BaseException | None = None
        try:
            os.fdatasync(fd)
        except Exception as failed:
            exc = failed
        with suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            loop.call_soon_threadsafe(done, exc)


class GroupCommit:
    """Transactions for the store's writes, on their own or grouped."""

    db: sqlite3.Connection
    path: Path
    _deferring = 0
    _urgent = False  # the open group's commit is scheduled for the next turn
    _opened = 0.0  # loop time the open group began (it is committed LAZY_COMMIT later)
    _lazy: asyncio.TimerHandle | None = None  # the lazy-commit timer (one, not one per group)

    _loop: asyncio.AbstractEventLoop | None = None
    _wal = -1  # our descriptor of the WAL file, fdatasynced in group mode
    _syncer: _Syncer | AioSyncer | None = None
    _syncing = False  # an fdatasync is under way
    _dirty = False  # committed since the fdatasync under way (if any) began
    _prompt = False  # the open group has an after_commit that is not lazy
    _prompt_unsynced = False  # ...and so has what was committed since the last fdatasync
    _lazy_sync: asyncio.TimerHandle | None = None  # the fdatasync of lazy commits, due

    def _init_group(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._after: list[_Callbacks] = []
        self._written: list[_Callbacks] = []  # of the open group, run at its COMMIT
        self._before: list[Callable[[], None]] = []  # run just before its COMMIT
        self._unsynced: list[_Callbacks] = []  # committed, for the next fdatasync
        self._in_flight: list[_Callbacks] = []  # committed, for the fdatasync under way
        self._deferred = _Deferred(self)

    def _tx(self) -> _Write:
        """One write: committed on its own, or (inside `deferred`) joining the group."""
        return _Write(self)

    def _begin_own(self) -> None:
        """Begin a write's own transaction (see _end_own)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if primary(exc) == SQLITE_FULL:
                raise self._full() from None
            raise

    def _end_own(self, exc: BaseException | None) -> None:
        """Commit the write's own transaction, or (it failed: `exc`) roll it back; a full
        disk becomes StorageFull, nothing half-written."""
        if exc is None:
            try:
                self.db.execute("COMMIT")
                if self._wal >= 0:  # group mode: SQLite no longer fsyncs on commit
                    os.fdatasync(self._wal)
            except BaseException as failed:
                self._rollback_own()
                if isinstance(failed, sqlite3.OperationalError) and primary(failed) == SQLITE_FULL:
                    raise self._full() from None
                raise
            return
        self._rollback_own()
        if isinstance(exc, sqlite3.OperationalError) and primary(exc) == SQLITE_FULL:
            raise self._full() from None

    def _rollback_own(self) -> None:
        # SQLite may have rolled back already (SQLITE_FULL does): no second error.
        if self.db.in_transaction:
            with suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")

    def _full(self, exc: sqlite3.Error | None = None) -> StorageFull:
        if exc is not None and primary(exc) != SQLITE_FULL:
            return StorageFull(f"the server cannot save its state: {exc}", str(self.path.parent))
        return StorageFull(
            f"the server cannot save its state: no space left on {self.path.parent}",
            where=str(self.path.parent),
        )

    def _join_group(self) -> bool:
        """A write joins the open group's transaction, in a savepoint: when it fails, only
        it is undone (_leave_group). The write that begins the group needs none (undoing
        it is rolling the transaction back), which saves two statements a group. True
        when the write is in a savepoint."""
        assert self._loop is not None
        if self.db.in_transaction:
            self.db.execute("SAVEPOINT w")
            return True
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise self._full(exc) from None
        self._urgent = False
        self._opened = self._loop.time()
        if self._lazy is None:
            self._arm_lazy(LAZY_COMMIT)
        return False

    def _leave_group(self, exc: BaseException | None, saved: bool) -> None:
        """The grouped write is done (`exc` None) or failed: then only it is undone and
        StorageFull raised, unless SQLite dropped the whole transaction, which fails the
        group."""
        if exc is None:
            if not saved:
                return
            try:
                self.db.execute("RELEASE w")
            except BaseException as failed:
                self._undo_write(failed, saved)
                raise
            return
        self._undo_write(exc, saved)

    def _undo_write(self, exc: BaseException, saved: bool) -> None:
        if self.db.in_transaction:
            with suppress(sqlite3.Error):
                if saved:
                    self.db.execute("ROLLBACK TO w")
                    self.db.execute("RELEASE w")
                else:  # the group's first write: the group is nothing but it
                    self.db.execute("ROLLBACK")
        else:  # SQLite rolled the whole group back (SQLITE_FULL may)
            self._group_failed(self._full(), inline=False)
        if isinstance(exc, sqlite3.OperationalError) and primary(exc) == SQLITE_FULL:
            raise self._full(exc) from None

    # ------------------------------------------------------------ group commit

    def group(self, loop: asyncio.AbstractEventLoop) -> None:
        """Turn group commit on, on this event loop (the daemon's)."""
        self._loop = loop
        self._commit_group(inline=True)
        self.db.execute("PRAGMA synchronous=NORMAL")
        # The WAL exists once the database has been read (Store does at open); it
        # stays, same inode, while this connection is open. Its directory entry is
        # made durable once, here.
        self._wal = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        dirfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(self._wal)
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        aio = open_aio_syncer(self._wal, loop, self._synced)
        self._syncer = aio or _Syncer(self._wal, loop, self._synced)
        log.info("the state's WAL is fdatasynced by %s", "the kernel (AIO)" if aio else "a thread")

    def _arm_lazy(self, delay: float) -> None:
        assert self._loop is not None
        self._lazy = self._loop.call_later(delay, self._lazy_due)

    def _lazy_due(self) -> None:
        """A group open LAZY_COMMIT seconds that nobody made urgent is committed now; a
        younger one (the timer's own was committed meanwhile) when its time comes."""
        self._lazy = None
        if not self.db.in_transaction:
            return
        assert self._loop is not None
        left = self._opened + LAZY_COMMIT - self._loop.time()
        if left > 0:
            self._arm_lazy(left)
        else:
            self.commit()

    def deferred(self) -> _Deferred:
        """Writes in this block join the open group instead of committing on their own
        (on their own as before when group commit is off)."""
        return self._deferred

    @property
    def pending(self) -> bool:
        """Some writes are not durable yet (a group is open, or not fsynced yet)."""
        return self.db.in_transaction or self._syncing or self._dirty

    def after_commit(
        self, ok: Callable[[], None], failed: Callable[[StorageFull], None] | None = None,
        lazy: bool = False,
    ) -> None:
        """Run `ok` once the writes made so far are durable (now when they are), or
        `failed` if their group is rolled back instead.

        `lazy`: nobody outside the daemon waits for `ok` (nobody is told anything by
        it), so it need not hurry the commit or its fdatasync: the group is committed
        when something else urges it (within LAZY_COMMIT), and synced with the next
        fdatasync somebody waits for (within LAZY_SYNC of the COMMIT).
        """
        if self.db.in_transaction:
            self._after.append((ok, failed))
            if not lazy:
                self._prompt = True
                self._urge()
        elif self._dirty:
            self._unsynced.append((ok, failed))
            if not lazy:
                self._prompt_unsynced = True
                self._sync()
        elif self._syncing:
            self._in_flight.append((ok, failed))
        else:
            ok()

    def after_write(
        self, ok: Callable[[], None], failed: Callable[[StorageFull], None] | None = None
    ) -> None:
        """Run `ok` once the writes made so far are committed, before they are fsynced
        (see the module docstring: safe after a crash of the daemon, not of the machine),
        or `failed` if their group is rolled back instead."""
        if self.db.in_transaction:
            self._written.append((ok, failed))
            self._urge()
        else:
            ok()

    def before_commit(self, fn: Callable[[], None]) -> bool:
        """Run `fn` just before the open group's COMMIT, on the loop's next turn at the
        latest, so that the writes it makes join that group; False (`fn` is not kept)
        when no group is open.

        Only from the loop's own call of `commit()`, never inside another write: a
        write that must be durable on return commits the open group first, and `fn`
        (a dispatch pass) must not run in the middle of whatever made that write (say,
        ts -r forgetting a queued job the pass would start). `fn` then runs at the
        commit already scheduled, and what it writes is committed there."""
        if not self.db.in_transaction or self._loop is None:
            return False
        self._before.append(fn)
        self._urge()
        return True

    def _urge(self) -> None:
        """Commit the open group on the loop's next turn."""
        if not self._urgent and self._loop is not None:
            self._urgent = True
            self._loop.call_soon(self.commit)

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Run `undo` at once if the open group is rolled back (memory ahead of the disk
        goes back); never when no group is open (the write was committed already)."""
        if self.db.in_transaction:
            self._undo.append(undo)

    def commit(self) -> None:
        """Commit the open group (one fsync), then run its `after_commit` callbacks.
        The loop's own commit: what `before_commit` asked for runs first, here only.

        On failure nothing of it is written: the undos run, then the `failed`
        callbacks, with the StorageFull.
        """
        while self._before:  # what they write joins the group (and may ask for more)
            before, self._before = self._before, []
            for fn in before:
                try:
                    fn()
                except Exception:  # the group is committed whatever one of them did
                    log.exception("before a commit")
        self._commit_group(inline=True)

    def _commit_group(self, inline: bool) -> None:
        if not self.db.in_transaction:
            return
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.db.in_transaction:
                with suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            self._group_failed(self._full(exc), inline)
            return
        after, self._after, self._undo = self._after, [], []
        written, self._written = self._written, []
        if self._syncer is None:  # SQLite fsynced (synchronous=FULL)
            self._run([ok for ok, _ in written + after], inline)
            return
        self._unsynced += after
        self._dirty = True
        self._prompt_unsynced |= self._prompt
        self._prompt = False
        self._run([ok for ok, _ in written], inline)
        # After them (see the module docstring); with nobody waiting, later.
        if self._prompt_unsynced:
            self._sync()
        else:
            self._arm_lazy_sync()

    def _arm_lazy_sync(self) -> None:
        """Sync what was committed within LAZY_SYNC, unless somebody asks first."""
        if self._syncing or self._lazy_sync is not None:
            return  # _synced looks again; or it is due already
        assert self._loop is not None
        self._lazy_sync = self._loop.call_later(LAZY_SYNC, self._lazy_sync_due)

    def _lazy_sync_due(self) -> None:
        self._lazy_sync = None
        self._sync()

    def _sync(self) -> None:
        """Start an fdatasync of the WAL for what was committed, unless one is under way."""
        if self._syncing or not self._dirty:
            return
        assert self._syncer is not None
        if self._lazy_sync is not None:
            self._lazy_sync.cancel()
            self._lazy_sync = None
        self._in_flight, self._unsynced = self._unsynced, []
        self._syncing, self._dirty, self._prompt_unsynced = True, False, False
        self._syncer.ask()

    def _synced(self, exc: BaseException | None) -> None:
        done, self._in_flight = self._in_flight, []
        self._syncing = False
        if exc is None:
            self._run([ok for ok, _ in done], inline=True)
        else:
            # Committed in SQLite, not known to be on disk: nobody is told it is. Memory
            # stays as SQLite has it (nothing to undo); the disk itself is failing.
            log.error("cannot fsync %s-wal: %s", self.path, exc)
            err = StorageFull(f"the server cannot save its state: {exc}", str(self.path.parent))
            self._run([functools.partial(f, err) for _, f in done if f is not None], True)
        if self._prompt_unsynced:
            self._sync()
        elif self._dirty:
            self._arm_lazy_sync()

    def close_group(self) -> None:
        """Commit and fsync whatever is open (the daemon stops), inline. What was to run
        before the loop's commit (`before_commit`) does not: nothing is started once the
        daemon stops."""
        self._before.clear()
        self._commit_group(inline=True)
        if self._lazy is not None:  # its group is committed; it must not fire on a closed db
            self._lazy.cancel()
            self._lazy = None
        if self._lazy_sync is not None:
            self._lazy_sync.cancel()
            self._lazy_sync = None
        if self._syncer is not None:
            self._syncer.stop()
            os.fdatasync(self._wal)
            os.close(self._wal)
            self._syncer, self._wal = None, -1
            done, self._in_flight, self._unsynced = self._in_flight + self._unsynced, [], []
            self._syncing = self._dirty = self._prompt_unsynced = False
            self._run([ok for ok, _ in done], inline=True)

    def _group_failed(self, exc: StorageFull, inline: bool) -> None:
        undo, after, self._undo, self._after = self._undo, self._after, [], []
        self._prompt = False
        after, self._written = self._written + after, []
        for fn in reversed(undo):  # memory back to what the disk holds, newest first
            fn()
        self._run([functools.partial(f, exc) for _, f in after if f is not None], inline)

    def _run(self, callbacks: list[Callable[[], None]], inline: bool) -> None:
        if not callbacks:
            return
        if not inline:
            assert self._loop is not None
            self._loop.call_soon(functools.partial(self._run, callbacks, True))
            return
        for fn in callbacks:
            try:
                fn()
            except Exception:  # one broken callback must not keep the others from running
                log.exception("after a commit")

"""Group commit (tsd.groupcommit, tsd.store): the writes of one loop turn share one
transaction; nobody acts on them before it is committed; a commit that fails leaves
nothing half-written, memory back as the disk has it, and one clear error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from unit.daemon_fakes import (
    Events,
    FakeGpuSource,
    FakeLauncher,
    FakeNvml,
    FakeProcs,
    FakeScopes,
    spec,
)
from unit.test_handlers import ALICE, FakeRunner

from tsd import dispatch, exitreport, groupcommit, handlers, launch, protocol, server
from tsd.config import Config
from tsd.dispatch import Dispatcher
from tsd.errors import StorageFull
from tsd.exitreport import ExitReport, write
from tsd.gpumonitor import GpuMonitor
from tsd.jobtable import JobTable
from tsd.model import ExitInfo, Job, JobState
from tsd.policy import Policy
from tsd.runner import Runner, RunnerSettings
from tsd.server import ConnectionLimits, Server
from tsd.store import Store
from tsd.waiters import Waiters


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


def grouped(path: Path) -> Store:
    """A store in group mode on the running loop, as the daemon sets it up."""
    loop = asyncio.get_running_loop()
    store = Store(path / "state.db")
    store.group(loop)
    return store


def on_disk(path: Path) -> dict[int, str]:
    """Job id -> state as another reader of the database sees it: what is committed."""
    db = sqlite3.connect(path / "state.db")
    try:
        return {int(i): str(s) for i, s in db.execute("SELECT id, state FROM jobs")}
    finally:
        db.close()


def full(store: Store) -> None:
    """Every further page allocation fails with SQLITE_FULL, as on a full disk."""
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count={pages}")


class CommitsFail:
    """The store's connection, but COMMIT fails as on a full disk: SQLite rolls the
    transaction back and answers SQLITE_FULL. (Small writes stay in SQLite's page
    cache until COMMIT, so that is where a full disk shows first.)"""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.failing = True

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.failing:
            self.db.execute("ROLLBACK")
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorcode = 13  # SQLITE_FULL
            raise exc
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def test_the_writes_of_one_turn_are_one_commit_and_waiters_run_only_after_it(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        store = grouped(tmp_path)
        table = JobTable(store, Events(), lambda: 1000)
        heard: list[dict[int, str]] = []
        a = table.add(1000, "alice", spec("a"))
        b = table.add(1000, "bob", spec("b"))
        table.after_commit(lambda: heard.append(on_disk(tmp_path)))
        assert store.pending and on_disk(tmp_path) == {} and heard == []
        await table.durable()
        assert not store.pending
        assert heard == [{a.id: "queued", b.id: "queued"}]  # both, before anyone heard

    run(body)


def test_a_write_nobody_waits_for_is_committed_within_the_lazy_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(groupcommit, "LAZY_COMMIT", 0.05)

    async def body() -> None:
        store = grouped(tmp_path)
        table = JobTable(store, Events(), lambda: 1000)
        job = table.add(1000, "alice", spec())
        await asyncio.sleep(0.01)
        assert on_disk(tmp_path) == {}  # nobody waits: still open
        await asyncio.sleep(0.1)
        assert on_disk(tmp_path) == {job.id: "queued"}

    run(body)


def test_a_store_closed_with_a_group_open_commits_it_and_its_lazy_timer_never_fires(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon closes its store and its loop runs on a little (shutdown): the lazy
    # commit's timer must not touch the closed connection (it logged a traceback).
    monkeypatch.setattr(groupcommit, "LAZY_COMMIT", 0.05)
    failures: list[dict[str, Any]] = []

    async def body() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: failures.append(ctx))
        store = grouped(tmp_path)
        job = JobTable(store, Events(), lambda: 1000).add(1000, "alice", spec())
        store.close()
        assert on_disk(tmp_path) == {job.id: "queued"}
        await asyncio.sleep(0.1)

    run(body)
    assert failures == []


def test_a_group_that_cannot_be_committed_is_undone_in_memory_and_on_disk(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        store = grouped(tmp_path)
        events = Events()
        table = JobTable(store, events, lambda: 1000)
        kept = table.add(1000, "alice", spec())
        running = table.add(1000, "alice", spec())
        table.begin_run(running, (), ())
        table.launched(running.id, 4000, 1, None)
        await table.durable()
        failing = CommitsFail(store.db)
        store.db = failing  # type: ignore[assignment]
        # One turn: a submit, and the running job's end.
        added = table.add(1000, "alice", spec("x"))
        table.finish(running.id, ExitInfo(code=3), 1.0, None)
        errors: list[StorageFull] = []
        table.after_commit(lambda: errors.append(StorageFull("wrongly ok", "")), errors.append)
        with pytest.raises(StorageFull) as err:
            await table.durable()
        assert str(err.value) == f"the server cannot save its state: no space left on {tmp_path}"
        assert [str(e) for e in errors] == [str(err.value)]
        # Nothing of the group on disk, memory as the disk has it, nobody told of the end.
        assert on_disk(tmp_path) == {kept.id: "queued", running.id: "running"}
        assert set(table.jobs) == {kept.id, running.id} and table.pending == [kept.id]
        assert added.id not in table.jobs and table.last_added[1000] == running.id
        assert table.running[running.id].state is JobState.RUNNING
        assert list(table.finished_by_user[1000]) == [] and events.ends == []
        failing.failing = False
        table.finish(running.id, ExitInfo(code=3), 1.0, None)
        again = table.add(1000, "alice", spec())
        await table.durable()
        assert on_disk(tmp_path) == {kept.id: "queued", running.id: "finished", again.id: "queued"}
        assert again.id > running.id  # (the rolled-back id was never told to anyone)
        assert events.ends == [running.id]

    run(body)


def test_a_users_settings_read_are_what_was_last_written_or_is_left_after_a_rollback(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        store = grouped(tmp_path)
        assert store.user_settings(1000) == {}
        store.set_user_setting(1000, "logdir", "/a")
        store.set_user_setting(1000, "env:X", "1")
        assert store.user_settings(1000) == {"logdir": "/a", "env:X": "1"}
        store.user_settings(1000)["logdir"] = "/changed by a caller"
        assert store.user_settings(1000)["logdir"] == "/a"
        failing = CommitsFail(store.db)
        store.db = failing  # type: ignore[assignment]
        with store.deferred():  # joins a group that will not commit
            store.set_user_setting(1000, "logdir", "/b")
        assert store.user_settings(1000)["logdir"] == "/b"
        with pytest.raises(StorageFull):
            await store_durable(store)
        assert store.user_settings(1000) == {"logdir": "/a", "env:X": "1"}
        failing.failing = False
        store.set_user_setting(1000, "env:X", None)
        assert store.user_settings(1000) == {"logdir": "/a"}

    run(body)


async def store_durable(store: Store) -> None:
    """Until the store's writes so far are on disk (StorageFull when they never will be)."""
    await JobTable(store, Events(), lambda: 1000).durable()


def test_a_write_that_fails_at_once_changes_nothing_and_the_group_still_commits(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        store = grouped(tmp_path)
        table = JobTable(store, Events(), lambda: 1000)
        kept = table.add(1000, "alice", spec())
        await table.durable()
        full(store)
        with pytest.raises(StorageFull) as err:
            for _ in range(200):  # until a page is needed
                table.add(1000, "alice", spec("x" * 3000))
        assert str(err.value) == f"the server cannot store the job: no space left on {tmp_path}"
        # SQLite may have dropped the whole group: then it is undone as a whole.
        with contextlib.suppress(StorageFull):
            await table.durable()
        disk = on_disk(tmp_path)
        assert set(disk) == set(table.jobs) and kept.id in disk  # memory and disk agree

    run(body)


def test_a_write_that_must_be_durable_on_return_commits_the_open_group_first(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        store = grouped(tmp_path)
        table = JobTable(store, Events(), lambda: 1000)
        a = table.add(1000, "alice", spec())
        b = table.add(1000, "alice", spec())
        table.swap(a, b)  # ts -U: its own transaction, committed when it returns
        assert not store.db.in_transaction
        assert set(on_disk(tmp_path)) == {a.id, b.id}
        await table.durable()
        assert not store.pending

    run(body)


def _runner(
    tmp_path: Path, events: Events | Waiters | None = None,
    waited: Callable[[int], bool] | None = None, ended: Callable[[Job], None] | None = None,
) -> tuple[Store, JobTable, Runner, FakeLauncher, Path]:
    """A runner on a grouped store with fake launcher, scopes, GPUs and process watch;
    `waited` says whether a client waits for a job's end, `ended` hears of each end."""
    store = grouped(tmp_path)
    table = JobTable(store, events or Events(), lambda: 1000)
    launcher = FakeLauncher()
    exits = tmp_path / "exits"
    exits.mkdir()
    runner = Runner(
        asyncio.get_running_loop(), None, RunnerSettings(False, exits), lambda: Config(),
        table, store, FakeGpuSource(), lambda: FakeScopes(), ended=ended or (lambda job: None),
        requeued=lambda: None, launcher=launcher, procs=FakeProcs(), waited=waited,
    )
    return store, table, runner, launcher, exits


def _dispatching(
    store: Store, table: JobTable, start: Callable[[Job, tuple[int, ...]], None], slots: int
) -> tuple[Policy, GpuMonitor, Dispatcher]:
    """A policy of `slots` slots, a GPU monitor with no GPUs, and a dispatcher starting
    jobs through `start`, on the running loop."""
    policy = Policy(Config(slots=slots), store, False, resolve=lambda c, uid: c.defaults)
    loop = asyncio.get_running_loop()
    gpus = GpuMonitor(loop, None, lambda: None, lambda: None, lambda: FakeNvml([]))
    return policy, gpus, Dispatcher(table, policy, gpus, start, lambda: 5.0)


def commits_of(store: Store) -> list[str]:
    """The COMMITs the store's connection runs from now on, as they come."""
    commits: list[str] = []
    store.db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    return commits


async def acked(launcher: FakeLauncher, job_id: int) -> None:
    """Until the job's supervisor is sent its ACK (within half a second)."""
    os.set_blocking(launcher.ack_r[job_id], False)
    for _ in range(50):
        await asyncio.sleep(0.01)
        with contextlib.suppress(BlockingIOError):
            assert os.read(launcher.ack_r[job_id], 8) == launch.ACK
            return
    raise AssertionError("no ACK at the commit")


def test_a_supervisor_is_told_to_go_only_once_its_job_is_durably_running(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        _, table, runner, launcher, exits = _runner(tmp_path)
        job = table.add(1000, "alice", spec())
        await table.durable()
        runner.start(job, ())
        assert launcher.gone == [] and on_disk(tmp_path)[job.id] == "queued"
        await table.durable()
        assert launcher.gone == [job.id] and on_disk(tmp_path)[job.id] == "running"
        # Its end: the exit report stays until the end is on disk.
        write(str(exits), job.id, ExitReport(ExitInfo(code=0), end=2.0, output=None))
        runner._record_end(job.id)
        assert (exits / f"{job.id}.json").exists() and on_disk(tmp_path)[job.id] == "running"
        await table.durable()
        await asyncio.sleep(0)
        assert on_disk(tmp_path)[job.id] == "finished"
        assert not (exits / f"{job.id}.json").exists()
        launcher.close_all()

    run(body)


def _holdable_fsync(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[threading.Event, Callable[[], None]]:
    """The group commit's fdatasync in its thread, which a test can hold (the kernel's AIO
    one it cannot): the gate that lets it go on, and the call that starts holding it."""
    gate = threading.Event()
    real = os.fdatasync

    def held_fdatasync(fd: int) -> None:
        gate.wait(10)
        real(fd)

    monkeypatch.setattr(groupcommit, "open_aio_syncer", lambda *_: None)
    return gate, lambda: monkeypatch.setattr(groupcommit.os, "fdatasync", held_fdatasync)


def test_a_go_follows_its_records_commit_without_waiting_for_the_fsync_and_waiters_still_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A committed group outlives a crash of the daemon (the WAL is in the page cache):
    # the next job's start need not wait for the disk, a client hearing of an end must.
    gate, hold = _holdable_fsync(monkeypatch)

    async def body() -> None:
        _, table, runner, launcher, _ = _runner(tmp_path)
        job = table.add(1000, "alice", spec())
        await table.durable()
        hold()
        runner.start(job, ())
        heard: list[str] = []
        table.after_commit(lambda: heard.append("durable"))
        assert launcher.gone == []  # nothing committed yet: no go
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert launcher.gone == [job.id] and on_disk(tmp_path)[job.id] == "running"
        assert heard == []  # its fsync is held: nobody is told
        gate.set()
        await table.durable()
        assert heard == ["durable"]
        launcher.close_all()

    try:
        run(body)
    finally:
        gate.set()


def test_a_supervisor_gets_its_ack_at_the_commit_of_its_end_and_waiters_after_the_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The committed end outlives a crash of the daemon (the WAL is in the page cache):
    # the supervisor need not write its report file, nor wait for the disk to take the
    # next job. A client hearing of the end still waits for the fsync.
    gate, hold = _holdable_fsync(monkeypatch)

    async def body() -> None:
        _, table, runner, launcher, exits = _runner(tmp_path)
        launcher.acks = True
        job = table.add(1000, "alice", spec())
        runner.start(job, ())
        await table.durable()
        hold()
        report = ExitReport(ExitInfo(code=4), end=9.0, output=None)
        launcher.say(job.id, f"pid 9\nout -\nend {exitreport.encode(report)}\n")
        heard: list[str] = []
        for _ in range(50):
            await asyncio.sleep(0.01)
            if on_disk(tmp_path)[job.id] == "finished":
                break
        table.after_commit(lambda: heard.append("durable"))
        await acked(launcher, job.id)
        assert on_disk(tmp_path)[job.id] == "finished" and heard == []  # fsync held
        gate.set()
        await table.durable()
        assert heard == ["durable"]
        assert not (exits / f"{job.id}.json").exists() and not runner._acked
        launcher.close_all()

    try:
        run(body)
    finally:
        gate.set()


def test_a_launch_whose_record_is_rolled_back_never_runs_and_goes_back_to_the_queue(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        store, table, runner, launcher, _ = _runner(tmp_path)
        job = table.add(1000, "alice", spec())
        await table.durable()
        store.db = CommitsFail(store.db)  # type: ignore[assignment]
        runner.start(job, ())
        with pytest.raises(StorageFull):
            await table.durable()
        await asyncio.sleep(0)
        assert launcher.gone == [] and launcher.aborted == [job.id]
        assert table.pending == [job.id] and not table.running and not table.launching
        assert on_disk(tmp_path) == {job.id: "queued"}
        launcher.close_all()

    run(body)


def _ask(path: str, frame: bytes, state_dir: Path) -> tuple[dict[str, Any], dict[int, str]]:
    """Send one request; the answer, and what was on disk the moment it arrived."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(frame)
        s.settimeout(10)
        raw = s.recv(65536)
        disk = on_disk(state_dir)
    return json.loads(raw[4:]), disk


@pytest.mark.parametrize("fails", [False, True])
def test_the_server_answers_only_once_what_the_handler_changed_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    monkeypatch.setattr(server, "peer_credentials", lambda s: (1, 1000, 1000))

    async def body() -> None:
        store = grouped(tmp_path)
        table = JobTable(store, Events(), lambda: 1000)
        if fails:
            store.db = CommitsFail(store.db)  # type: ignore[assignment]

        async def handler(
            creds: tuple[int, int, int], req: protocol.Request, send: object
        ) -> protocol.Response:
            return protocol.JobId(table.add(1000, "alice", spec()).id)  # not awaiting the disk

        path = str(tmp_path / "s")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(8)
        srv = Server(sock, handler, lambda: ConnectionLimits(), durable=table.durable)
        await srv.start()
        frame = protocol.encode(protocol.request_to_wire(protocol.CountRunning()))
        try:
            answer, disk = await asyncio.get_running_loop().run_in_executor(
                None, _ask, path, frame, tmp_path
            )
        finally:
            await srv.close()
            sock.close()
        if fails:
            assert answer == {
                "ok": False, "code": "storage_full",
                "error": f"the server cannot save its state: no space left on {tmp_path}",
            }
            assert disk == {} and table.jobs == {}
        else:
            assert answer == {"ok": True, "id": 1} and disk == {1: "queued"}

    run(body)


def test_nobody_hears_of_a_commit_before_the_wal_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    synced: list[int] = []
    real = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        gate.wait(10)
        real(fd)
        synced.append(fd)

    # The thread's fdatasync, which a test can hold (the kernel's AIO one it cannot).
    monkeypatch.setattr(groupcommit, "open_aio_syncer", lambda *_: None)

    async def body() -> None:
        store = grouped(tmp_path)
        monkeypatch.setattr(groupcommit.os, "fdatasync", slow_fdatasync)
        table = JobTable(store, Events(), lambda: 1000)
        heard: list[int] = []
        job = table.add(1000, "alice", spec())
        table.after_commit(lambda: heard.append(len(synced)))
        await asyncio.sleep(0.1)
        assert on_disk(tmp_path) == {job.id: "queued"}  # committed by SQLite...
        assert heard == [] and store.pending  # ...but not fsynced: nobody told
        gate.set()
        await table.durable()
        assert heard == [1]

    run(body)


def test_a_submit_with_a_free_slot_is_one_commit_holding_the_job_and_its_start(
    tmp_path: Path,
) -> None:
    """The job that can start at once is launched into its submit's group: one fsync for
    both, and the answer waits for no second one (nothing is left pending after it)."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        store = grouped(tmp_path)
        waiters = Waiters(loop)
        table = JobTable(store, waiters, lambda: 1000)
        runner = FakeRunner(table)
        policy, gpus, dispatcher = _dispatching(store, table, runner.start, 1)
        parts = handlers.Parts(
            system=False, my_uid=1000, table=table, policy=policy, gpus=gpus,
            dispatcher=dispatcher, runner=runner, waiters=waiters, settings=store,
            stop=lambda: None,
        )  # fmt: skip
        commits = commits_of(store)

        async def send(event: protocol.Event) -> None:
            raise AssertionError(f"a plain submit sends no event: {event}")

        answer = await handlers.handle(parts, ALICE, protocol.Submit(spec=spec("true")), send)
        job_id = answer.to_wire()["id"]
        assert commits == ["COMMIT"]
        assert on_disk(tmp_path) == {job_id: "running"}
        assert not store.pending  # the server writes the answer at once

    run(body)


def test_a_submit_whose_group_cannot_be_committed_queues_nothing_and_runs_nothing(
    tmp_path: Path,
) -> None:
    """The job and the start it got in its submit's group go back together: the caller
    hears StorageFull, its supervisor is given back without a go, nothing is on disk."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        waiters = Waiters(loop)
        store, table, runner, launcher, _ = _runner(tmp_path, waiters)
        policy, gpus, dispatcher = _dispatching(store, table, runner.start, 1)
        parts = handlers.Parts(
            system=False, my_uid=1000, table=table, policy=policy, gpus=gpus,
            dispatcher=dispatcher, runner=runner, waiters=waiters, settings=store,
            stop=lambda: None,
        )  # fmt: skip
        store.db = CommitsFail(store.db)  # type: ignore[assignment]

        async def send(event: protocol.Event) -> None:
            raise AssertionError(f"a plain submit sends no event: {event}")

        with pytest.raises(StorageFull):
            await handlers.handle(parts, ALICE, protocol.Submit(spec=spec("true")), send)
        await asyncio.sleep(0)
        assert launcher.gone == [] and len(launcher.aborted) == 1
        assert not table.jobs and not table.running and not table.launching
        assert on_disk(tmp_path) == {}
        launcher.close_all()

    run(body)


def test_only_the_writes_after_a_groups_first_take_a_savepoint_and_undo_only_themselves(
    tmp_path: Path,
) -> None:
    """The write that begins a group needs no savepoint (undoing it is rolling the
    group back); each later one has its own, so that its failure undoes only itself."""

    async def body() -> None:
        store = grouped(tmp_path)
        table = JobTable(store, Events(), lambda: 1000)
        said: list[str] = []
        store.db.set_trace_callback(said.append)
        first = table.add(1000, "alice", spec())
        second = table.add(1000, "alice", spec())
        await table.durable()
        store.db.set_trace_callback(None)
        assert said[0] == "BEGIN IMMEDIATE" and said[-1] == "COMMIT"
        assert said.count("SAVEPOINT w") == said.count("RELEASE w") == 1
        assert said.index("SAVEPOINT w") > 1  # taken by the second write only
        # A group whose first write fails (it needs pages a full disk has not): nothing
        # of it anywhere, no transaction left open, and the store goes on.
        full(store)
        with pytest.raises(StorageFull):
            table.add(1000, "alice", spec("x" * 200_000))
        assert not store.db.in_transaction
        await table.durable()
        assert set(on_disk(tmp_path)) == set(table.jobs) == {first.id, second.id}
        store.db.execute("PRAGMA max_page_count=1000000")
        third = table.add(1000, "alice", spec())
        await table.durable()
        assert third.id in on_disk(tmp_path)
        store.close()

    run(body)


def count_fdatasyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A list that grows by one each time the group commit starts an fdatasync (Linux
    AIO's, or the thread's where AIO cannot be used)."""
    asked: list[str] = []
    for kind in (groupcommit.AioSyncer, groupcommit._Syncer):
        def ask(self: Any, real: Callable[[Any], None] = kind.ask) -> None:
            asked.append("fdatasync")
            real(self)

        monkeypatch.setattr(kind, "ask", ask)
    return asked


def test_a_groups_after_write_callbacks_run_before_its_fdatasync_is_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Starting the fdatasync wakes the worker that runs it, which may run first: a
    # supervisor's go or ACK must not wait behind that.
    order = count_fdatasyncs(monkeypatch)

    async def body() -> None:
        store = grouped(tmp_path)
        table = JobTable(store, Events(), lambda: 1000)
        table.add(1000, "alice", spec())
        table.after_write(lambda: order.append("go"))
        table.after_commit(lambda: order.append("told"))
        await table.durable()
        assert order == ["go", "fdatasync", "told"]

    run(body)


def test_a_commit_only_the_daemon_waits_on_is_fdatasynced_within_the_lazy_sync_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's end nobody waits for: its ACK (and the next go) at the COMMIT, as always;
    the daemon's own after-the-fsync work (the log line) within LAZY_SYNC, with no
    fdatasync of its own before."""
    monkeypatch.setattr(groupcommit, "LAZY_SYNC", 0.3)  # well past the first look
    asked = count_fdatasyncs(monkeypatch)

    async def body() -> None:
        store = grouped(tmp_path)
        table = JobTable(store, Events(), lambda: 1000)
        order: list[str] = []
        job = table.add(1000, "alice", spec())
        table.after_write(lambda: order.append("go"))
        table.after_commit(lambda: order.append("logged"), lazy=True)
        await asyncio.sleep(0.01)
        assert on_disk(tmp_path) == {job.id: "queued"}  # committed at once (the go)...
        assert order == ["go"] and asked == [] and store.pending  # ...not synced yet
        await asyncio.sleep(0.5)
        assert order == ["go", "logged"] and asked == ["fdatasync"]
        assert not store.pending

    run(body)


def test_somebody_waiting_syncs_the_lazy_commits_before_them_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply (or a -w waiter) after lazy commits: one fdatasync, started at once, covers
    them all, and no second one follows when the lazy delay is over."""
    monkeypatch.setattr(groupcommit, "LAZY_SYNC", 1.0)
    asked = count_fdatasyncs(monkeypatch)

    async def body() -> None:
        store = grouped(tmp_path)
        table = JobTable(store, Events(), lambda: 1000)
        order: list[str] = []
        for name in ("a", "b"):  # two groups, committed one after the other
            table.add(1000, "alice", spec(name))
            table.after_write(lambda: None)
            table.after_commit(lambda name=name: order.append(name), lazy=True)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        assert not store.db.in_transaction and asked == [] and order == []
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await table.durable()
        assert loop.time() - t0 < 0.5  # not the lazy delay
        assert order == ["a", "b"] and asked == ["fdatasync"]
        await asyncio.sleep(1.2)
        assert asked == ["fdatasync"]

    run(body)


def test_a_lazy_waiter_alone_neither_hurries_the_commit_nor_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(groupcommit, "LAZY_COMMIT", 0.2)
    monkeypatch.setattr(groupcommit, "LAZY_SYNC", 0.1)

    async def body() -> None:
        store = grouped(tmp_path)
        table = JobTable(store, Events(), lambda: 1000)
        heard: list[dict[int, str]] = []
        job = table.add(1000, "alice", spec())
        table.after_commit(lambda: heard.append(on_disk(tmp_path)), lazy=True)
        await asyncio.sleep(0.01)
        assert on_disk(tmp_path) == {} and heard == []  # still open: nobody urged it
        await asyncio.sleep(0.6)
        assert heard == [{job.id: "queued"}] and not store.pending

    run(body)


@pytest.mark.parametrize("waited", [False, True])
def test_a_jobs_end_is_fdatasynced_at_once_only_when_a_client_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waited: bool
) -> None:
    """The ACK comes at the COMMIT either way; the end's fdatasync starts at once for a
    client waiting on the end (ts -w), else within LAZY_SYNC."""
    monkeypatch.setattr(groupcommit, "LAZY_SYNC", 1.0)  # past acked()'s longest wait
    asked = count_fdatasyncs(monkeypatch)

    async def body() -> None:
        store, table, runner, launcher, _ = _runner(tmp_path, waited=lambda job_id: waited)
        launcher.acks = True
        job = table.add(1000, "alice", spec())
        runner.start(job, ())
        await table.durable()
        asked.clear()
        report = ExitReport(ExitInfo(code=0), end=9.0, output=None)
        launcher.say(job.id, f"pid 9\nout -\nend {exitreport.encode(report)}\n")
        await acked(launcher, job.id)
        await asyncio.sleep(0.05)
        assert on_disk(tmp_path)[job.id] == "finished"
        assert asked == (["fdatasync"] if waited else [])
        await asyncio.sleep(1.2)
        assert asked == ["fdatasync"] and not store.pending
        launcher.close_all()

    run(body)


def test_what_runs_before_a_commit_writes_into_that_commit_once_even_when_one_raises(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        store = grouped(tmp_path)
        table = JobTable(store, Events(), lambda: 1000)
        commits = commits_of(store)
        ran: list[str] = []
        added: list[int] = []

        def broken() -> None:
            ran.append("broken")
            raise RuntimeError("a bug in one of them")

        def adds() -> None:
            ran.append("adds")
            assert on_disk(tmp_path) == {}  # before the COMMIT
            added.append(table.add(1000, "alice", spec("b")).id)
            # One asked for by one of them runs before the same COMMIT.
            assert table.before_commit(lambda: ran.append("asked by one"))

        first = table.add(1000, "alice", spec("a"))
        assert table.before_commit(broken) and table.before_commit(adds)
        await table.durable()
        assert ran == ["broken", "adds", "asked by one"]
        assert commits == ["COMMIT"]
        assert on_disk(tmp_path) == {first.id: "queued", added[0]: "queued"}
        # With no group open nothing is kept: the caller runs it itself.
        assert not table.before_commit(lambda: ran.append("kept"))
        await asyncio.sleep(0.01)
        assert ran[-1] == "asked by one" and commits == ["COMMIT"]

    run(body)


def test_what_was_to_run_before_a_commit_does_not_when_the_store_closes(tmp_path: Path) -> None:
    async def body() -> None:
        store = grouped(tmp_path)
        table = JobTable(store, Events(), lambda: 1000)
        job = table.add(1000, "alice", spec())
        ran: list[int] = []
        assert table.before_commit(lambda: ran.append(table.add(1000, "alice", spec()).id))
        store.close()
        assert ran == [] and on_disk(tmp_path) == {job.id: "queued"}

    run(body)


def test_the_ends_of_one_loop_turn_get_one_dispatch_pass_whose_starts_join_their_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs end in one turn: one scheduling pass starts the next two, and one COMMIT
    holds both ends and both starts (a pass per end decided twice)."""
    passes: list[int] = []
    real_decide = dispatch.decide

    def counted(*args: Any, **kwargs: Any) -> Any:
        passes.append(1)
        return real_decide(*args, **kwargs)

    monkeypatch.setattr(dispatch, "decide", counted)

    async def body() -> None:
        store, table, runner, launcher, _ = _runner(
            tmp_path, ended=lambda job: dispatcher.job_ended(job))
        launcher.acks = True
        _, _, dispatcher = _dispatching(store, table, runner.start, 2)
        jobs = [table.add(1000, "alice", spec()) for _ in range(4)]
        dispatcher.schedule()
        await table.durable()
        assert sorted(launcher.gone) == [jobs[0].id, jobs[1].id]
        passes.clear()
        commits = commits_of(store)
        report = exitreport.encode(ExitReport(ExitInfo(code=0), end=9.0, output=None))
        for job in jobs[:2]:
            launcher.say(job.id, f"pid 9\nout -\nend {report}\n")
        await acked(launcher, jobs[0].id)
        await acked(launcher, jobs[1].id)
        assert passes == [1] and commits == ["COMMIT"]
        assert on_disk(tmp_path) == {
            jobs[0].id: "finished", jobs[1].id: "finished",
            jobs[2].id: "running", jobs[3].id: "running",
        }
        assert sorted(launcher.gone) == [job.id for job in jobs]
        launcher.close_all()

    run(body)


def test_a_write_durable_on_return_never_runs_what_waits_for_the_commit_inside_it(
    tmp_path: Path,
) -> None:
    """It commits the open group first; what was to run before that commit runs at the
    loop's own commit instead, and what it writes is committed there."""

    async def body() -> None:
        store = grouped(tmp_path)
        table = JobTable(store, Events(), lambda: 1000)
        first = table.add(1000, "alice", spec("a"))
        added: list[int] = []
        assert table.before_commit(lambda: added.append(table.add(1000, "alice", spec()).id))
        store.set_setting("slots", "3")  # durable when it returns
        assert added == [] and on_disk(tmp_path) == {first.id: "queued"}
        await asyncio.sleep(0)
        assert len(added) == 1
        await table.durable()
        assert on_disk(tmp_path) == {first.id: "queued", added[0]: "queued"}

    run(body)


def test_a_queued_job_forgotten_while_a_pass_is_due_is_never_started(
    tmp_path: Path,
) -> None:
    """ts -r of a queued job in the turn a job ended: its delete commits the open group,
    and the pass the end asked for runs after the job is gone, not inside the delete."""

    async def body() -> None:
        store, table, runner, launcher, _ = _runner(tmp_path)
        _, _, dispatcher = _dispatching(store, table, runner.start, 1)
        gone, kept = table.add(1000, "alice", spec("b")), table.add(1000, "alice", spec("c"))
        await table.durable()
        table.add(1000, "alice", spec("d"))  # a group is open, as after an end's record
        dispatcher.schedule_before_commit()  # what a job's end asks for
        table.remove(gone)
        await table.durable()
        await asyncio.sleep(0)
        assert table.get(gone.id) is None and list(launcher.plans) == [kept.id]
        assert on_disk(tmp_path)[kept.id] == "running" and gone.id not in on_disk(tmp_path)
        launcher.close_all()

    run(body)

"""SQLite state: jobs, settings, per-user settings, schema version.

The only SQL in the tree. WAL mode; a change is fsynced (by SQLite, or in
group mode by tsd.groupcommit) before anyone acts on it, so it survives a
crash of the daemon or the machine. Jobs are kept in memory by the
daemon without their environment (which can be large); `env_of` fetches it at
launch.

Two ways a write is committed:

* on its own (the default): the method returns once its transaction is
  committed, or raises StorageFull having changed nothing;
* grouped (group commit, the daemon's hot path): inside `deferred()`, after
  `group()` was called, writes join one open transaction, each after the
  first in its own savepoint, and `commit()` (on the loop's next turn once
  someone waits for it) makes them all durable with one fsync
  (tsd.groupcommit). Whoever must not act before a grouped write is durable
  (a reply, a supervisor's go) registers with `after_commit`; whoever changed
  memory ahead of it registers an undo with `on_rollback`. A commit that
  fails rolls the whole group back (nothing half-written), runs the undos at
  once and the `failed` callbacks after.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tsd.codec import exit_to_row, spec_to_row
from tsd.groupcommit import SQLITE_FULL, primary
from tsd.jobrows import RowDecoder
from tsd.model import Job, JobSpec, JobState
from tsd.owedusage import OwedUsage

log = logging.getLogger("tsd")

SCHEMA_VERSION = 1

# The history of ended runs, kept in end order itself (WITHOUT ROWID, keyed by the end
# and the job): ts --stats and the pruning read it by end, and a job's end writes one
# b-tree rather than a table and an index on its end (accounting_end, as older tsd
# had): one page less in the commit of each end. Two rows of one job never share an
# end (each is a run of its own), so the key is a row's identity: a row written twice
# is kept once (INSERT OR IGNORE), which is what its history should show. `seq`
# numbers the rows in the order they were written, for the usage they add
# (tsd.owedusage; 0 in rows from before, all paid).
_ACCOUNTING = """(
    job_id INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    user TEXT NOT NULL,
    end_ REAL NOT NULL,
    slots INTEGER NOT NULL,
    gpus INTEGER NOT NULL,
    run_s REAL NOT NULL,
    wait_s REAL,
    failed INTEGER NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (end_, job_id)
) WITHOUT ROWID"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uid INTEGER NOT NULL,
    user TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    ord INTEGER NOT NULL,
    enqueue REAL NOT NULL,
    start REAL,
    end_ REAL,
    exit TEXT,
    pid INTEGER,
    sup_pid INTEGER,
    sup_start INTEGER,
    gpu_ids TEXT NOT NULL DEFAULT '[]',
    gpu_uuids TEXT NOT NULL DEFAULT '[]',
    output TEXT,
    unit TEXT,
    attempts INTEGER NOT NULL DEFAULT 0
);
-- jobs_state, an index no query used, cost each state change a write: gone.
DROP INDEX IF EXISTS jobs_state;
-- A job's environment, apart: read once, at its launch. In its jobs row it made each
-- row span a page (1-4 KB), and the daemon's start read every one of them.
CREATE TABLE IF NOT EXISTS job_envs (id INTEGER PRIMARY KEY, env TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS slurm_jobs (
    job_id INTEGER PRIMARY KEY, slurm_id INTEGER NOT NULL, task INTEGER
);
CREATE TABLE IF NOT EXISTS gpu_peaks (id INTEGER PRIMARY KEY, peak_mib INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS user_settings (
    uid INTEGER NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (uid, key)
);
CREATE TABLE IF NOT EXISTS usage (uid INTEGER PRIMARY KEY, value REAL NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS accounting {_ACCOUNTING};
CREATE TABLE IF NOT EXISTS usage_totals (
    user TEXT PRIMARY KEY, slot_seconds REAL NOT NULL, gpu_seconds REAL NOT NULL
);
"""


@dataclass(frozen=True)
class StatsRow:
    """One user's accounting over a period (`ts --stats`)."""

    uid: int
    user: str
    jobs: int
    failed: int
    slot_seconds: float
    gpu_seconds: float
    mean_wait: float | None  # seconds from queued to started, over the jobs that started


_UPDATE = (
    "UPDATE jobs SET state=?, ord=?, start=?, end_=?, exit=?, pid=?, sup_pid=?,"
    " sup_start=?, gpu_ids=?, gpu_uuids=?, output=? , unit=?, attempts=? WHERE id=?"
)


def _update_row(j: Job) -> tuple[Any, ...]:
    """The values of `_UPDATE` for a job: its mutable fields, then its id."""
    return (
        j.state.value,
        j.order,
        j.start_time,
        j.end_time,
        None if j.exit is None else exit_to_row(j.exit),
        j.pid,
        j.supervisor_pid,
        j.supervisor_start,
        json.dumps(j.gpu_ids) if j.gpu_ids else "[]",
        json.dumps(j.gpu_uuids) if j.gpu_uuids else "[]",
        j.output_path,
        j.unit,
        j.attempts,
        j.id,
    )


class StoreError(Exception):
    """The state database is unusable (wrong schema version, corrupt, unreadable).

    Its message is one line for the admin: the file, what is wrong, what to do.
    """


# SQLite's primary result codes (sqlite3.h) that say what an admin must fix.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SQLITE_CANTOPEN = 14
_SQLITE_PERM = 3
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10


def unusable(path: str | os.PathLike[str], exc: sqlite3.Error) -> StoreError:
    """The one-line StoreError for a database the daemon cannot start with."""
    code = primary(exc)
    if code in (_SQLITE_NOTADB, _SQLITE_CORRUPT):
        return StoreError(
            f"{path} is not a database (corrupt): move it aside and start tsd again;"
            " the jobs in it are lost"
        )
    if code == SQLITE_FULL:
        return StoreError(
            f"no space left on {Path(path).parent} for {path}: free some space and start tsd again"
        )
    if code in (_SQLITE_CANTOPEN, _SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR):
        return StoreError(
            f"cannot read or write {path} ({exc}): check that root owns it and its directory"
            " and that the disk is healthy, then start tsd again"
        )
    return StoreError(f"cannot use {path}: {exc}")


class Store(OwedUsage):
    """The daemon's durable state."""

    def __init__(self, path: str | os.PathLike[str], durable: bool = True) -> None:
        """Open (creating if needed) the state database at `path`.

        `durable=False` skips fsync; only tools that seed a database in bulk
        (the benchmarks) use it, never the daemon.
        """
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self._init_group()
        # uid -> that user's settings, as stored: read at every launch, written rarely.
        self._settings: dict[int, dict[str, str]] = {}
        # The last environment read, with its text: jobs submitted from one shell share
        # it, and the launch of each job reads it (env_of).
        self._last_env: tuple[str, tuple[tuple[str, str], ...]] = ("", ())
        try:
            self._open(durable)
        except sqlite3.Error as exc:
            raise unusable(path, exc) from None

    def _open(self, durable: bool) -> None:
        path = self.path
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
        self.db.execute("PRAGMA busy_timeout=5000")
        for stmt in _SCHEMA.strip().split(";"):
            if stmt.strip():
                self.db.execute(stmt)
        _add_missing_columns(self.db)
        _move_envs_out(self.db)
        _order_accounting(self.db)
        self._init_owed()
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(
                f"{path}: state schema version {row[0]}, this tsd understands {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        """Commit what is open (and what usage is owed) and close the database."""
        self._pay_at_close()
        self.close_group()
        self.db.close()

    # ------------------------------------------------------------ jobs

    def add_job(
        self, uid: int, user: str, spec: JobSpec, order: int, enqueue_time: float
    ) -> Job:
        """Insert a queued job and return it with its new, never reused id."""
        return self.add_jobs(uid, user, [(spec, order)], enqueue_time)[0]

    def add_jobs(
        self,
        uid: int,
        user: str,
        specs: list[tuple[JobSpec, int]],
        enqueue_time: float,
        state: JobState = JobState.QUEUED,
        reorder: Mapping[int, int] | None = None,
        array: bool = False,
    ) -> list[Job]:
        """Insert jobs (spec, order key) and move older ones (id -> new key), in ONE
        transaction: an --array is stored whole or not at all. With `array`, every
        spec gets `array_job`, the id of the first one."""
        jobs: list[Job] = []
        with self._tx():
            for spec, order in specs:
                if array:
                    spec = replace(spec, options=replace(
                        spec.options, array_job=jobs[0].id if jobs else None))
                cur = self.db.execute(
                    "INSERT INTO jobs (uid, user, spec, state, ord, enqueue)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (uid, user, spec_to_row(spec),
                     state.value, order, enqueue_time),
                )  # fmt: skip
                assert cur.lastrowid is not None
                self.db.execute(
                    "INSERT INTO job_envs (id, env) VALUES (?, ?)",
                    (cur.lastrowid, json.dumps(spec.env)),
                )
                if array and not jobs:  # the first element names the array: itself
                    spec = replace(spec, options=replace(spec.options, array_job=cur.lastrowid))
                    self.db.execute(
                        "UPDATE jobs SET spec=? WHERE id=?",
                        (spec_to_row(spec), cur.lastrowid),
                    )
                jobs.append(Job(id=cur.lastrowid, uid=uid, user=user, spec=_without_env(spec),
                                state=state, order=order, enqueue_time=enqueue_time))  # fmt: skip
            self.db.executemany(
                "UPDATE jobs SET ord=? WHERE id=?", [(k, i) for i, k in (reorder or {}).items()]
            )
        return jobs

    def save(self, *jobs: Job) -> None:
        """Write the mutable fields of these jobs in one transaction."""
        with self._tx():
            self._update(jobs)

    def save_ended(
        self, job: Job, usage: tuple[int, float, float] | None, ran: Job | None = None
    ) -> None:
        """A job's end and its accounting row, in one transaction, and its user's new
        usage (uid, value, at) and usage totals owed (tsd.owedusage): the history
        never misses an end nor counts one twice.

        `ran` is the run that ended when `job` is that job queued again (a failed
        --retry attempt, an idle-GPU requeue): the attempt is history and usage too.
        """
        again = ran is not None
        run_of = job if ran is None else ran
        started = run_of.start_time is not None and (again or job.state is JobState.FINISHED)
        end = run_of.end_time or (time.time() if again else job.enqueue_time)
        run = max(0.0, end - (run_of.start_time or end)) if started else 0.0
        wait = max(0.0, (run_of.start_time or 0.0) - job.enqueue_time) if started else None
        failed = again or not (
            job.state is JobState.FINISHED and job.exit is not None and job.exit.success
        )
        slots, gpus = (max(1, job.spec.slots), len(run_of.gpu_ids)) if started else (0, 0)
        with self._tx():
            self._update((job,))
            self.db.execute(
                "INSERT OR IGNORE INTO accounting VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.uid, job.user, end, slots, gpus, run, wait, int(failed),
                 self._next_seq()),
            )
        # The Prometheus counters too (see save_run), as the ledger replays them.
        self.owe(usage, job.user, run * slots, run * gpus)
        self.pay_if_due()

    def load_usage(self) -> dict[int, tuple[float, float]]:
        """Every user's decayed usage and the time it is valid at."""
        rows = self.db.execute("SELECT uid, value, at FROM usage")
        return {int(u): (float(v), float(a)) for u, v, a in rows}

    def set_usage(self, uid: int, value: float, at: float) -> None:
        """Record a user's decayed usage (a charge from outside a job's end)."""
        self.pay()  # first: the row written here is newer than the one owed
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO usage VALUES (?, ?, ?)", (uid, value, at))

    def set_usages(self, rows: Iterable[tuple[int, float, float]]) -> None:
        """Record several users' usage (uid, value, at) in one transaction."""
        self.pay()
        with self._tx():
            self.db.executemany("INSERT OR REPLACE INTO usage VALUES (?, ?, ?)", list(rows))

    def stats(self, since: float, uid: int | None = None) -> list[StatsRow]:
        """Per user, the jobs that ended at or after `since` (one user's with `uid`)."""
        where, args = "end_ >= ?", [since]
        if uid is not None:
            where, args = where + " AND uid = ?", [since, uid]
        rows = self.db.execute(
            "SELECT uid, MAX(user), COUNT(*), SUM(failed), SUM(slots * run_s), SUM(gpus * run_s),"
            f" AVG(wait_s) FROM accounting WHERE {where} GROUP BY uid ORDER BY MAX(user), uid",
            args,
        ).fetchall()
        return [
            StatsRow(int(r[0]), str(r[1]), int(r[2]), int(r[3]), float(r[4] or 0),
                     float(r[5] or 0), None if r[6] is None else float(r[6]))
            for r in rows
        ]

    def prune_accounting(self, before: float) -> int:
        """Forget the history of jobs that ended before `before`; how many rows went."""
        self.pay()  # a row not paid for yet must not go
        with self._tx():
            cur = self.db.execute("DELETE FROM accounting WHERE end_ < ?", (before,))
        return cur.rowcount

    def _update(self, jobs: Iterable[Job]) -> None:
        # One job (each start and each end writes one): execute, without executemany's
        # list and iterator.
        rows = list(map(_update_row, jobs))
        if len(rows) == 1:
            self.db.execute(_UPDATE, rows[0])
        else:
            self.db.executemany(_UPDATE, rows)

    def save_run(self, job: Job, slot_seconds: float, gpu_seconds: float) -> None:
        """Save a job whose run just ended and add the run to its user's usage totals.

        One transaction: the totals (Prometheus counters) never miss a run nor count
        one twice, whatever crash comes between. They outlive the job (ts -C, the
        finished cap).
        """
        with self._tx():
            self._update([job])
            self._add_totals(job.user, slot_seconds, gpu_seconds)

    def delete(self, ids: Iterable[int]) -> None:
        """Forget these jobs (cleared, removed, or dropped beyond TS_MAXFINISHED)."""
        rows = [(i,) for i in ids]
        with self._tx():
            self.db.executemany("DELETE FROM jobs WHERE id=?", rows)
            self.db.executemany("DELETE FROM job_envs WHERE id=?", rows)
            self.db.executemany("DELETE FROM slurm_jobs WHERE job_id=?", rows)
            self.db.executemany("DELETE FROM gpu_peaks WHERE id=?", rows)

    def load_all(self) -> list[Job]:
        """Every job, without environments, in id order (StoreError when unreadable)."""
        decoder = RowDecoder()
        jobs: list[Job] = []
        try:
            slurm = {int(i): (int(s), t) for i, s, t in self.db.execute(
                "SELECT job_id, slurm_id, task FROM slurm_jobs")}  # fmt: skip
            cur = self.db.execute(
                "SELECT id, uid, user, spec, state, ord, enqueue, start, end_, exit, pid,"
                " sup_pid, sup_start, gpu_ids, gpu_uuids, output, unit, attempts"
                " FROM jobs ORDER BY id"
            )
            # In batches, not all rows at once: the rows' texts are garbage once decoded,
            # and 100,000 of them at a time would stay in the daemon's memory for good.
            while rows := cur.fetchmany(1024):
                jobs += map(decoder.job, rows)
            # The scan filled SQLite's page cache with pages the daemon rarely reads
            # again (it serves from memory): give them back rather than keep 2 MiB.
            self.db.execute("PRAGMA shrink_memory")
        except sqlite3.DatabaseError as exc:
            raise unusable(self.path, exc) from None
        if not slurm:
            return jobs
        return [
            replace(j, slurm_id=slurm[j.id][0],
                    slurm_task=None if slurm[j.id][1] is None else int(slurm[j.id][1]))
            if j.id in slurm else j
            for j in jobs
        ]  # fmt: skip

    def set_slurm_id(self, job_id: int, slurm_id: int, output: str | None) -> None:
        """Record the Slurm job a job was forwarded to, and its output path, in one commit."""
        self.set_slurm_ids([(job_id, slurm_id, None, output)])

    def set_slurm_ids(self, rows: Iterable[tuple[int, int, int | None, str | None]]) -> None:
        """Record (job id, Slurm id, array task index or None, output path) for several
        jobs in ONE commit: an --array's elements are all recorded or none."""
        rows = list(rows)
        with self._tx():
            self.db.executemany(
                "INSERT OR REPLACE INTO slurm_jobs (job_id, slurm_id, task) VALUES (?, ?, ?)",
                [(j, s, t) for j, s, t, _ in rows],
            )
            self.db.executemany(
                "UPDATE jobs SET output=? WHERE id=?", [(o, j) for j, _, _, o in rows]
            )

    def env_of(self, job_id: int) -> tuple[tuple[str, str], ...]:
        """A job's submit-time environment."""
        row = self.db.execute("SELECT env FROM job_envs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            return ()
        text, (last_text, last) = row[0], self._last_env
        if text != last_text:
            # Stored by json.dumps of the spec's (str, str) pairs: strings they come back as.
            last = tuple(map(tuple, json.loads(text)))
            self._last_env = (text, last)
        return last

    # -------------------------------------------------------- GPU memory peaks

    def gpu_peaks(self) -> dict[int, int]:
        """job id -> the most GPU memory (MiB) its processes were seen using."""
        rows = self.db.execute("SELECT id, peak_mib FROM gpu_peaks")
        return {int(i): int(m) for i, m in rows}

    def set_gpu_peaks(self, peaks: dict[int, int]) -> None:
        """Record new GPU memory peaks (job id -> MiB) in one transaction."""
        with self._tx():
            self.db.executemany(
                "INSERT OR REPLACE INTO gpu_peaks VALUES (?, ?)", list(peaks.items())
            )

    # -------------------------------------------------------- settings

    def get_setting(self, key: str) -> str | None:
        """A server-wide setting (slots override, GPU threshold)."""
        row = self.db.execute("SELECT value FROM meta WHERE key=?", ("s:" + key,)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str | None) -> None:
        """Set or (with None) clear a server-wide setting."""
        with self._tx():
            if value is None:
                self.db.execute("DELETE FROM meta WHERE key=?", ("s:" + key,))
            else:
                self.db.execute(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)", ("s:" + key, value)
                )

    def user_settings(self, uid: int) -> dict[str, str]:
        """All of one user's settings (env:NAME, logdir)."""
        settings = self._settings.get(uid)
        if settings is None:
            rows = self.db.execute("SELECT key, value FROM user_settings WHERE uid=?", (uid,))
            settings = self._settings[uid] = {str(k): str(v) for k, v in rows}
        return dict(settings)

    def set_user_setting(self, uid: int, key: str, value: str | None) -> None:
        """Set or (with None) clear one of a user's settings."""
        try:
            with self._tx():
                if value is None:
                    self.db.execute("DELETE FROM user_settings WHERE uid=? AND key=?", (uid, key))
                else:
                    self.db.execute(
                        "INSERT OR REPLACE INTO user_settings VALUES (?, ?, ?)", (uid, key, value)
                    )
        finally:  # read again next time, whatever the write did (or a rollback undoes)
            self._reread_settings(uid)
            self.on_rollback(lambda: self._reread_settings(uid))

    def _reread_settings(self, uid: int) -> None:
        self._settings.pop(uid, None)


def _without_env(spec: JobSpec) -> JobSpec:
    return replace(spec, env=())


# Columns added after the first release: (name, declaration). A database made by an
# older tsd gets them on open, with their defaults; the schema version stays.
_ADDED_COLUMNS = (("attempts", "INTEGER NOT NULL DEFAULT 0"),)


# slurm_jobs.task: the Slurm array task index of an --array element (NULL otherwise).
_ADDED_SLURM_COLUMNS = (("task", "INTEGER"),)

# accounting.seq (see _ACCOUNTING): 0 in the rows from before, whose usage is written.
_ADDED_ACCOUNTING_COLUMNS = (("seq", "INTEGER NOT NULL DEFAULT 0"),)


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {str(row[1]) for row in db.execute(f"PRAGMA table_info({table})")}


def _move_envs_out(db: sqlite3.Connection) -> None:
    """A database from before job_envs: its jobs' environments move there, in one
    transaction (a crash in it leaves the database as it was, to be moved next time)."""
    if "env" not in _columns(db, "jobs"):
        return
    log.info("moving the jobs' environments into their own table (once)")
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("INSERT OR REPLACE INTO job_envs (id, env) SELECT id, env FROM jobs")
        db.execute("ALTER TABLE jobs DROP COLUMN env")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _order_accounting(db: sqlite3.Connection) -> None:
    """A database from before the accounting table was kept in end order (a table and
    an index on its end): its rows move to one of the new shape, in one transaction
    (a crash in it leaves the database as it was, to be moved next time)."""
    row = db.execute("SELECT sql FROM sqlite_master WHERE name='accounting'").fetchone()
    if row is None or "WITHOUT ROWID" in str(row[0]).upper():
        return
    log.info("keeping the accounting history in end order (once)")
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(f"CREATE TABLE accounting_in_order {_ACCOUNTING}")
        columns = "job_id, uid, user, end_, slots, gpus, run_s, wait_s, failed"
        db.execute(f"INSERT OR IGNORE INTO accounting_in_order ({columns})"
                   f" SELECT {columns} FROM accounting")  # fmt: skip
        db.execute("DROP TABLE accounting")  # and its index with it
        db.execute("ALTER TABLE accounting_in_order RENAME TO accounting")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _add_missing_columns(db: sqlite3.Connection) -> None:
    for table, added in (
        ("jobs", _ADDED_COLUMNS), ("slurm_jobs", _ADDED_SLURM_COLUMNS),
        ("accounting", _ADDED_ACCOUNTING_COLUMNS),
    ):
        have = _columns(db, table)
        for name, decl in added:
            if name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")

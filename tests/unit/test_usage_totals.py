"""Per-user usage totals (the Prometheus counters' base): kept in SQLite with each run's end."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from unit.daemon_fakes import Events, spec

from tsd.config import Config
from tsd.jobtable import JobTable
from tsd.ledger import Ledger
from tsd.model import ExitInfo, Job, JobState
from tsd.store import Store


def started(
    table: JobTable, uid: int, user: str, slots: int = 1, gpus: tuple[int, ...] = ()
) -> Job:
    job = table.add(uid, user, spec(slots=slots, gpus=len(gpus)))
    table.begin_run(job, gpus, tuple(f"GPU-{i}" for i in gpus))
    return table.launched(job.id, 4242, 1, None)


def test_a_runs_end_adds_its_slot_and_gpu_seconds_which_survive_clear_and_reopen(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "state.db")
    table = JobTable(store, Events(), lambda: 1000)
    job = started(table, 1000, "alice", slots=2, gpus=(0, 1, 2))
    assert job.start_time is not None
    table.finish(job.id, ExitInfo(code=0), job.start_time + 10.0, None)
    cpu = started(table, 1000, "alice")
    assert cpu.start_time is not None
    table.finish(cpu.id, ExitInfo(code=1), cpu.start_time + 4.0, None)
    assert store.usage_totals() == {"alice": (pytest.approx(24.0), pytest.approx(30.0))}
    assert table.clear(1000) == 2  # ts -C forgets the jobs, not what they used
    store.close()
    again = Store(tmp_path / "state.db")
    assert again.usage_totals() == {"alice": (pytest.approx(24.0), pytest.approx(30.0))}
    again.close()


def test_a_job_requeued_with_a_notice_is_charged_for_its_run_and_keeps_the_notice(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "state.db")
    table = JobTable(store, Events(), lambda: 1000)
    job = started(table, 1000, "bob", gpus=(3,))
    back = table.requeue(job.id, notice="idle GPU: requeued")
    assert back.state is JobState.QUEUED and back.gpu_ids == () and back.start_time is None
    assert back.notice == "idle GPU: requeued"
    slot_s, gpu_s = store.usage_totals()["bob"]
    assert slot_s == gpu_s and slot_s >= 0
    # A launch that never ran (no notice) is not charged.
    other = started(table, 1000, "carol")
    table.requeue(other.id)
    assert "carol" not in store.usage_totals()
    store.close()


def test_the_job_end_and_its_usage_are_one_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    table = JobTable(store, Events(), lambda: 1000)
    job = started(table, 1000, "dave")
    # The usage write fails after the job's row was updated: the row must roll back too.
    store.db.execute("CREATE TRIGGER nospace BEFORE INSERT ON usage_totals BEGIN "
                     "SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(sqlite3.IntegrityError):
        table.finish(job.id, ExitInfo(code=0), (job.start_time or 0) + 5.0, None)
    assert store.usage_totals() == {}
    assert [j.state for j in store.load_all()] == [JobState.RUNNING]
    assert table.running[job.id].state is JobState.RUNNING
    store.close()


def test_a_failed_retry_attempt_counts_in_fair_share_history_and_totals(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    ledger = Ledger(store, Config)
    table = JobTable(store, Events(), lambda: 1000, save_end=ledger.save_ended)
    job = started(table, 1000, "erin", slots=2, gpus=(1,))
    table.running[job.id] = job = replace(job, start_time=(job.start_time or 0) - 50.0)
    again = table.requeue(job.id, failed=ExitInfo(code=3))
    assert again.state is JobState.QUEUED
    # The attempt ran ~50 s on 2 slots and 1 GPU; it is not free because it is queued again.
    assert ledger.usage_now(1000, []) == pytest.approx(50 * 2 + 4 * 50, rel=0.05)
    (row,) = ledger.stats(0.0, 1000)
    assert (row.jobs, row.failed) == (1, 1)
    assert row.slot_seconds == pytest.approx(100.0, rel=0.05)
    assert store.usage_totals()["erin"] == (pytest.approx(100.0, rel=0.05),
                                            pytest.approx(50.0, rel=0.05))
    store.close()


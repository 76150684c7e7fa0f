"""The store on a full disk and on a corrupt file: specific errors, nothing half-done."""

from __future__ import annotations

from pathlib import Path

import pytest
from unit.daemon_fakes import Events, FakeStore, spec

from tsd.errors import StorageFull
from tsd.jobtable import JobTable
from tsd.model import ExitInfo, Job, JobState
from tsd.store import Store, StoreError


def full(store: Store) -> None:
    """Make every further page allocation fail with SQLITE_FULL, as a full disk does."""
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count={pages}")


def test_a_submit_on_a_full_disk_is_storage_full_in_one_line_and_stores_nothing(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "state.db")
    table = JobTable(store, Events(), lambda: 1000)
    kept = table.add(1000, "alice", spec("true"))
    full(store)
    with pytest.raises(StorageFull) as err:
        for _ in range(200):  # until a page is needed
            table.add(1000, "alice", spec("x" * 3000))
    assert str(err.value) == f"the server cannot store the job: no space left on {tmp_path}"
    ids = {j.id for j in store.load_all()}
    assert kept.id in ids and ids == set(table.jobs)  # memory and disk agree
    store.db.execute("PRAGMA max_page_count=1073741823")
    assert table.add(1000, "alice", spec("true")).id > max(ids)


def test_a_corrupt_state_file_is_one_line_naming_it_and_what_to_do(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    db.write_bytes(b"\x5a" * 8192)
    with pytest.raises(StoreError) as err:
        Store(db)
    assert str(err.value) == (
        f"{db} is not a database (corrupt): move it aside and start tsd again;"
        " the jobs in it are lost"
    )


class FullOnceStore(FakeStore):
    """A store whose writes fail with StorageFull while `full` is set."""

    full = False

    def save(self, *jobs: Job) -> None:
        if self.full:
            raise StorageFull("no space left on /var/lib/tsd", "/var/lib/tsd")
        super().save(*jobs)


def test_a_job_ending_on_a_full_disk_stays_running_until_its_end_is_stored() -> None:
    store = FullOnceStore()
    table = JobTable(store, Events(), lambda: 1000)
    job = table.add(1000, "alice", spec("true"))
    table.begin_run(job, (), ())
    table.launched(job.id, 4000, 1, None)
    store.full = True
    with pytest.raises(StorageFull):
        table.finish(job.id, ExitInfo(code=3), 1.0, None)
    assert job.id in table.running and table.jobs[job.id].state is JobState.RUNNING
    store.full = False
    done = table.finish(job.id, ExitInfo(code=3), 1.0, None)
    assert done is not None and store.rows[job.id].exit == ExitInfo(code=3)
    assert job.id not in table.running


def test_a_launch_that_cannot_be_stored_goes_back_to_the_queue_unchanged() -> None:
    store = FullOnceStore()
    table = JobTable(store, Events(), lambda: 1000)
    job = table.add(1000, "alice", spec("true"))
    table.begin_run(job, (), ())
    store.full = True
    with pytest.raises(StorageFull):
        table.launched(job.id, 4000, 1, None)
    table.unlaunch(job.id)
    assert table.pending == [job.id] and table.launching == {} and table.running == {}
    assert table.is_queued(table.jobs[job.id])

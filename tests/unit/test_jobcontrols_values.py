"""`--begin WHEN` and `--array SPEC` as text, and the job controls' records in the store."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime
from pathlib import Path

import pytest
from unit.daemon_fakes import Events

from tsd import protocol
from tsd.errors import BadRequest
from tsd.jobcontrols import MAX_ARRAY, parse_array, parse_when
from tsd.jobtable import JobTable
from tsd.model import ExitInfo, JobSpec, JobState
from tsd.store import Store

NOW = time.mktime((2026, 6, 15, 12, 0, 0, 0, 0, -1))  # local noon


def test_begin_offsets_count_from_now() -> None:
    assert parse_when("+90s", NOW) == NOW + 90
    assert parse_when("+30m", NOW) == NOW + 1800
    assert parse_when("+2h", NOW) == NOW + 7200
    assert parse_when("+45", NOW) == NOW + 45


def test_begin_time_of_day_is_the_next_such_local_time() -> None:
    later = datetime.fromtimestamp(parse_when("14:30", NOW))
    assert (later.day, later.hour, later.minute) == (15, 14, 30)
    tomorrow = datetime.fromtimestamp(parse_when("08:00", NOW))
    assert (tomorrow.day, tomorrow.hour, tomorrow.minute) == (16, 8, 0)
    assert datetime.fromtimestamp(parse_when("12:00", NOW)).day == 16  # now is not "next"


def test_begin_iso_is_local_time() -> None:
    assert parse_when("2026-12-03T08:00", NOW) == datetime(2026, 12, 3, 8, 0).timestamp()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("yesterday", "is not a time"),
        ("+", "is not a time"),
        ("+5x", "is not a time"),
        ("-5m", "is not a time"),
        ("25:00", "not a time of day"),
        ("2020-01-01T00:00", "in the past"),
        ("+99999d", "too far ahead"),
    ],
)
def test_bad_begin_values_are_one_line_errors(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as err:
        parse_when(text, NOW)
    assert "\n" not in str(err.value)


def test_array_specs_give_their_indices_and_throttle() -> None:
    assert parse_array("1-4") == ((1, 2, 3, 4), None)
    assert parse_array("0-10:5") == ((0, 5, 10), None)
    assert parse_array("3,1,7%2") == ((3, 1, 7), 2)
    assert parse_array("5") == ((5,), None)
    assert len(parse_array(f"1-{MAX_ARRAY}")[0]) == MAX_ARRAY


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("5-1", "ends before it starts"),
        (f"1-{MAX_ARRAY + 1}", "over the limit"),
        ("1-5:0", "step must be at least 1"),
        ("1-5%0", "at least 1"),
        ("1,1", "repeated"),
        ("a-b", "not an array index"),
        ("", "not an array index"),
        ("1:2", "needs a range"),
    ],
)
def test_bad_array_specs_are_one_line_errors(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_array(text)


def _submit(**extra: object) -> dict[str, object]:
    spec: dict[str, object] = {"command": ["true"], "cwd": "/", "env": []}
    spec.update(extra.pop("spec", {}))  # type: ignore[call-overload]
    return {"v": protocol.PROTOCOL_VERSION, "op": "submit", "spec": spec, **extra}


@pytest.mark.parametrize(
    "wire",
    [
        _submit(spec={"priority": 1000}),
        _submit(spec={"retry": -1}),
        _submit(spec={"retry": 101}),
        _submit(spec={"begin": "soon"}),
        _submit(spec={"retry": 1, "output_name": "log"}),
        _submit(array="5-1"),
        _submit(array="1-3", spec={"output_name": "log"}),
        _submit(array="1-3", spec={"store_output": False}),
    ],
)
def test_the_daemon_refuses_bad_controls_from_the_wire(wire: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        protocol.parse_request(wire)


def test_an_array_is_stored_in_one_transaction_named_by_its_first_id(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    table = JobTable(store, Events(), lambda: 100)
    table.add(1000, "alice", JobSpec(command=("x",), cwd="/", env=()))
    specs = [JobSpec(command=("x",), cwd="/", env=(), array_task=i) for i in (3, 5)]
    jobs = table.add_many(1000, "alice", specs, held=True, array=True)
    assert [j.spec.array_job for j in jobs] == [jobs[0].id, jobs[0].id]
    again = {j.id: j for j in Store(tmp_path / "state.db").load_all()}
    assert [again[j.id].spec.array_task for j in jobs] == [3, 5]
    assert all(again[j.id].state is JobState.HELD for j in jobs)
    assert again[jobs[1].id].spec.array_job == jobs[0].id


def test_priority_places_a_job_on_its_owners_positions_durably(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    table = JobTable(store, Events(), lambda: 100)
    spec = JobSpec(command=("x",), cwd="/", env=())
    a = table.add(1000, "alice", spec)
    b = table.add(2000, "bob", spec)
    c = table.add_many(1000, "alice", [JobSpec(command=("x",), cwd="/", env=(), priority=5)])[0]
    assert [j.id for j in table.queue()] == [c.id, b.id, a.id]
    reloaded = JobTable(Store(tmp_path / "state.db"), Events(), lambda: 100)
    reloaded.load()
    assert [j.id for j in reloaded.queue()] == [c.id, b.id, a.id]


def test_held_state_and_attempts_survive_a_reload(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    table = JobTable(store, Events(), lambda: 100)
    job = table.add(1000, "alice", JobSpec(command=("x",), cwd="/", env=(), retry=2))
    table.set_held(job, True)
    table.set_held(table.jobs[job.id], False)
    started = table.begin_run(table.jobs[job.id], (), ())
    table.launched(started.id, 4242, 1, None)
    again = table.requeue(job.id, failed=ExitInfo(code=1))
    assert again.state is JobState.QUEUED and again.attempts == 1
    assert again.wait_reason == "attempt 1 ended with exit 1"
    loaded = {j.id: j for j in Store(tmp_path / "state.db").load_all()}
    assert loaded[job.id].attempts == 1 and loaded[job.id].spec.retry == 2
    table.set_held(again, True)
    assert Store(tmp_path / "state.db").load_all()[0].state is JobState.HELD


def test_an_older_database_gets_the_attempts_column(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE jobs DROP COLUMN attempts")
    db.execute(
        "INSERT INTO jobs (uid, user, spec, state, ord, enqueue) VALUES"
        " (1000, 'alice', '{\"command\": [\"x\"], \"cwd\": \"/\", \"umask\": 18, \"slots\": 1,"
        " \"gpus\": 0, \"depends\": [], \"depend_mode\": \"after\", \"store_output\": true,"
        " \"gzip\": false, \"stderr_apart\": false, \"mail\": false}', 'queued', 1, 0)"
    )
    db.commit()
    db.close()
    (job,) = Store(path).load_all()
    assert job.attempts == 0 and job.spec.retry == 0 and job.spec.begin is None


class _NoGpus:
    """tsd.dispatch.Gpus for CPU jobs only: nothing to read, no poll to arm."""

    def request(self, max_age: float) -> bool:
        return True

    def cached(self) -> tuple[None, str]:
        return None, ""

    def pool(self) -> None:
        return None

    def free(self, held: dict[int, int], tsd_pids: set[int], threshold: float) -> tuple[()]:
        return ()

    def busy(self, held: dict[int, int], tsd_pids: set[int], threshold: float) -> dict[int, str]:
        return {}

    def arm_poll(self, seconds: float) -> None:
        raise AssertionError("CPU jobs never poll the GPUs")

    def stop_poll(self) -> None:
        pass


def test_the_dispatcher_sets_one_wake_up_for_the_earliest_begin_and_explains_holds() -> None:
    from unit.daemon_fakes import FakeStore

    from tsd.config import Config
    from tsd.dispatch import Dispatcher
    from tsd.policy import Policy

    store = FakeStore()
    table = JobTable(store, Events(), lambda: 100)
    wakes: list[float | None] = []
    started: list[int] = []
    dispatcher = Dispatcher(
        table, Policy(Config(slots=4), store, system=False), _NoGpus(),
        lambda job, gpus: started.append(job.id), lambda: 5.0, wake=wakes.append,
    )  # fmt: skip
    soon, later = time.time() + 60, time.time() + 600
    a = table.add(1000, "alice", JobSpec(command=("x",), cwd="/", env=(), begin=later))
    b = table.add(1000, "alice", JobSpec(command=("x",), cwd="/", env=(), begin=soon))
    held = table.add_many(1000, "alice", [JobSpec(command=("x",), cwd="/", env=())], held=True)
    dispatcher.schedule()
    assert started == [] and wakes[-1] == soon
    assert table.jobs[held[0].id].state is JobState.HELD  # the pass left the hold alone
    assert dispatcher.explain(table.jobs[held[0].id]).wait_reason.startswith("held: ")
    assert dispatcher.explain(table.jobs[b.id]).wait_reason.startswith("begins at ")
    table.remove(table.jobs[a.id])
    table.remove(table.jobs[b.id])
    table.remove(table.jobs[held[0].id])
    dispatcher.schedule()
    assert wakes[-1] is None  # nothing waits for a time: the timer goes

"""One codec for records, used by the wire, the store and the exit report."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import fields, replace
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tsd import codec, exitreport, jobrows, model, protocol
from tsd.exitreport import ExitReport
from tsd.model import DependMode, ExitInfo, Job, JobSpec, JobState
from tsd.store import Store


def a_job() -> Job:
    spec = JobSpec(
        command=("sh", "-c", "exit 3"), cwd="/tmp", env=(), label="l", gpus=2,
        gpu_indices=(1, 3), depends=(4,), depend_mode=DependMode.SUCCESS, timeout=2.5,
    )
    return Job(
        id=9, uid=1000, user="alice", spec=spec, state=JobState.FINISHED, order=3,
        enqueue_time=1.0, start_time=2.0, end_time=3.0,
        exit=ExitInfo(code=3, cpu_seconds=0.5, max_rss=1024, note="n"), pid=42,
        gpu_ids=(1, 3), gpu_uuids=("GPU-1", "GPU-3"), output_path="/tmp/o", unit="u",
    )


def test_a_job_survives_the_wire_and_the_store_unchanged(tmp_path: Path) -> None:
    job = a_job()
    assert protocol.job_from_wire(json.loads(json.dumps(codec.job_to_dict(job)))) == job
    store = Store(tmp_path / "state.db", durable=False)
    added = store.add_job(job.uid, job.user, job.spec, job.order, job.enqueue_time)
    saved = replace(job, id=added.id)
    store.save(saved)
    assert store.load_all() == [saved]
    store.close()


def test_the_daemons_fast_copy_of_a_job_equals_dataclasses_replace_whatever_changes() -> None:
    job = a_job()
    for f in fields(Job):
        value = object()
        copied = model.replace(job, **{f.name: value})
        assert copied == replace(job, **{f.name: value}) and getattr(copied, f.name) is value
    assert model.replace(job) == job and model.replace(job) is not job
    assert job == a_job()  # the original is left as it was
    # Any other record is copied by dataclasses.replace itself.
    assert model.replace(job.spec, label="x") == replace(job.spec, label="x")


def test_exit_info_encodes_in_field_order_as_before() -> None:
    ex = ExitInfo(code=1, signal=None, timed_out=True, lost=False, cpu_seconds=None)
    assert list(codec.exit_to_dict(ex)) == [f.name for f in fields(ex)]
    assert codec.exit_from_dict(codec.exit_to_dict(ex)) == ex


def test_exit_report_round_trips_and_reads_dash_as_no_output(tmp_path: Path) -> None:
    exitreport.write(str(tmp_path), 5, ExitReport(ExitInfo(signal=9), end=7.0, output=None))
    assert json.loads(Path(exitreport.path(tmp_path, 5)).read_text())["output"] == "-"
    assert exitreport.read(tmp_path, 5) == ExitReport(ExitInfo(signal=9), end=7.0, output=None)
    exitreport.discard(tmp_path, 5)
    assert exitreport.read(tmp_path, 5) is None


def test_a_timed_out_report_without_a_note_says_timed_out(tmp_path: Path) -> None:
    exitreport.write(str(tmp_path), 1, ExitReport(ExitInfo(signal=15, timed_out=True), end=1.0))
    report = exitreport.read(tmp_path, 1)
    assert report is not None and report.exit.note == "timed out"


def test_an_aborted_report_reads_as_aborted(tmp_path: Path) -> None:
    exitreport.write(str(tmp_path), 2, ExitReport(ExitInfo(), aborted=True))
    report = exitreport.read(tmp_path, 2)
    assert report is not None and report.aborted


def test_specs_load_as_written_whatever_their_commands_and_options(tmp_path: Path) -> None:
    # The loader decodes the text after a spec's command once per distinct text: specs
    # that share it, specs that differ, commands that look like JSON of a spec, and a
    # row written by an older tsd (keys missing, another order) all come back whole.
    specs = [
        JobSpec(command=("echo", str(i)), cwd="/tmp", env=()) for i in range(3)
    ] + [
        JobSpec(command=("x", '], "cwd": "/etc", "umask": 0}'), cwd="/srv", env=(), slots=2),
        JobSpec(command=(), cwd="/tmp", env=(), label="ünï", gpus=1, depends=(1, 2)),
        JobSpec(command=("a\\", '"', "\u2603"), cwd="/tmp", env=(), priority=-3, retry=2,
                array_job=1, array_task=4, array_throttle=2, gpu_mem=512, begin=5.0),
    ]
    store = Store(tmp_path / "state.db", durable=False)
    added = [store.add_job(1000, "alice", spec, i, 1.0) for i, spec in enumerate(specs)]
    old = {"cwd": "/old", "command": ["true"], "umask": 18, "slots": 1, "gpus": 0,
           "depends": [], "depend_mode": "after", "store_output": True, "gzip": False,
           "stderr_apart": False, "mail": False}
    store.db.execute("UPDATE jobs SET spec=? WHERE id=?", (json.dumps(old), added[0].id))
    loaded = store.load_all()
    store.close()
    assert [j.spec for j in loaded[1:]] == [replace(s, env=()) for s in specs[1:]]
    assert loaded[0].spec == JobSpec(command=("true",), cwd="/old", env=())
    assert loaded[1].spec.cwd is loaded[2].spec.cwd  # one object for a repeated value


def test_a_database_from_before_keeps_its_jobs_and_loses_only_the_unused_state_index(
    tmp_path: Path,
) -> None:
    # Older tsd indexed jobs by state: no query read it, every state change wrote it.
    job = a_job()
    store = Store(tmp_path / "state.db", durable=False)
    added = store.add_job(job.uid, job.user, job.spec, job.order, job.enqueue_time)
    store.db.execute("CREATE INDEX jobs_state ON jobs(state)")
    store.close()
    store = Store(tmp_path / "state.db", durable=False)
    indexes = {
        str(r[0]) for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='index'")
    }
    assert "jobs_state" not in indexes
    assert [j.id for j in store.load_all()] == [added.id]
    store.close()


# The jobs table as tsd wrote it before environments moved to job_envs.
_OLD_JOBS = """CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, uid INTEGER NOT NULL, user TEXT NOT NULL,
    spec TEXT NOT NULL, env TEXT NOT NULL, state TEXT NOT NULL, ord INTEGER NOT NULL,
    enqueue REAL NOT NULL, start REAL, end_ REAL, exit TEXT, pid INTEGER, sup_pid INTEGER,
    sup_start INTEGER, gpu_ids TEXT NOT NULL DEFAULT '[]',
    gpu_uuids TEXT NOT NULL DEFAULT '[]', output TEXT, unit TEXT,
    attempts INTEGER NOT NULL DEFAULT 0)"""


def test_a_database_with_environments_in_its_jobs_rows_keeps_every_job_and_environment(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute(_OLD_JOBS)
    spec = ('{"command": ["x", "%d"], "cwd": "/tmp", "umask": 18, "slots": 1, "gpus": 0,'
            ' "depends": [], "depend_mode": "after", "store_output": true, "gzip": false,'
            ' "stderr_apart": false, "mail": false}')
    db.executemany(
        "INSERT INTO jobs (uid, user, spec, env, state, ord, enqueue) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(1000, "alice", spec % i, json.dumps([["HOME", f"/h{i}"], ["A", "b"]]), "queued", i, 1.0)
         for i in range(3)],
    )  # fmt: skip
    db.commit()
    db.close()
    store = Store(path, durable=False)
    assert [j.spec.command for j in store.load_all()] == [("x", str(i)) for i in range(3)]
    assert [store.env_of(i) for i in (1, 2, 3)] == [
        (("HOME", f"/h{i}"), ("A", "b")) for i in range(3)
    ]
    columns = {str(r[1]) for r in store.db.execute("PRAGMA table_info(jobs)")}
    assert "env" not in columns and "spec" in columns
    new = JobSpec(command=("y",), cwd="/", env=(("C", "d"),))
    added = store.add_job(1000, "alice", new, 3, 2.0)
    assert added.id == 4 and store.env_of(4) == (("C", "d"),)
    store.delete([1, 4])
    assert store.env_of(1) == () and store.env_of(4) == ()
    store.close()
    again = Store(path, durable=False)  # moved once: opening again changes nothing
    assert [j.id for j in again.load_all()] == [2, 3]
    assert again.env_of(2) == (("HOME", "/h1"), ("A", "b"))
    again.close()


def test_each_job_gets_its_own_environment_when_neighbours_share_or_differ(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "state.db", durable=False)
    shell = (("HOME", "/h"), ("PATH", "/bin"))
    other = (("HOME", "/other"),)
    ids = [store.add_job(1000, "alice", JobSpec(command=("x",), cwd="/", env=env), i, 1.0).id
           for i, env in enumerate((shell, shell, other, shell))]  # fmt: skip
    assert [store.env_of(i) for i in (*ids, ids[2])] == [shell, shell, other, shell, other]
    store.close()


# A value other than the default for each of a spec's options.
OPTION_VALUES = {
    "gpu_indices": (0, 2), "depend_mode": DependMode.SUCCESS, "store_output": False,
    "gzip": True, "stderr_apart": True, "output_name": "out", "mail": True,
    "timeout": 2.5, "env_info": "info", "forget": True, "begin": 5.0, "priority": -3,
    "retry": 2, "array_job": 7, "array_task": 1, "array_throttle": 4, "gpu_mem": 512,
}  # fmt: skip


def test_each_option_given_to_a_spec_reads_back_and_leaves_the_others_at_their_defaults() -> None:
    assert set(OPTION_VALUES) == set(model.OPTION_NAMES)
    plain = JobSpec(command=("a",), cwd="/", env=())
    for name, value in OPTION_VALUES.items():
        spec = JobSpec(command=("a",), cwd="/", env=(), **{name: value})  # type: ignore[arg-type]
        for other in model.OPTION_NAMES:
            expected = value if other == name else getattr(plain, other)
            assert getattr(spec, other) == expected, (name, other)
        assert spec != plain and replace(spec, **{name: getattr(plain, name)}) == plain


def test_specs_without_options_share_one_options_record_however_they_were_built() -> None:
    built = [
        JobSpec(command=("a",), cwd="/", env=()),
        JobSpec(command=("b",), cwd="/", env=(), timeout=None, gzip=False),
        replace(JobSpec(command=("c",), cwd="/", env=(), gzip=True), gzip=False),
        JobSpec(command=("d",), cwd="/", env=(), options=model.SpecOptions()),
        codec.spec_from_dict(codec.spec_to_dict(JobSpec(command=("e",), cwd="/", env=()))),
    ]
    assert all(s.options is model.PLAIN for s in built)


def test_an_option_given_beside_options_overrides_it_and_can_clear_it() -> None:
    spec = JobSpec(command=("a",), cwd="/", env=(), array_job=3, array_task=1, timeout=9.0)
    cleared = replace(spec, array_job=None, array_task=None)
    assert (cleared.array_job, cleared.array_task, cleared.timeout) == (None, None, 9.0)
    again = JobSpec(command=("a",), cwd="/", env=(), options=spec.options, retry=1)
    assert (again.array_job, again.timeout, again.retry) == (3, 9.0, 1)
    same = JobSpec(command=("a",), cwd="/", env=(), options=model.SpecOptions(
        array_job=3, array_task=1, timeout=9.0))  # fmt: skip
    assert same == spec and hash(same) == hash(spec)


def test_loaded_jobs_submitted_alike_share_their_options(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db", durable=False)
    for i in range(5):
        store.add_job(1000, "alice", JobSpec(command=("echo", str(i)), cwd="/tmp", env=(),
                                             timeout=60.0, gzip=True), i, 1.0)  # fmt: skip
    store.add_job(1000, "alice", JobSpec(command=("echo",), cwd="/tmp", env=()), 9, 1.0)
    loaded = store.load_all()
    store.close()
    assert len({id(j.spec.options) for j in loaded[:5]}) == 1
    assert loaded[0].spec.timeout == 60.0 and loaded[0].spec.gzip
    assert loaded[5].spec.options is model.PLAIN


_words = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=8)
_stored_specs = st.builds(
    JobSpec,
    command=st.lists(_words, min_size=1, max_size=3).map(tuple),
    cwd=_words.map(lambda t: "/" + t),
    env=st.just(()),
    label=st.none() | _words,
    slots=st.integers(1, 8),
    gpus=st.integers(0, 4),
    gpu_indices=st.none() | st.just((0, 2)),
    depends=st.lists(st.integers(1, 99), max_size=2).map(tuple),
    timeout=st.none() | st.floats(0.0, 1e6),
    env_info=st.none() | _words,
    forget=st.booleans(),
    begin=st.none() | st.floats(0.0, 2e9),
    priority=st.integers(-5, 5),
    retry=st.integers(0, 3),
    array_job=st.none() | st.integers(0, 9),
    array_task=st.none() | st.integers(0, 9),
    array_throttle=st.none() | st.integers(0, 3),
    gpu_mem=st.none() | st.integers(0, 4096),
)
_exits = st.builds(
    ExitInfo,
    code=st.none() | st.integers(0, 255),
    signal=st.none() | st.integers(0, 64),
    timed_out=st.booleans(),
    lost=st.booleans(),
    cpu_seconds=st.none() | st.floats(0.0, 1e6),
    max_rss=st.none() | st.integers(0, 1 << 40),
    note=_words,
)


@settings(max_examples=300)
@given(_stored_specs, _exits)
def test_a_stored_row_leaves_out_what_reads_back_by_default_and_reads_back_whole(
    spec: JobSpec, ex: ExitInfo
) -> None:
    row = codec.spec_to_row(spec)
    assert row.startswith('{"command": ')  # the loader's fast path (tsd.jobrows)
    assert codec.spec_from_dict(json.loads(row)) == spec
    assert jobrows.RowDecoder().spec(row) == spec
    assert codec.exit_from_dict(json.loads(codec.exit_to_row(ex))) == ex


def test_a_plain_job_and_a_plain_exit_are_stored_short() -> None:
    spec = JobSpec(command=("true",), cwd="/tmp", env=(("A", "b"),))
    assert list(json.loads(codec.spec_to_row(spec))) == [
        "command", "cwd", "umask", "slots", "gpus", "depends", "depend_mode", "store_output",
        "gzip", "stderr_apart", "mail",
    ]  # fmt: skip
    assert json.loads(codec.exit_to_row(ExitInfo(code=0, cpu_seconds=0.5))) == {
        "code": 0, "cpu_seconds": 0.5}  # fmt: skip
    assert json.loads(codec.exit_to_row(ExitInfo(code=None, note=""))) == {"code": None}
    loud = ExitInfo(code=0, signal=0, timed_out=True, note="n")  # 0 is not None
    assert json.loads(codec.exit_to_row(loud))["signal"] == 0


_usual_exits = st.builds(
    ExitInfo, code=st.integers(-(1 << 70), 1 << 70),
    cpu_seconds=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    max_rss=st.none() | st.integers(0, 1 << 70),
)  # fmt: skip


@settings(max_examples=300)
@given(_usual_exits | _exits)
def test_an_exit_row_is_the_text_json_makes_of_its_lean_dict(ex: ExitInfo) -> None:
    # The usual end skips the dict and json.dumps (codec.exit_to_row): the same text.
    assert codec.exit_to_row(ex) == json.dumps(
        codec._lean(codec.exit_to_dict(ex), codec._EXIT_ABSENT))  # fmt: skip

"""--array on Slurm, the pure parts: task lists both ways, squeue's array records (one
captured from a real Slurm 22.05: alice's `sbatch --array=0-3%1` with task 0 running,
task 3 held and tasks 1-2 pending together), sacct's and the jobcomp file's array
tasks, and the batch script that gives each task its own tsd ids."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsd.config import ClusterConfig
from tsd.model import JobSpec
from tsd.slurmcmd import _checked
from tsd.slurmjson import (
    SlurmParseError,
    by_ref,
    compress_tasks,
    config_value,
    expand_tasks,
    parse_jobcomp,
    parse_sacct,
    parse_squeue,
)
from tsd.slurmmap import ArrayPart, Submission, dependency, id_runs, sbatch_args, task_ids, wrap
from tsd.store import Store

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurm"


def test_squeue_array_records_give_each_task_even_those_pending_together() -> None:
    snap = parse_squeue((FIXTURES / "squeue_array.json").read_text())
    summary = {k: (j.state, j.reason) for k, j in snap.tasks.items()}
    assert summary == {
        (1, 0): ("RUNNING", "None"),
        (1, 1): ("PENDING", "JobArrayTaskLimit"),
        (1, 2): ("PENDING", "JobArrayTaskLimit"),
        (1, 3): ("PENDING", "JobHeldUser"),
    }
    assert snap.find(1, 2) is not None and snap.find(1, 2).array_task_id == 2  # type: ignore[union-attr]
    assert snap.find(1, 4) is None
    # Job id 1 is the array's own record (its pending tasks); 2 and 3 split off.
    assert sorted(snap.jobs) == [1, 2, 3]
    assert snap.jobs[2].ref == (1, 0) and snap.jobs[1].ref == (1, None)


def test_a_job_that_is_no_array_has_no_tasks() -> None:
    snap = parse_squeue((FIXTURES / "squeue_mixed.json").read_text())
    assert snap.tasks == {}
    assert all(j.array_job_id is None and j.ref == (j.job_id, None) for j in snap.jobs.values())


@given(st.sets(st.integers(0, 5000), min_size=1, max_size=60))
def test_task_lists_round_trip_and_stay_short_for_ranges(indices: set[int]) -> None:
    text = compress_tasks(indices)
    assert expand_tasks(text) == tuple(sorted(indices))
    assert expand_tasks(text + "%3") == tuple(sorted(indices))  # squeue's throttled form


@given(st.integers(0, 1000), st.integers(0, 1000), st.integers(1, 50))
def test_a_range_with_a_step_is_one_part(first: int, length: int, step: int) -> None:
    indices = range(first, first + length * step + 1, step)
    text = compress_tasks(indices)
    assert "," not in text or len(indices) < 3
    assert expand_tasks(text) == tuple(indices)


@pytest.mark.parametrize("text", ["", "a", "1-", "3-1", "1:2", "1-4:0", "1,,2", "-1", "1-2-3",
                                  "\u0663"])
def test_what_is_no_task_list_is_a_parse_error(text: str) -> None:
    with pytest.raises(SlurmParseError):
        expand_tasks(text)


def test_sacct_array_tasks_are_known_by_array_and_index() -> None:
    fields = "|COMPLETED|0:0|2026-12-02T12:15:04|2026-12-02T12:15:05|alice(1001)|None|"
    text = f"11{fields}10_1\n10{fields}10_2\n12{fields}12\n13{fields}10_[3-4]\n"
    records = by_ref(parse_sacct(text).values())
    assert sorted(records, key=str) == sorted([(10, 1), (10, 2), (12, None), (13, None)], key=str)
    assert records[(10, 1)].job_id == 11


def test_the_jobcomp_file_names_each_array_task() -> None:
    records = {j.job_id: j for j in parse_jobcomp((FIXTURES / "jobcomp_array.txt").read_text())}
    assert {i: (j.ref, j.state, j.exit_status) for i, j in records.items()} == {
        2: ((1, 0), "COMPLETED", 0),
        1: ((1, 1), "FAILED", 1 << 8),
        4: ((4, None), "COMPLETED", 0),
        3: ((1, 3), "FAILED", 3 << 8),
    }
    assert records[1].user == "alice" and records[1].end_time - records[1].start_time == 2  # type: ignore[operator]


@given(st.text())
def test_the_jobcomp_parser_never_raises(text: str) -> None:
    for job in parse_jobcomp(text):
        assert job.job_id >= 0


def test_config_value_reads_scontrol_show_config() -> None:
    text = "JobCompHost             = localhost\nJobCompLoc              = /var/log/slurm/jc.log\n"
    assert config_value(text, "JobCompLoc") == "/var/log/slurm/jc.log"
    assert config_value(text, "JobComp") is None


def test_an_array_is_one_sbatch_with_its_tasks_throttle_and_output_pattern() -> None:
    spec = JobSpec(command=("true",), cwd="/tmp", env=())
    part = ArrayPart(((0, 7), (1, 8), (2, 9), (10, 10)), 2, ".x%y")
    args = sbatch_args(Submission(7, spec, "/o%d/ts-out.7_", array=part), ClusterConfig())
    assert "--array=0-2,10%2" in args
    assert "--output=/o%%d/ts-out.7_%a.x%%y" in args
    assert part.output_of("/o%d/ts-out.7_", 10) == "/o%d/ts-out.7_10.x%y"
    assert dependency(spec.depend_mode, ("5_1", 6)) == "afterany:5_1:6"
    assert "--array" not in " ".join(sbatch_args(Submission(7, spec, "/o"), ClusterConfig()))


@given(st.lists(st.integers(0, 2000), min_size=1, max_size=40, unique=True),
       st.integers(1, 10**6))
def test_id_runs_give_every_index_its_tsd_id(indices: list[int], first_id: int) -> None:
    elements = [(index, first_id + n) for n, index in enumerate(indices)]
    found = {}
    for lo, hi, step, id0, id_step in id_runs(elements):
        for i in range(lo, hi + 1, step):
            assert i not in found
            found[i] = id0 + (i - lo) // step * id_step
    assert found == dict(elements)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=12, unique=True),
       st.integers(1, 10**6))
def test_each_task_of_the_batch_script_gets_its_own_ts_ids(indices: list[int], first: int
                                                           ) -> None:
    elements = tuple((index, first + n) for n, index in enumerate(indices))
    script = task_ids(elements) + '; echo "$TS_ARRAY_TASK_ID $TS_JOBID"'
    for index, job_id in elements:
        out = subprocess.run(["sh", "-c", script], env={"SLURM_ARRAY_TASK_ID": str(index)},
                             capture_output=True, text=True, check=True).stdout
        assert out.split() == [str(index), str(job_id)]


def test_the_wrapped_array_command_still_execs_the_words_given() -> None:
    spec = JobSpec(command=("printf", "[%s]", "a b", "$HOME", "%d"), cwd="/tmp", env=())
    body = wrap(spec, ArrayPart(((4, 20), (5, 21))))
    out = subprocess.run(["sh", "-c", body], env={"SLURM_ARRAY_TASK_ID": "5"},
                         capture_output=True, text=True, check=True).stdout
    assert out == "[a b][$HOME][%d]"
    script = wrap(JobSpec(command=("sh", "-c", 'echo "$TS_JOBID $TS_ARRAY_TASK_ID $i $t"'),
                          cwd="/", env=()), ArrayPart(((4, 20), (5, 21))))  # fmt: skip
    env = {"SLURM_ARRAY_TASK_ID": "5", "PATH": "/bin", "i": "mine", "t": "too"}
    out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert out == "21 5 mine too\n"  # the user's own variables reach the command untouched


@pytest.mark.parametrize("ref", ["12", "12_3"])
def test_a_slurm_job_name_is_digits_and_one_task(ref: str) -> None:
    assert _checked(ref) == ref


@pytest.mark.parametrize("ref", ["", "-1", "--me", "1_", "_1", "1_2_3", "1 2", "\u0661"])
def test_anything_else_never_reaches_a_slurm_command(ref: str) -> None:
    with pytest.raises(ValueError):
        _checked(ref)


def test_a_database_from_before_arrays_gets_the_task_column_and_keeps_its_slurm_ids(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    store = Store(path)
    (job,) = store.add_jobs(1000, "alice", [(JobSpec(command=("true",), cwd="/", env=()), 1)],
                            1.0)  # fmt: skip
    store.db.executescript(
        "DROP TABLE slurm_jobs;"
        "CREATE TABLE slurm_jobs (job_id INTEGER PRIMARY KEY, slurm_id INTEGER NOT NULL);"
        f"INSERT INTO slurm_jobs VALUES ({job.id}, 77);"
    )  # the table as an older tsd made it
    store.close()
    again = Store(path)
    (loaded,) = again.load_all()
    assert (loaded.slurm_id, loaded.slurm_task) == (77, None)
    again.set_slurm_ids([(job.id, 80, 3, "/o_3")])
    (loaded,) = Store(path).load_all()
    assert (loaded.slurm_id, loaded.slurm_task, loaded.output_path) == (80, 3, "/o_3")

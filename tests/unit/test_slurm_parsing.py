"""Reading Slurm's answers: squeue --json and sacct -P text captured from a real Slurm 22.05.

The fixtures in tests/fixtures/slurm come from the one-node cluster the system
tests run (tests/system/slurmbox.py): alice's jobs 1-7 are, in order, an echo
with --gres=gpu:1, `exit 3`, a `sleep 100` later scancelled, a job afterok on
it, a job afterok on the failing one, `kill -9 $$`, and one asking for gpu:3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsd.slurmjson import (
    SlurmParseError,
    job_from_json,
    one_line_error,
    parse_sacct,
    parse_squeue,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurm"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_squeue_of_a_busy_cluster_gives_each_jobs_state_reason_and_wait_status() -> None:
    snap = parse_squeue(fixture("squeue_mixed.json"))
    assert snap.error is None
    summary = {i: (j.state, j.reason, j.exit_status) for i, j in snap.jobs.items()}
    assert summary == {
        1: ("COMPLETED", "None", 0),
        2: ("FAILED", "NonZeroExitCode", 3 << 8),
        3: ("RUNNING", "None", 0),
        4: ("PENDING", "Dependency", 0),
        5: ("CANCELLED", "DependencyNeverSatisfied", 0),
        6: ("FAILED", "JobLaunchFailure", 9),
        7: ("FAILED", "BadConstraints", 1),
    }
    assert {j.user for j in snap.jobs.values()} == {"alice"}


def test_a_pending_job_has_no_start_or_end_and_a_running_one_no_end() -> None:
    jobs = parse_squeue(fixture("squeue_mixed.json")).jobs
    assert jobs[4].start_time is None and jobs[4].end_time is None
    assert jobs[3].start_time is not None and jobs[3].end_time is None
    assert jobs[1].start_time is not None and jobs[1].end_time is not None
    assert jobs[1].output == "/tmp/o.%j"


def test_scancel_shows_as_cancelled_with_sigterm() -> None:
    jobs = parse_squeue(fixture("squeue_ended.json")).jobs
    assert (jobs[3].state, jobs[3].exit_status) == ("CANCELLED", 15)
    assert jobs[4].reason == "DependencyNeverSatisfied"


def test_gpu_indices_come_from_gres_detail() -> None:
    # Job 1 asked for --gres=gpu:2, job 3 for none; both were running.
    jobs = parse_squeue(fixture("squeue_gpu_running.json")).jobs
    assert (jobs[1].state, jobs[1].gpus) == ("RUNNING", (0, 1))
    assert (jobs[3].state, jobs[3].gpus) == ("RUNNING", ())


def test_controller_down_is_an_error_even_though_squeue_exits_zero() -> None:
    snap = parse_squeue(fixture("squeue_down.json"))
    assert snap.jobs == {}
    assert snap.error == "squeue: Failed while looking for jobs: Unspecified error"


@pytest.mark.parametrize("text", ["", "not json", "[]", '{"jobs": 3}', '{"jobs": [{"x": 1}]}'])
def test_what_is_not_squeue_json_is_a_parse_error(text: str) -> None:
    with pytest.raises(SlurmParseError):
        parse_squeue(text)


def test_newer_slurm_numbers_wrapped_in_set_number_objects_are_read() -> None:
    job = job_from_json({
        "job_id": {"set": True, "number": 42}, "job_state": ["RUNNING"],
        "start_time": {"set": True, "number": 1700000000}, "exit_code": {"set": False},
        "end_time": {"set": True, "infinite": True, "number": 0},
    })
    assert (job.job_id, job.state, job.start_time, job.exit_status, job.end_time) == (
        42, "RUNNING", 1700000000.0, None, None
    )


def test_sacct_from_the_jobcomp_file_gives_exit_codes_as_wait_statuses() -> None:
    records = parse_sacct(fixture("sacct_jobcomp.txt"))
    assert sorted(records) == [1, 2]
    assert (records[2].state, records[2].exit_status, records[2].user) == ("FAILED", 4 << 8,
                                                                           "alice")
    assert records[1].exit_status == 0
    assert records[1].start_time is not None and records[1].end_time is not None
    assert records[1].end_time - records[1].start_time == 5


def test_sacct_skips_steps_and_reads_cancelled_by_as_cancelled() -> None:
    text = "7|CANCELLED by 1001|0:15|2026-12-02T12:15:04|2026-12-02T12:15:05|bob(1002)|None\n" \
           "7.batch|CANCELLED|0:15|2026-12-02T12:15:04|2026-12-02T12:15:05||\n"
    records = parse_sacct(text)
    assert list(records) == [7]
    assert (records[7].state, records[7].exit_status, records[7].user) == ("CANCELLED", 15, "bob")


@given(st.integers(0, 255), st.integers(0, 127))
def test_sacct_exit_code_round_trips_as_a_wait_status(code: int, sig: int) -> None:
    line = f"5|FAILED|{code}:{sig}|Unknown|Unknown|u|\n"
    status = parse_sacct(line)[5].exit_status
    assert status == (sig if sig else code << 8)


@given(st.text())
def test_sacct_never_raises_on_any_text(text: str) -> None:
    for job_id, job in parse_sacct(text).items():
        assert job.job_id == job_id


def test_sbatch_errors_become_one_line_with_the_munge_cause_kept() -> None:
    stderr = (
        "sbatch: error: If munged is up, restart with --num-threads=10\n"
        'sbatch: error: Munge encode failed: Failed to access "/run/munge/munge.socket.2": '
        "No such file or directory (Did you start munged?)\n"
        "sbatch: error: slurm_send_node_msg: auth_g_create: REQUEST_SUBMIT_BATCH_JOB has "
        "authentication error\n"
        "sbatch: error: Batch job submission failed: Protocol authentication error\n"
    )
    line = one_line_error(stderr, "x")
    assert "\n" not in line
    assert line.startswith("Batch job submission failed: Protocol authentication error (")
    assert "Munge encode failed" in line
    assert one_line_error(
        "sbatch: error: invalid partition specified: nosuch\n"
        "sbatch: error: Batch job submission failed: Invalid partition name specified\n", "x"
    ) == "Batch job submission failed: Invalid partition name specified"
    assert one_line_error("", "sbatch exited 1") == "sbatch exited 1"


def test_fixtures_are_what_squeue_printed() -> None:
    # Guard against hand edits: the captured files keep Slurm's own meta block.
    meta = json.loads(fixture("squeue_mixed.json"))["meta"]
    assert meta["Slurm"]["release"] == "22.05.8"

"""The Slurm engine's pure decisions: ts options -> sbatch arguments, Slurm states -> records."""

from __future__ import annotations

import shlex
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsd.config import ClusterConfig
from tsd.model import DependMode, Job, JobSpec, JobState
from tsd.slurmjson import SlurmJob, parse_squeue
from tsd.slurmmap import (
    CancelSkipped,
    Ended,
    Started,
    Submission,
    Unsupported,
    Waiting,
    check_spec,
    dependency,
    escape_path,
    exit_info,
    job_env,
    sbatch_args,
    slurm_time,
    verdict,
    wrap,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurm"


def spec(*command: str, **kw: object) -> JobSpec:
    return JobSpec(command=command or ("true",), cwd="/home/alice/exp", env=(), **kw)  # type: ignore[arg-type]


PLAIN = ClusterConfig()


def args_of(s: JobSpec, cluster: ClusterConfig = PLAIN, deps: tuple[int, ...] = ()
            ) -> dict[str, str]:
    out: dict[str, str] = {}
    for a in sbatch_args(Submission(9, s, "/home/alice/exp/ts-out.9.abc", deps), cluster):
        key, _, value = a.partition("=")
        out[key] = value
    return out


def test_ts_options_map_to_sbatch_options() -> None:
    s = spec("python", "train.py", label="run1", slots=4, gpus=2, timeout=90.0,
             stderr_apart=True)
    a = args_of(s, ClusterConfig(engine="slurm", partition="gpu", account="lab", qos="high",
                                 extra_args=("--mem=4G",)))
    assert a["--gres"] == "gpu:2"
    assert a["--cpus-per-task"] == "4"
    assert a["--time"] == "1:30"
    assert a["--job-name"] == "run1"
    assert a["--output"] == "/home/alice/exp/ts-out.9.abc"
    assert a["--error"] == "/home/alice/exp/ts-out.9.abc.e"
    assert a["--chdir"] == "/home/alice/exp"
    assert (a["--partition"], a["--account"], a["--qos"], a["--mem"]) == ("gpu", "lab", "high",
                                                                          "4G")
    assert a["--comment"] == "tsd:9" and "--parsable" in a
    assert "--dependency" not in a


def test_a_plain_job_asks_for_nothing_tsd_was_not_asked_for() -> None:
    a = args_of(spec())
    for key in ("--gres", "--cpus-per-task", "--time", "--error", "--partition", "--dependency"):
        assert key not in a
    assert a["--job-name"] == "tsd-9"


def test_a_held_job_is_submitted_held() -> None:
    sub = Submission(9, spec(), "/home/alice/exp/ts-out.9.abc", held=True)
    assert "--hold" in sbatch_args(sub, ClusterConfig())
    assert "--hold" not in args_of(spec())


def test_begin_goes_to_sbatch_as_local_iso_time() -> None:
    at = time.mktime((2026, 12, 3, 8, 0, 30, 0, 0, -1))
    assert args_of(spec(begin=at))["--begin"] == "2026-12-03T08:00:30"
    assert "--begin" not in args_of(spec())


def test_gpu_type_goes_into_gres() -> None:
    assert args_of(spec(gpus=1), ClusterConfig(gpu_type="a100"))["--gres"] == "gpu:a100:1"


def test_dependencies_use_afterany_for_d_and_afterok_for_w() -> None:
    assert args_of(spec(depend_mode=DependMode.AFTER), deps=(5, 6))["--dependency"] == \
        "afterany:5:6"
    assert args_of(spec(depend_mode=DependMode.SUCCESS), deps=(5,))["--dependency"] == "afterok:5"
    assert dependency(DependMode.SUCCESS, ()) is None


@given(st.lists(st.text(min_size=1).filter(lambda w: "\0" not in w), min_size=1, max_size=5),
       st.integers(0, 0o777))
def test_the_wrapped_command_execs_exactly_the_words_given(words: list[str], umask: int) -> None:
    body = wrap(spec(*words, umask=umask))
    head, _, command = body.partition("; exec ")
    assert head == f"umask {umask:04o}"
    assert shlex.split(command) == words


@given(st.floats(0.001, 10 * 86400))
def test_time_limit_is_never_shorter_than_asked(seconds: float) -> None:
    minutes, secs = slurm_time(seconds).split(":")
    assert int(minutes) * 60 + int(secs) >= seconds
    assert int(minutes) * 60 + int(secs) < seconds + 1
    assert 0 <= int(secs) < 60


@given(st.text())
def test_percent_in_an_output_path_is_not_a_slurm_pattern(path: str) -> None:
    escaped = escape_path(path)
    assert escaped.replace("%%", "") .count("%") == 0


@pytest.mark.parametrize(
    ("kw", "terminal", "word"),
    [({}, True, "-n"), ({"store_output": False}, False, "-n"), ({"gzip": True}, False, "-z"),
     ({"gpu_indices": (0,)}, False, "-g")],
)
def test_options_without_meaning_on_a_cluster_are_refused_in_one_line(
    kw: dict[str, object], terminal: bool, word: str
) -> None:
    with pytest.raises(Unsupported) as info:
        check_spec(spec(**kw), terminal)  # type: ignore[arg-type]
    assert str(info.value).startswith(word) and "\n" not in str(info.value)


def test_environment_is_the_owners_without_slurm_variables_plus_tsds() -> None:
    captured = (("HOME", "/home/alice"), ("SLURM_JOB_ID", "3"), ("CUDA_VISIBLE_DEVICES", "7"))
    env = job_env(captured, {"env:FOO": "bar", "logdir": "/x"}, 12, gpus=1)
    assert env == {"HOME": "/home/alice", "FOO": "bar", "TS_JOBID": "12",
                   "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert job_env(captured, {}, 12, gpus=0)["CUDA_VISIBLE_DEVICES"] == ""


# ------------------------------------------------------------ Slurm -> tsd


def job(state: JobState = JobState.QUEUED, **kw: object) -> Job:
    s = spec(**kw)  # type: ignore[arg-type]
    return Job(id=1, uid=1000, user="alice", spec=s, state=state, order=1, enqueue_time=100.0,
               slurm_id=7)


def sj(state: str, reason: str = "None", status: int | None = 0, **kw: object) -> SlurmJob:
    return SlurmJob(job_id=7, state=state, reason=reason, exit_status=status,
                    start_time=kw.get("start", 110.0) if state != "PENDING" else None,  # type: ignore[arg-type]
                    end_time=kw.get("end", 120.0))  # type: ignore[arg-type]


def test_real_records_map_to_tsd_outcomes() -> None:
    jobs = parse_squeue((FIXTURES / "squeue_mixed.json").read_text()).jobs
    queued = job()
    ran = verdict(queued, jobs[1])
    assert isinstance(ran, Ended) and ran.state is JobState.FINISHED and ran.exit.code == 0
    three = verdict(queued, jobs[2])
    assert isinstance(three, Ended) and three.exit.code == 3 and three.exit.wait_code == 3
    assert verdict(queued, jobs[3]) == Started(jobs[3].start_time or 0.0, ())
    assert verdict(queued, jobs[4]) == Waiting("Slurm: pending (Dependency)")
    skipped = verdict(job(depend_mode=DependMode.SUCCESS), jobs[5])
    assert isinstance(skipped, Ended) and skipped.state is JobState.SKIPPED
    assert skipped.exit.wait_code == 255
    killed = verdict(queued, jobs[6])
    assert isinstance(killed, Ended) and killed.exit.signal == 9 and killed.exit.wait_code == 255


def test_nothing_changed_is_no_verdict() -> None:
    running = job(JobState.RUNNING)
    assert verdict(running, sj("RUNNING")) is None
    waiting = replace(job(), wait_reason="Slurm: pending (Resources)")
    assert verdict(waiting, sj("PENDING", "Resources")) is None


def test_w_job_slurm_keeps_pending_for_ever_is_cancelled_and_skipped() -> None:
    v = verdict(job(depend_mode=DependMode.SUCCESS), sj("PENDING", "DependencyNeverSatisfied"))
    assert v == CancelSkipped("a dependency did not succeed")


@pytest.mark.parametrize(
    ("state", "status", "code", "sig", "timed_out", "lost"),
    [("COMPLETED", 0, 0, None, False, False),
     ("FAILED", 2 << 8, 2, None, False, False),
     ("CANCELLED", 15, None, 15, False, False),
     ("CANCELLED", 0, None, signal.SIGTERM, False, False),
     ("TIMEOUT", 0, None, signal.SIGTERM, True, False),
     ("OUT_OF_MEMORY", 0, None, signal.SIGKILL, False, False),
     ("NODE_FAIL", None, None, None, False, True)],
)
def test_end_states_follow_ts_conventions(
    state: str, status: int | None, code: int | None, sig: int | None, timed_out: bool,
    lost: bool,
) -> None:
    ex = exit_info(sj(state, status=status))
    assert (ex.code, ex.signal, ex.timed_out, ex.lost) == (code, sig, timed_out, lost)
    assert ex.wait_code == (code if code is not None and not timed_out else 255)


@given(st.sampled_from(["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                        "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"]),
       st.integers(0, 0xFFFF))
def test_any_end_gives_a_wait_code_in_range_and_success_only_for_exit_0(
    state: str, status: int
) -> None:
    ex = exit_info(sj(state, status=status))
    assert 0 <= ex.wait_code <= 255
    if ex.success:
        assert state in ("COMPLETED", "FAILED") and ex.code == 0

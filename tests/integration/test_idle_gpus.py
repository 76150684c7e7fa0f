"""Idle GPUs (config gpu.idle_*) end to end: a real personal daemon, the NVML stand-in
reporting each GPU's utilisation, the real `ts`. Durations are seconds, not minutes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.nvml.picture import GIB, FakeGpu, PictureFile, uuid_for
from integration.harness import (
    Env,
    Runner,
    queue,
    start_daemon_with_config,
    wait_state,
    wait_until,
)

AFTER = 2.0  # gpu.idle_after
GRACE = 2.0  # gpu.idle_grace


def config(env: Env, action: str) -> str:
    notify = f'echo "$TS_JOB_ID $TS_GPU_IDS $TS_IDLE_ACTION $USER" >> {env.tmp}/notified'
    return (
        "slots: 4\n"
        "gpu:\n"
        f"  idle_after: {AFTER:g}s\n"
        "  idle_threshold: 5\n"
        f"  idle_action: {action}\n"
        f"  idle_grace: {GRACE:g}s\n"
        f"  idle_notify: '{notify}'\n"
    )


@pytest.fixture
def two_gpus(tsd_env: Env, nvml_picture: PictureFile) -> Iterator[Env]:
    """GPU 0 sits at 0% (idle), GPU 1 at 90% (busy)."""
    nvml_picture.write([
        FakeGpu(0, uuid_for(0), "NVIDIA A100", 80 * GIB, 0, util=0, memory_util=0),
        FakeGpu(1, uuid_for(1), "NVIDIA A100", 80 * GIB, 0, util=90, memory_util=20),
    ])
    tsd_env.update(nvml_picture.env())
    yield tsd_env


def held(flag: Path, runs: Path | None = None) -> list[str]:
    """argv of a job that (counts its runs and) runs until `flag` exists."""
    count = f"echo run >> {runs}; " if runs else ""
    return ["sh", "-c", f"{count}while [ ! -e {flag} ]; do sleep 0.05; done"]


def record(ts: Runner, job: int) -> dict[str, Any]:
    return next(r for r in json.loads(ts("-M", "json").stdout) if r["ID"] == job)


def state_column(ts: Runner, job: int) -> str:
    """The State column of `ts -l` for this job (the line's second word)."""
    for line in ts("-l").stdout.splitlines()[1:]:
        words = line.split()
        if words and words[0] == str(job):
            return words[1]
    raise AssertionError(f"job {job} not in ts -l")


def notices(env: Env) -> list[str]:
    path = env.tmp / "notified"
    return path.read_text().splitlines() if path.exists() else []


def test_an_idle_job_is_flagged_and_its_user_notified_once_and_a_busy_one_never(
    two_gpus: Env, ts: Runner
) -> None:
    env = two_gpus
    start_daemon_with_config(env, config(env, "none"))
    gate = env.tmp / "gate"
    idle = queue(ts, "-g", "0", *held(gate))
    busy = queue(ts, "-g", "1", *held(gate))
    started = time.monotonic()
    wait_state(ts, idle, "running")
    wait_state(ts, busy, "running")
    assert state_column(ts, idle) == "running"  # not before idle_after

    wait_until(lambda: state_column(ts, idle) == "running(idle)", timeout=AFTER + 5,
               what="the idle flag")
    assert time.monotonic() - started >= AFTER
    header, *rows = ts("-l").stdout.splitlines()
    starts = {line.index(line.split()[2]) for line in rows}  # where each row's Output begins
    assert starts == {header.index("Output")}, "columns no longer line up"
    since = record(ts, idle)["GPU_Idle_Since"]
    assert isinstance(since, float) and since <= time.time() - AFTER + 0.5
    assert "Idle since: " in ts("-i", str(idle)).stdout
    wait_until(lambda: len(notices(env)) == 1, timeout=5, what="the notice")
    user = record(ts, idle)["User"]
    assert notices(env) == [f"{idle} 0 none {user}"]

    time.sleep(AFTER + GRACE + 1)  # long past the grace: action none leaves it running
    assert state_column(ts, idle) == "running(idle)"
    assert len(notices(env)) == 1  # told once
    assert state_column(ts, busy) == "running"
    assert record(ts, busy)["GPU_Idle_Since"] is None
    assert "Idle since" not in ts("-i", str(busy)).stdout
    gate.touch()
    assert ts("-w", str(idle), check=False).returncode == 0


def test_idle_action_kill_ends_the_job_as_killed_with_the_reason(
    two_gpus: Env, ts: Runner
) -> None:
    env = two_gpus
    start_daemon_with_config(env, config(env, "kill"))
    gate = env.tmp / "gate"
    idle = queue(ts, "-g", "0", *held(gate))
    busy = queue(ts, "-g", "1", *held(gate))
    wait_state(ts, idle, "finished", timeout=AFTER + GRACE + 15)
    assert ts("-w", str(idle), check=False).returncode == 255  # killed
    info = ts("-i", str(idle)).stdout
    assert "Exit status: killed by signal" in info
    assert "Note: idle GPU: killed" in info
    assert record(ts, idle)["E-Level"] == -1
    assert notices(env) == [f"{idle} 0 kill {record(ts, idle)['User']}"]
    assert ts("-s", str(busy)).stdout.strip() == "running"
    gate.touch()


def test_idle_action_requeue_runs_the_job_again_before_its_owners_other_queued_jobs(
    two_gpus: Env, ts: Runner
) -> None:
    env = two_gpus
    start_daemon_with_config(env, config(env, "requeue"))
    gate, runs = env.tmp / "gate", env.tmp / "runs"
    idle = queue(ts, "-g", "0", *held(gate, runs))
    wait_state(ts, idle, "running")
    later = queue(ts, "-g", "0", "true")  # waits for GPU 0, queued before the requeue
    wait_until(lambda: runs.exists() and len(runs.read_text().splitlines()) >= 2,
               timeout=AFTER + GRACE + 15, what="the requeued job's second run")
    assert ts("-s", str(later)).stdout.strip() in ("queued", "allocating")
    assert "Note: idle GPU: requeued" in ts("-i", str(idle)).stdout
    wait_until(lambda: len(notices(env)) >= 2, timeout=AFTER + 5, what="a notice per run")
    gate.touch()
    assert ts("-w", str(idle), check=False).returncode == 0
    assert ts("-w", str(later), check=False).returncode == 0

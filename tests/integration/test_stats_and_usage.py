"""ts --stats and fair-share usage against a real personal daemon and its real SQLite state."""

from __future__ import annotations

import json
import math
import os
import pwd
import signal
import sqlite3
import time

from fixtures.nvml.picture import PictureFile, simple_gpus
from integration.harness import Env, Runner, queue, state, stop_daemon, wait_state, wait_until

KEYS = ["User", "Jobs", "Failed", "Slot_Hours", "GPU_Hours", "Mean_Wait_s"]


def me() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def usage_rows(env: Env) -> dict[int, tuple[float, float]]:
    with sqlite3.connect(env.state / "tsd" / "state.db") as db:
        return {u: (v, a) for u, v, a in db.execute("SELECT uid, value, at FROM usage")}


def stats_json(ts: Runner, *args: str) -> list[dict[str, object]]:
    out = json.loads(ts("--stats", "-M", "json", *args).stdout)
    assert isinstance(out, list)
    return out


def test_stats_count_jobs_failures_slot_hours_and_survive_ts_C(ts: Runner) -> None:
    ts("-S", "2")
    ok, bad = queue(ts, "-N", "2", "sleep", "1"), queue(ts, "false")
    assert ts("-w", str(ok), check=False).returncode == 0
    assert ts("-w", str(bad), check=False).returncode == 1
    rows = stats_json(ts)
    assert [list(r) for r in rows] == [KEYS]
    row = rows[0]
    assert (row["User"], row["Jobs"], row["Failed"]) == (me(), 2, 1)
    # Two slots for about a second: 2/3600 slot-hours, give or take the start-up.
    assert isinstance(row["Slot_Hours"], float) and 0.0005 <= row["Slot_Hours"] <= 0.002
    assert row["GPU_Hours"] == 0.0
    assert isinstance(row["Mean_Wait_s"], float) and 0 <= row["Mean_Wait_s"] < 5
    ts("-C")
    assert ts("-l").stdout.count("\n") == 1  # the list is empty...
    assert stats_json(ts) == rows  # ...the history is not
    text = ts("--stats").stdout.splitlines()
    assert text[0].split() == ["User", "Jobs", "Failed", "Slot-hours", "GPU-hours", "Mean", "wait"]
    assert text[1].split()[:3] == [me(), "2", "1"]


def test_stats_since_keeps_only_jobs_that_ended_in_the_period(ts: Runner) -> None:
    job = queue(ts, "true")
    ts("-w", str(job))
    assert stats_json(ts, "--since", "1h")[0]["Jobs"] == 1
    tomorrow = time.strftime("%Y-%m-%dT%H:%M", time.localtime(time.time() + 86400))
    assert stats_json(ts, "--since", tomorrow)[0]["Jobs"] == 0
    assert stats_json(ts, "--since", "2w", "-A")[0]["Jobs"] == 1


def test_bad_since_values_are_refused_in_one_line(ts: Runner) -> None:
    for bad in ("yesterday", "7x", "-3d", "2026-13-01"):
        proc = ts("--stats", "--since", bad, check=False)
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("ts: ")
        assert "--since" in proc.stderr
    proc = ts("--since", "1d", check=False)
    assert (proc.returncode, proc.stderr) == (1, "ts: --since goes with --stats\n")


def slot_seconds(ts: Runner) -> float:
    hours = stats_json(ts)[0]["Slot_Hours"]
    assert isinstance(hours, float)
    return hours * 3600


def test_usage_is_charged_at_each_end_and_survives_a_restart_and_a_kill_9(
    ts: Runner, tsd_env: Env
) -> None:
    job = queue(ts, "sleep", "1")
    ts("-w", str(job))
    first = slot_seconds(ts)
    stop_daemon(tsd_env)  # a clean stop writes the usage it owes
    value, at = usage_rows(tsd_env)[os.getuid()]
    # One slot for about a second; a week's half-life: seconds decay nothing to speak of.
    assert 0.9 <= value <= 3.0 and math.isclose(value, first, rel_tol=0.01)
    job = queue(ts, "sleep", "1")  # a new daemon: it must add to the stored usage
    ts("-w", str(job))
    both = slot_seconds(ts)
    pid = tsd_env.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the end is stored; the usage it adds may still be owed
    wait_until(lambda: tsd_env.daemon_pid() is None)
    assert ts("-l").returncode == 0  # a new daemon replays what was owed...
    stop_daemon(tsd_env)
    after, at_after = usage_rows(tsd_env)[os.getuid()]
    assert at_after > at
    assert after >= value + 0.9
    assert math.isclose(after, both, rel_tol=0.01)  # ...once: each run counts once
    assert stats_json(ts)[0]["Jobs"] == 2


def test_a_gpu_job_short_of_gpus_keeps_its_slot_from_cpu_jobs_with_or_without_timeout(
    ts: Runner, tsd_env: Env, nvml_picture: PictureFile
) -> None:
    nvml_picture.write(simple_gpus(4))
    tsd_env.update(nvml_picture.env())
    ts("-S", "2")
    gate = tsd_env.tmp / "gate"
    hold = ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done"]
    three = queue(ts, "-G", "3", *hold)  # no --timeout: nobody knows when its GPUs free up
    wait_state(ts, three, "running")
    two = queue(ts, "-G", "2", "sleep", "1")  # one GPU free: waits, holding the free slot
    timed = queue(ts, "--timeout", "30", "true")
    wait_state(ts, two, "allocating")
    assert state(ts, timed) == "queued"
    # Its own queue: a CPU job may pass a GPU job only with a slot the GPU job will not need.
    assert f"Wait reason: behind reservation for job {two}" in ts("-i", str(timed)).stdout
    assert "Wait reason: reserved: waits for 2 GPUs (1 free)" in ts("-i", str(two)).stdout
    ts("-S", "3")  # a slot the reserved job will not need: the CPU job takes it
    wait_state(ts, timed, "finished")
    assert state(ts, two) == "allocating"
    gate.touch()
    for job in (three, two):
        assert ts("-w", str(job), check=False, timeout=60).returncode == 0
    row = stats_json(ts)[0]
    assert row["Jobs"] == 3 and row["Failed"] == 0
    # Three GPUs while the gate was shut, then two for a second.
    assert isinstance(row["GPU_Hours"], float) and row["GPU_Hours"] >= 2 / 3600

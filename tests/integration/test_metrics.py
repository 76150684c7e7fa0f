"""The Prometheus textfile of a real personal daemon (config metrics.textfile), read back with
prometheus_client's own text parser, against what `ts` says about the same daemon."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.nvml.picture import GIB, FakeGpu, PictureFile, uuid_for
from integration.harness import (
    Env,
    Runner,
    alive,
    queue,
    start_daemon_with_config,
    wait_state,
    wait_until,
)

parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client not installed")

WRITE_EVERY = 5.0  # tsd.metricswriter.INTERVAL
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def read_samples(path: Path) -> Samples:
    """Every sample of the file, parsed by Prometheus' parser (which raises on bad syntax)."""
    out: Samples = {}
    for family in parser.text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def stop(ts: Runner, pid: int) -> None:
    ts("-K")
    wait_until(lambda: not alive(pid), what="the daemon to stop")


@pytest.fixture
def metrics_env(tsd_env: Env, nvml_picture: PictureFile) -> Iterator[tuple[Env, Path]]:
    """Two GPUs with sensors through the NVML stand-in; the textfile in a dir not made yet."""
    nvml_picture.write([
        FakeGpu(0, uuid_for(0), "NVIDIA A100", 80 * GIB, 2 * GIB, util=87, memory_util=31,
                temperature=64, power_mw=231_000, power_limit_mw=400_000),
        FakeGpu(1, uuid_for(1), "NVIDIA A100", 80 * GIB, 0),  # a board without sensors
    ])
    tsd_env.update(nvml_picture.env())
    yield tsd_env, tsd_env.root / "node-exporter" / "tsd.prom"


def held(flag: Path) -> list[str]:
    """argv of a job that runs until `flag` exists."""
    return ["sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; done"]


def records(ts: Runner) -> dict[int, dict[str, Any]]:
    return {r["ID"]: r for r in json.loads(ts("-M", "json").stdout)}


def test_textfile_matches_the_daemons_state_and_counters_survive_clear_and_restart(
    metrics_env: tuple[Env, Path], ts: Runner,
) -> None:
    env, prom = metrics_env
    me = env.get("USER") or os.environ.get("USER") or ""
    pid = start_daemon_with_config(env, f"slots: 2\nmetrics:\n  textfile: {prom}\n")
    # Once at start, without any job.
    wait_until(prom.exists, timeout=WRITE_EVERY, what="the textfile at start")
    first = read_samples(prom)
    assert first[("tsd_slots", (("kind", "total"),))] == 2
    assert first[("tsd_slots", (("kind", "used"),))] == 0
    assert first[("tsd_gpus", (("kind", "total"),))] == 2
    assert first[("tsd_gpus", (("kind", "allocated"),))] == 0
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    g0 = (("gpu", "0"), ("uuid", uuid_for(0)))
    assert first[("tsd_gpu_utilization_percent", g0)] == 87
    assert first[("tsd_gpu_memory_utilization_percent", g0)] == 31
    assert first[("tsd_gpu_temperature_celsius", g0)] == 64
    assert first[("tsd_gpu_power_watts", g0)] == 231
    assert first[("tsd_gpu_memory_used_bytes", g0)] == 2 * GIB
    g1 = (("gpu", "1"), ("uuid", uuid_for(1)))
    assert first[("tsd_gpu_memory_total_bytes", g1)] == 80 * GIB
    assert ("tsd_gpu_temperature_celsius", g1) not in first  # no sensor: no sample

    gate = env.tmp / "gate"
    running = queue(ts, "-G", "1", "-N", "2", *held(gate))
    wait_state(ts, running, "running")
    waiting = [queue(ts, "true") for _ in range(2)]
    user = records(ts)[running]["User"]
    assert not me or user == me

    def shows_the_queue() -> bool:
        got = read_samples(prom)
        return (
            got.get(("tsd_jobs", (("state", "queued"), ("user", user)))) == 2
            and got.get(("tsd_jobs", (("state", "running"), ("user", user)))) == 1
        )

    wait_until(shows_the_queue, timeout=2 * WRITE_EVERY + 1, what="the queue in the textfile")
    now = read_samples(prom)
    assert now[("tsd_slots", (("kind", "used"),))] == 2
    assert now[("tsd_gpus", (("kind", "allocated"),))] == 1
    # The running job adds its time so far: slot-seconds are twice its GPU-seconds (-N 2 -G 1).
    slot_s = now[("tsd_user_slot_seconds_total", (("user", user),))]
    gpu_s = now[("tsd_user_gpu_seconds_total", (("user", user),))]
    assert slot_s == pytest.approx(2 * gpu_s, abs=0.01)

    gate.touch()
    for job in (running, *waiting):
        ts("-w", str(job))
    # What the daemon's own records say the runs used, from their start and end times.
    recs = records(ts).values()
    slot_used = sum((r["End"] - r["Start"]) * r["Slots"] for r in recs)
    gpu_used = sum((r["End"] - r["Start"]) * len(r["GPU_IDs"]) for r in recs)
    ts("-C")  # forgets the jobs, not the usage

    def counted() -> bool:
        got = read_samples(prom)
        # A file written after ts -C (no job at all), not one from while the job ran.
        return not any(name == "tsd_jobs" for name, _ in got)

    wait_until(counted, timeout=2 * WRITE_EVERY + 1, what="the ended run counted after ts -C")
    got = read_samples(prom)
    # The counters never go down between two files, so one written while the job was
    # ending may hold them a few hundredths of a second above the stored run.
    assert got[("tsd_user_gpu_seconds_total", (("user", user),))] == pytest.approx(
        gpu_used, abs=0.25)
    assert got[("tsd_user_slot_seconds_total", (("user", user),))] == pytest.approx(
        slot_used, abs=0.25)
    leftovers = [p.name for p in prom.parent.iterdir() if p.name != prom.name]
    assert leftovers == []  # temp files renamed or removed

    stop(ts, pid)
    prom.unlink()
    start_daemon_with_config(env, f"slots: 2\nmetrics:\n  textfile: {prom}\n")
    wait_until(prom.exists, timeout=WRITE_EVERY, what="the textfile after a restart")
    after = read_samples(prom)
    # From state.db alone now: exactly the runs, times their slots and GPUs.
    assert after[("tsd_user_slot_seconds_total", (("user", user),))] == pytest.approx(
        slot_used, abs=0.002)
    assert after[("tsd_user_gpu_seconds_total", (("user", user),))] == pytest.approx(
        gpu_used, abs=0.002)


def test_a_textfile_that_cannot_be_written_is_one_log_line_and_the_daemon_serves_on(
    metrics_env: tuple[Env, Path], ts: Runner,
) -> None:
    env, _ = metrics_env
    blocker = env.root / "not-a-dir"
    blocker.write_text("a file where the directory should be\n")
    start_daemon_with_config(env, f"metrics:\n  textfile: {blocker}/tsd.prom\n")
    job = queue(ts, "echo", "still serving")
    ts("-w", str(job))
    time.sleep(2 * WRITE_EVERY + 0.5)  # at least two more rounds that fail the same way
    assert ts("-c", str(job)).stdout == "still serving\n"
    log = (env.state / "tsd" / "tsd.log").read_text()
    failures = [line for line in log.splitlines() if "metrics: cannot write" in line]
    assert len(failures) == 1, log
    assert str(blocker) in failures[0]


def test_a_personal_daemon_without_metrics_in_its_config_writes_no_textfile(
    metrics_env: tuple[Env, Path], ts: Runner,
) -> None:
    env, prom = metrics_env
    start_daemon_with_config(env, "slots: 1\n")
    ts("-w", str(queue(ts, "true")))
    time.sleep(1)
    assert not prom.parent.exists()
    log = (env.state / "tsd" / "tsd.log").read_text()
    assert "metrics" not in log  # it did not try (and fail on /var/lib/prometheus) either

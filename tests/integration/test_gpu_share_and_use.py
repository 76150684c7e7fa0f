"""--gpu-mem sharing, per-job GPU memory, `ts -g` holders and GPU use outside tsd, end to end.

A real personal daemon (started with a config file, so that the GPU poll is
quick and quotas apply) loads the NVML stand-in; tests rewrite its picture to
put a job's own process, or a process outside tsd, on a GPU. Jobs hold until
the test opens their gate; states are polled, never waited for blindly.
"""

from __future__ import annotations

import getpass
import json
import os
import re
from collections.abc import Callable
from typing import Any

import pytest
from fixtures.nvml.picture import GIB, FakeGpu, FakeProc, PictureFile, simple_gpus, uuid_for
from integration.harness import (
    Env,
    Gate,
    Runner,
    info,
    one_line_error,
    queue,
    start_daemon_with_config,
    state,
    wait_reason,
    wait_state,
    wait_until,
)

POLL = 0.3  # gpus.poll_seconds of these daemons
ME = getpass.getuser()


def records(ts: Runner, *args: str) -> list[dict[str, Any]]:
    return list(json.loads(ts(*args, "-M", "json").stdout))


def by_id(ts: Runner) -> dict[int, dict[str, Any]]:
    return {r["ID"]: r for r in records(ts) if r["ID"] is not None}


@pytest.fixture
def daemon(tsd_env: Env, nvml_picture: PictureFile) -> Callable[[str], None]:
    """Start the personal daemon with this config (YAML) on the stand-in's GPUs."""

    def start(extra: str = "") -> None:
        tsd_env.update(nvml_picture.env())
        start_daemon_with_config(tsd_env, f"slots: 8\ngpus: {{poll_seconds: {POLL}}}\n{extra}")

    return start


def gpu(index: int, used: int = 0, **sensors: int) -> FakeGpu:
    if "util" in sensors:
        sensors.setdefault("memory_util", 10)  # NVML reads both in one call
    return FakeGpu(index, uuid_for(index), "NVIDIA A100-SXM4-80GB", 80 * GIB, used, **sensors)


# ----------------------------------------------------------------- sharing


def test_two_gpu_mem_jobs_share_a_gpu_and_a_whole_gpu_job_waits(
    ts: Runner, daemon: Callable[[str], None], nvml_picture: PictureFile,
    gates: Callable[[str], Gate],
) -> None:
    nvml_picture.write(simple_gpus(1))
    daemon("")
    g = gates("share")
    a = queue(ts, "--gpu-mem", "30G", *g.hold())
    b = queue(ts, "--gpu-mem", "30720", *g.hold())  # MiB when bare
    wait_state(ts, a, "running")
    wait_state(ts, b, "running")
    recs = by_id(ts)
    assert recs[a]["GPU_IDs"] == recs[b]["GPU_IDs"] == [0]
    assert recs[a]["GPU_Mem_Declared_MiB"] == 30720
    whole = queue(ts, "-G", "1", "true")
    wait_state(ts, whole, "allocating")
    assert wait_reason(ts, whole) == "waiting for 1 free GPU (0 free)"
    ts("-r", str(whole))
    third = queue(ts, "--gpu-mem", "30G", "true")  # 90 GiB declared would pass 80
    wait_state(ts, third, "allocating")
    assert wait_reason(ts, third) == "waiting for 1 GPU with 30.0 GiB free (0 have it)"
    assert "GPU memory declared: 30.0 GiB per GPU (--gpu-mem)" in info(ts, a)
    assert re.search(rf"^0 .* busy: shared by --gpu-mem jobs {a}, {b} \(60\.0 of 80\.0 GiB"
                     r" declared\)$", ts("-g").stdout, re.M)  # fmt: skip
    small = queue(ts, "--gpu-mem", "20G", "true")  # behind the one that waits
    assert state(ts, small) == "queued"
    g.open()
    assert ts("-w", str(third), check=False).returncode == 0
    assert ts("-w", str(small), check=False).returncode == 0


def test_too_little_free_memory_on_nvml_makes_a_gpu_mem_job_wait_until_it_frees(
    ts: Runner, daemon: Callable[[str], None], nvml_picture: PictureFile
) -> None:
    nvml_picture.write([gpu(0, used=70 * GIB)])  # someone's memory, no process NVML shows
    daemon("")
    job = queue(ts, "--gpu-mem", "20G", "true")
    wait_state(ts, job, "allocating")
    assert wait_reason(ts, job) == "waiting for 1 GPU with 20.0 GiB free (0 have it)"
    nvml_picture.write([gpu(0, used=10 * GIB)])
    wait_state(ts, job, "running", "finished", timeout=POLL + 10)
    assert ts("-w", str(job), check=False).returncode == 0


def test_bad_gpu_mem_values_are_refused_with_one_line_and_nothing_queued(
    ts: Runner, daemon: Callable[[str], None], nvml_picture: PictureFile
) -> None:
    nvml_picture.write(simple_gpus(2))
    daemon("")
    assert "--gpu-mem" in one_line_error(ts("--gpu-mem", "0", "true", check=False))
    assert "'5X' is not a size" in one_line_error(ts("--gpu-mem", "5X", "true", check=False))
    line = one_line_error(ts("--gpu-mem", "100G", "true", check=False))
    assert line == "ts: job needs 100.0 GiB per GPU but the largest GPU has 80.0 GiB"
    assert records(ts) == []


# ------------------------------------------------------------ a job's GPU use


def test_a_jobs_gpu_memory_is_sampled_and_its_peak_kept_across_a_restart(
    ts: Runner, tsd_env: Env, daemon: Callable[[str], None], nvml_picture: PictureFile,
    gates: Callable[[str], Gate],
) -> None:
    nvml_picture.write(simple_gpus(1))
    daemon("")
    g = gates("peak")
    job = queue(ts, "--gpu-mem", "2G", *g.hold())
    wait_state(ts, job, "running")
    pid = int(ts("-p", str(job)).stdout)
    nvml_picture.write([gpu(0, used=3 * GIB, util=87)], [FakeProc(gpu=0, pid=pid, used=3 * GIB)])
    wait_until(lambda: by_id(ts)[job]["GPU_Mem_Peak_MiB"] == 3072, POLL + 10, "a sample")
    rec = by_id(ts)[job]
    assert rec["GPU_Mem_Now_MiB"] == 3072 and rec["GPU_Util"] == 87
    shown = info(ts, job)
    assert "GPU memory now: 3.0 GiB, its GPUs 87% busy" in shown
    assert "GPU memory peak: 3.0 GiB (exceeded the 2.0 GiB declared)" in shown
    assert re.search(rf"^{job} .*<3\.0G 87%> sh -c", ts("-l").stdout, re.M)
    # Its process on the GPU is the job's: not someone else's use of GPU 0.
    assert [r["State"] for r in records(ts, "-A")] == ["running"]
    nvml_picture.write([gpu(0, used=GIB)], [FakeProc(gpu=0, pid=pid, used=GIB)])
    g.open()
    assert ts("-w", str(job), check=False).returncode == 0
    old = tsd_env.daemon_pid()
    ts("-K")
    wait_until(lambda: tsd_env.daemon_pid() != old, what="the old daemon to exit")
    daemon("")
    rec = by_id(ts)[job]
    assert rec["GPU_Mem_Peak_MiB"] == 3072 and rec["GPU_Mem_Now_MiB"] is None
    assert "GPU memory peak: 3.0 GiB (exceeded" in info(ts, job)


# ------------------------------------------------------------------- ts -g


def test_ts_g_shows_sensors_and_holders_in_text_and_json(
    ts: Runner, daemon: Callable[[str], None], nvml_picture: PictureFile, outsider: int,
    gates: Callable[[str], Gate],
) -> None:
    sensors = {"util": 55, "temperature": 61, "power_mw": 250_000, "power_limit_mw": 400_000}
    nvml_picture.write([gpu(0, **sensors), gpu(1, used=5 * GIB)],
                       [FakeProc(gpu=1, pid=outsider, used=5 * GIB)])  # fmt: skip
    daemon("")
    g = gates("view")
    job = queue(ts, "-G", "1", *g.hold())
    wait_state(ts, job, "running")
    text = ts("-g").stdout
    assert re.search(
        rf"^0 +NVIDIA A100-SXM4-80GB +0\.0/80\.0 GiB +100\.0% +55% +61C +250/400W +"
        rf"job {job} \({ME}\) +busy: held by tsd job {job}$", text, re.M), text
    assert re.search(rf"^1 .* 5\.0/80\.0 GiB .* +- +- +- +pid {outsider} \({ME}\) +busy: used by",
                     text, re.M), text  # fmt: skip
    assert ts("-g", "-M", "json").returncode == 0
    views = json.loads(ts("-g", "-M", "json").stdout)
    assert [v["Index"] for v in views] == [0, 1]
    assert views[0]["Holders"] == [{"Job": job, "PID": None, "User": ME}]
    assert views[0]["Utilization"] == 55 and views[0]["Temperature_C"] == 61
    assert views[0]["Power_W"] == 250.0 and views[0]["Memory_Total_MiB"] == 81920
    assert views[1]["Holders"] == [{"Job": None, "PID": outsider, "User": ME}]
    assert views[1]["Free"] is False and views[1]["Utilization"] is None
    g.open()


# ------------------------------------------------------ use outside the queue


def test_gpu_use_outside_tsd_shows_in_ts_a_l_and_counts_against_the_gpu_quota(
    ts: Runner, daemon: Callable[[str], None], nvml_picture: PictureFile, outsider: int
) -> None:
    nvml_picture.write([gpu(0, used=4 * GIB), gpu(1)],
                       [FakeProc(gpu=0, pid=outsider, used=4 * GIB)])  # fmt: skip
    daemon("defaults: {max_gpus: 1}\n")
    ts("-g")  # a first picture (a personal daemon reads NVML on need only)
    rows = ts("-A", "-l").stdout.splitlines()
    mine = [r for r in rows if r.startswith("-")]
    assert len(mine) == 1 and mine[0].split()[:5] == ["-", ME, "unmanaged", "pid", str(outsider)]
    assert mine[0].endswith("<4.0G> (GPU use outside tsd)")
    entry = [r for r in records(ts, "-A") if r["ID"] is None]
    assert entry == [{"ID": None, "State": "unmanaged", "User": ME, "UID": os.getuid(),
                      "PID": outsider, "GPUs": 1, "GPU_IDs": [0], "GPU_Mem_Now_MiB": 4096,
                      "Command": None}]  # fmt: skip
    assert all(r["ID"] is not None for r in records(ts))  # without -A: jobs only
    # GPU 1 is idle, but the process on GPU 0 already uses the user's one GPU.
    job = queue(ts, "-G", "1", "true")
    wait_state(ts, job, "allocating")
    assert wait_reason(ts, job).startswith("user quota: 1 of 1 GPUs in use (max_gpus); ")
    nvml_picture.write([gpu(0), gpu(1)])  # it ended
    wait_state(ts, job, "running", "finished", timeout=POLL + 10)
    assert ts("-w", str(job), check=False).returncode == 0


def test_gpu_unmanaged_hold_holds_the_users_gpu_jobs_while_it_runs(
    ts: Runner, daemon: Callable[[str], None], nvml_picture: PictureFile, outsider: int
) -> None:
    nvml_picture.write([gpu(0, used=GIB), gpu(1), gpu(2)],
                       [FakeProc(gpu=0, pid=outsider, used=GIB)])  # fmt: skip
    daemon("gpu: {unmanaged: hold}\n")
    ts("-g")
    job = queue(ts, "-G", "1", "true")
    cpu = queue(ts, "true")
    assert ts("-w", str(cpu), check=False).returncode == 0  # CPU jobs are not held
    wait_state(ts, job, "allocating")
    assert wait_reason(ts, job).startswith(
        f"held while you use GPU 0 outside tsd (pid {outsider}; gpu.unmanaged: hold); "
    )
    assert state(ts, job) == "allocating"
    nvml_picture.write([gpu(0), gpu(1), gpu(2)])
    wait_state(ts, job, "running", "finished", timeout=POLL + 10)
    assert ts("-w", str(job), check=False).returncode == 0

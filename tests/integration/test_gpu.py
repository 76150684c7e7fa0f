"""GPU allocation end to end: the real `ts`, a real personal daemon, the real pynvml.

The daemon loads the NVML stand-in (tests/fixtures/nvml) through
TSD_NVML_LIBRARY and reads its GPUs from the picture file named in
TSD_FAKE_NVML; a test rewrites the picture while the daemon runs to show
outside processes, memory pressure or a failing driver. Jobs hold their GPUs
until the test touches a flag file, so every "while A runs" is a fact, not a
race. States are polled, never waited for with a fixed sleep.
"""

from __future__ import annotations

import getpass
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
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
    state,
    wait_reason,
    wait_state,
    wait_until,
)

# The personal daemon's default gpus.poll_seconds: how late, at worst, it notices
# a change that no job end or submit announces (NVML back, an outside process gone).
POLL_SECONDS = 5.0


# ----------------------------------------------------------------- helpers




def records(ts: Runner) -> dict[int, dict[str, Any]]:
    """ts -M json, by job id."""
    return {rec["ID"]: rec for rec in json.loads(ts("-M", "json").stdout)}


def first_line(ts: Runner, job: int) -> str:
    """The first line of the job's output, once the job has written it."""
    path = Path(ts("-o", str(job)).stdout.strip())
    wait_until(lambda: path.exists() and path.read_text().endswith("\n"), what=f"{job}'s output")
    return path.read_text().splitlines()[0]


def start_daemon(ts: Runner, tsd_env: Env, picture: PictureFile, slots: int, **env: str) -> None:
    """Point the daemon (started by this first call) at the stand-in, with `slots` slots."""
    tsd_env.update(picture.env())
    tsd_env.update(env)
    ts("-S", str(slots))


@pytest.fixture
def gpu4(ts: Runner, tsd_env: Env, nvml_picture: PictureFile) -> Runner:
    """A daemon with 4 slots that sees four idle GPUs."""
    nvml_picture.write(simple_gpus(4))
    start_daemon(ts, tsd_env, nvml_picture, 4)
    return ts


def test_two_jobs_asking_for_two_gpus_get_disjoint_pairs_and_a_third_waits_allocating(
    gpu4: Runner, gates: Callable[[str], Gate]
) -> None:
    ts = gpu4
    a, b, c = gates("a"), gates("b"), gates("c")
    env = ("$CUDA_VISIBLE_DEVICES", "$CUDA_DEVICE_ORDER")
    ja = queue(ts, "-G", "2", *a.hold(*env))
    jb = queue(ts, "--gpus", "2", *b.hold(*env))
    wait_state(ts, ja, "running")
    wait_state(ts, jb, "running")
    seen = {}
    for job in (ja, jb):
        visible, order = first_line(ts, job).split()
        assert order == "PCI_BUS_ID"
        seen[job] = [int(i) for i in visible.split(",")]
        assert len(seen[job]) == 2
        rec = records(ts)[job]
        assert rec["GPUs"] == 2 and rec["GPU_IDs"] == seen[job]
    assert set(seen[ja]).isdisjoint(seen[jb])
    assert sorted(seen[ja] + seen[jb]) == [0, 1, 2, 3]

    jc = queue(ts, "-G", "2", *c.hold(*env))
    wait_state(ts, jc, "allocating")
    assert "[run=2/4]" in ts("-l").stdout.splitlines()[0]  # a free slot is not enough
    assert wait_reason(ts, jc) == "waiting for 2 free GPUs (0 free)"
    assert records(ts)[jc]["GPU_IDs"] == []

    # A job end hands its GPUs on at once, not at the next NVML poll.
    a.open()
    ts("-w", str(ja))
    ended = time.monotonic()
    wait_state(ts, jc, "running", timeout=POLL_SECONDS)
    assert time.monotonic() - ended < POLL_SECONDS / 2
    assert sorted(records(ts)[jc]["GPU_IDs"]) == sorted(seen[ja])
    assert first_line(ts, jc).split()[0] == ",".join(map(str, seen[ja]))
    b.open()
    c.open()
    for job in (jb, jc):
        assert ts("-w", str(job), check=False).returncode == 0


def test_cpu_jobs_get_an_empty_cuda_visible_devices_and_pci_bus_order(gpu4: Runner) -> None:
    job = queue(gpu4, "sh", "-c", 'echo "[$CUDA_VISIBLE_DEVICES] $CUDA_DEVICE_ORDER"')
    assert gpu4("-w", str(job), check=False).returncode == 0
    assert first_line(gpu4, job) == "[] PCI_BUS_ID"
    rec = records(gpu4)[job]
    assert rec["GPUs"] == 0 and rec["GPU_IDs"] == []


def test_pinned_gpus_are_exactly_those_and_count_against_exclusivity(
    gpu4: Runner, gates: Callable[[str], Gate]
) -> None:
    ts = gpu4
    g = gates("pinned")
    pinned = queue(ts, "-g", "1,3", *g.hold("$CUDA_VISIBLE_DEVICES"))
    wait_state(ts, pinned, "running")
    assert first_line(ts, pinned) == "1,3"
    assert records(ts)[pinned]["GPU_IDs"] == [1, 3]
    assert "GPU IDs: 1,3" in info(ts, pinned)

    # The others get what the pinned job left, never one of its GPUs.
    rest = queue(ts, "-G", "2", *g.hold("$CUDA_VISIBLE_DEVICES"))
    wait_state(ts, rest, "running")
    assert first_line(ts, rest) == "0,2"
    again = queue(ts, "--gpu_indices", "3", *g.hold("$CUDA_VISIBLE_DEVICES"))
    wait_state(ts, again, "allocating")
    assert wait_reason(ts, again) == "waiting for GPU 3 (in use)"

    listing = ts("-g").stdout.splitlines()
    assert listing[0] == "ID   GPU-IDs"
    assert listing[1:3] == [f"{pinned:<4} 1 3", f"{rest:<4} 0 2"]
    held = rf"^3 +NVIDIA A100.* busy: held by tsd job {pinned}$"
    assert re.search(held, "\n".join(listing), re.M)
    g.open()
    wait_state(ts, again, "running", "finished")
    assert first_line(ts, again) == "3"


def test_pinning_a_gpu_outside_the_pool_is_refused_at_submit(gpu4: Runner) -> None:
    line = one_line_error(gpu4("-g", "7", "true", check=False))
    assert "GPU 7" in line and "0,1,2,3" in line
    line = one_line_error(gpu4("-G", "5", "true", check=False))
    assert "5 GPUs" in line and "4" in line
    assert records(gpu4) == {}


def test_ts_visible_devices_limits_the_pool(
    ts: Runner, tsd_env: Env, nvml_picture: PictureFile, gates: Callable[[str], Gate]
) -> None:
    nvml_picture.write(simple_gpus(4))
    start_daemon(ts, tsd_env, nvml_picture, 4, TS_VISIBLE_DEVICES="0,1")
    line = one_line_error(ts("-G", "3", "true", check=False))
    assert "3 GPUs" in line and "has 2" in line
    line = one_line_error(ts("-g", "2", "true", check=False))
    assert "GPU 2 is not in the visible set (0,1)" in line
    g = gates("visible")
    two = queue(ts, "-G", "2", *g.hold("$CUDA_VISIBLE_DEVICES"))
    wait_state(ts, two, "running")
    assert first_line(ts, two) == "0,1"
    # GPUs 2 and 3 are idle, but not tsd's to give.
    one = queue(ts, "-G", "1", "true")
    wait_state(ts, one, "allocating")
    assert wait_reason(ts, one) == "waiting for 1 free GPU (0 free)"
    assert re.search(r"^2 .*busy: not visible to tsd", ts("-g").stdout, re.M)
    g.open()
    assert ts("-w", str(one), check=False).returncode == 0
    assert records(ts)[one]["GPU_IDs"] in ([0], [1])


# ----------------------------------------------------------- busy GPUs


def test_a_gpu_used_by_an_outside_process_is_skipped_and_ts_g_names_the_process(
    ts: Runner, tsd_env: Env, nvml_picture: PictureFile, outsider: int,
    gates: Callable[[str], Gate],
) -> None:
    gpus = simple_gpus(2)
    nvml_picture.write(gpus)
    start_daemon(ts, tsd_env, nvml_picture, 2)
    # Someone outside tsd starts a 40 GiB job on GPU 0 while the daemon runs.
    used = [FakeGpu(0, uuid_for(0), gpus[0].name, 80 * GIB, 40 * GIB), gpus[1]]
    nvml_picture.write(used, [FakeProc(gpu=0, pid=outsider, used=40 * GIB)])
    g = gates("outside")
    job = queue(ts, "-G", "1", *g.hold("$CUDA_VISIBLE_DEVICES"))
    wait_state(ts, job, "running")
    assert first_line(ts, job) == "1"  # not 0, the lowest index
    me = getpass.getuser()
    shown = ts("-g").stdout
    assert re.search(
        rf"^0 .* busy: used by pid {outsider} \({me}\), 40\.0 GiB$", shown, re.M
    ), shown
    assert f"pid {outsider} ({me}) 40.0 GiB" in shown
    # With both GPUs taken, a waiting job says why GPU 0 will not do.
    waiting = queue(ts, "-G", "1", "true")
    wait_state(ts, waiting, "allocating")
    assert wait_reason(ts, waiting) == (
        f"waiting for 1 free GPU (0 free); GPU 0 used by pid {outsider} ({me}), 40.0 GiB"
    )
    # A lower threshold does not make a stranger's GPU free: a process is a process.
    ts("--set_gpu_free_perc", "10")
    time.sleep(0.3)
    assert state(ts, waiting) == "allocating"
    g.open()
    assert ts("-w", str(waiting), check=False).returncode == 0
    assert records(ts)[waiting]["GPU_IDs"] == [1]


def test_free_memory_threshold_decides_and_set_gpu_free_perc_changes_the_outcome(
    ts: Runner, tsd_env: Env, nvml_picture: PictureFile, gates: Callable[[str], Gate]
) -> None:
    # GPU 0 is 30% full with no process NVML can show (another container's, say).
    gpus = simple_gpus(2)
    gpus[0] = FakeGpu(0, uuid_for(0), gpus[0].name, 80 * GIB, 24 * GIB)
    nvml_picture.write(gpus)
    start_daemon(ts, tsd_env, nvml_picture, 2)
    assert ts("--get_gpu_free_perc").stdout == "90\n"
    g = gates("threshold")
    first = queue(ts, "-G", "1", *g.hold("$CUDA_VISIBLE_DEVICES"))
    wait_state(ts, first, "running")
    assert first_line(ts, first) == "1"
    assert re.search(r"^0 .*busy: only 70% memory free \(threshold 90%\)$", ts("-g").stdout, re.M)
    second = queue(ts, "-G", "1", *g.hold("$CUDA_VISIBLE_DEVICES"))
    wait_state(ts, second, "allocating")
    # 70% free is enough under a 60% threshold: the waiting job starts on GPU 0 now.
    ts("--set_gpu_free_perc", "60")
    assert ts("--get_gpu_free_perc").stdout == "60\n"
    wait_state(ts, second, "running", timeout=POLL_SECONDS / 2)
    assert first_line(ts, second) == "0"
    g.open()


# ------------------------------------------------------------ NVML trouble


def test_failing_nvml_holds_gpu_jobs_with_a_reason_but_not_cpu_jobs_until_it_recovers(
    ts: Runner, tsd_env: Env, nvml_picture: PictureFile
) -> None:
    nvml_picture.write(simple_gpus(2), fail="init")
    start_daemon(ts, tsd_env, nvml_picture, 1)  # one slot: a stalled GPU job would block all
    gpu_job = queue(ts, "-G", "1", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES")
    wait_state(ts, gpu_job, "allocating")
    cpu_job = queue(ts, "sh", "-c", "echo cpu")
    assert ts("-w", str(cpu_job), check=False).returncode == 0
    assert state(ts, gpu_job) == "allocating"
    reason = wait_reason(ts, gpu_job)
    assert reason.startswith("GPU information unavailable: ")
    assert "NVML failed to initialise" in reason
    assert reason.count("GPU information unavailable") == 1
    assert "GPU status: NVML failed to initialise" in ts("-g").stdout
    # Across a poll or more of the same failure, the log says it once.
    time.sleep(POLL_SECONDS + 0.5)
    log_file = tsd_env.state / "tsd" / "tsd.log"
    warnings = re.findall(r"WARNING GPUs unavailable: (.*)", log_file.read_text())
    assert warnings == ["NVML failed to initialise: Driver Not Loaded"], warnings

    nvml_picture.write(simple_gpus(2))  # the driver is back; nobody tells the daemon
    wait_state(ts, gpu_job, "running", "finished", timeout=POLL_SECONDS + 5)
    assert ts("-w", str(gpu_job), check=False).returncode == 0
    assert first_line(ts, gpu_job) == "0"
    assert "INFO GPUs available again: NVML reports 2 GPUs" in log_file.read_text()


def test_a_missing_nvml_library_holds_gpu_jobs_until_it_appears(
    ts: Runner, tsd_env: Env, nvml_picture: PictureFile, fake_nvml: Path
) -> None:
    nvml_picture.write(simple_gpus(1))
    later = tsd_env.root / "driver" / "libnvidia-ml.so.1"
    tsd_env.update(nvml_picture.env())
    tsd_env["TSD_NVML_LIBRARY"] = str(later)
    ts("-S", "1")
    gpu_job = queue(ts, "-G", "1", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES")
    cpu_job = queue(ts, "sh", "-c", "echo cpu")
    assert ts("-w", str(cpu_job), check=False).returncode == 0
    assert state(ts, gpu_job) == "allocating"
    reason = wait_reason(ts, gpu_job)
    assert f"cannot load NVML library {later}" in reason, reason

    later.parent.mkdir()
    shutil.copy(fake_nvml, later)  # the driver gets installed
    wait_state(ts, gpu_job, "running", "finished", timeout=POLL_SECONDS + 5)
    assert ts("-w", str(gpu_job), check=False).returncode == 0
    assert first_line(ts, gpu_job) == "0"


def test_gpus_of_running_jobs_stay_theirs_across_a_daemon_restart(
    ts: Runner, tsd_env: Env, nvml_picture: PictureFile, gates: Callable[[str], Gate]
) -> None:
    nvml_picture.write(simple_gpus(2))
    start_daemon(ts, tsd_env, nvml_picture, 3)
    g = gates("restart")
    before = queue(ts, "-G", "1", *g.hold("$CUDA_VISIBLE_DEVICES"))
    wait_state(ts, before, "running")
    old_pid = tsd_env.daemon_pid()
    ts("-K")  # the job keeps running; the next ts call starts a new daemon
    wait_until(lambda: tsd_env.daemon_pid() != old_pid, what="the old daemon to exit")
    after = queue(ts, "-G", "1", *g.hold("$CUDA_VISIBLE_DEVICES"))
    assert tsd_env.daemon_pid() not in (None, old_pid)
    wait_state(ts, after, "running")
    assert {first_line(ts, before), first_line(ts, after)} == {"0", "1"}
    third = queue(ts, "-G", "1", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES")
    wait_state(ts, third, "allocating")
    g.open()
    assert ts("-w", str(third), check=False).returncode == 0


def _read_since_written(path: Path) -> bool:
    """Whether anyone read `path` since it was written (relatime moves atime past mtime)."""
    st = path.stat()
    return st.st_atime_ns > st.st_mtime_ns


def test_nvml_is_polled_while_a_job_waits_for_a_gpu_and_not_after(
    ts: Runner, tsd_env: Env, nvml_picture: PictureFile, gates: Callable[[str], Gate]
) -> None:
    # The stand-in reads the picture on every NVML call: its atime tells whether NVML was used.
    probe = tsd_env.root / "atime-probe"
    probe.write_text("x")
    time.sleep(0.01)
    probe.read_text()
    if not _read_since_written(probe):
        pytest.skip(f"{tsd_env.root} is mounted without atime updates")
    nvml_picture.write(simple_gpus(1))
    start_daemon(ts, tsd_env, nvml_picture, 2)
    g = gates("poll")
    holder = queue(ts, "-G", "1", *g.hold())
    wait_state(ts, holder, "running")
    waiter = queue(ts, "-G", "1", "true")
    wait_state(ts, waiter, "allocating")
    nvml_picture.write(simple_gpus(1))  # unread so far; only a poll will read it
    wait_until(lambda: _read_since_written(nvml_picture.path), POLL_SECONDS + 2, "an NVML poll")
    g.open()
    assert ts("-w", str(waiter), check=False).returncode == 0
    nvml_picture.write(simple_gpus(1))
    time.sleep(POLL_SECONDS + 1)  # nothing waits for a GPU: the daemon must not poll
    assert not _read_since_written(nvml_picture.path)

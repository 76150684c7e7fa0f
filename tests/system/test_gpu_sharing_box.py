"""GPU sharing and GPU use outside the queue on the system service, in a booted systemd.

Real users (alice, bob, dave) submit through the real socket; the service
loads the NVML stand-in through a drop-in, as in test_gpu_quota. bob's quota
is one GPU. A process bob starts by hand, outside tsd, is put on a GPU by the
picture: the service must see that it is in no job's scope and charge bob.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from box import Box
from deploy import deploy, jobs, ts, wait_for
from fixtures.nvml.picture import GIB, FakeGpu, FakeProc, simple_gpus, uuid_for

NVML_DIR = "/opt/fake-nvml"
LIBRARY = f"{NVML_DIR}/libnvidia-ml.so.1"
PICTURE = f"{NVML_DIR}/picture.txt"

CONFIG = """\
slots: 8
gpus:
  poll_seconds: 1
admins: [root]
defaults:
  max_running_slots: 8
  max_gpus: 1
users:
  alice: {max_gpus: 4}
  dave: {max_gpus: 4}
kill_grace_seconds: 3
"""

DROP_IN = f"""\
[Service]
Environment=TSD_NVML_LIBRARY={LIBRARY} TSD_FAKE_NVML={PICTURE}
"""


def set_picture(box: Box, gpus: list[FakeGpu], procs: list[FakeProc] | None = None) -> None:
    text = "".join(item.line() + "\n" for item in [*gpus, *(procs or [])])
    box.write_file(PICTURE + ".new", text)
    box.run(["mv", "-f", PICTURE + ".new", PICTURE])


@pytest.fixture(scope="module")
def sbox(box: Box) -> Iterator[Box]:
    box.run([box.python, "/src/tests/fixtures/nvml/build.py", NVML_DIR])
    set_picture(box, simple_gpus(1))
    box.write_file("/etc/systemd/system/tsd.service.d/fake-nvml.conf", DROP_IN)
    deploy(box, CONFIG)
    yield box


def gate(box: Box) -> tuple[str, list[str]]:
    path = f"/tmp/gate-{time.monotonic_ns()}"
    return path, ["sh", "-c", f"while [ ! -e {path} ]; do sleep 0.05; done"]


def submit(box: Box, user: str, *args: str) -> int:
    out = ts(box, user, *args).stdout
    assert re.fullmatch(r"[0-9]+\n", out), out
    return int(out)


def state(box: Box, job: int) -> str:
    return str(jobs(box)[job]["State"])


def wait_reason(box: Box, job: int) -> str:
    for line in ts(box, "root", "-i", str(job)).stdout.splitlines():
        if line.startswith("Wait reason: "):
            return line.removeprefix("Wait reason: ")
    raise AssertionError(f"job {job} shows no wait reason")


def test_two_users_gpu_mem_jobs_share_a_gpu_and_a_whole_gpu_job_waits(sbox: Box) -> None:
    set_picture(sbox, simple_gpus(1))
    path, hold = gate(sbox)
    a = submit(sbox, "alice", "--gpu-mem", "30G", *hold)
    b = submit(sbox, "bob", "--gpu-mem", "40G", *hold)
    for job in (a, b):
        wait_for(lambda job=job: state(sbox, job) == "running")  # type: ignore[misc]
    recs = jobs(sbox)
    assert recs[a]["GPU_IDs"] == recs[b]["GPU_IDs"] == [0]
    whole = submit(sbox, "dave", "-G", "1", "true")
    wait_for(lambda: state(sbox, whole) == "allocating")
    assert wait_reason(sbox, whole) == "waiting for 1 free GPU (0 free)"
    big = submit(sbox, "dave", "--gpu-mem", "20G", "true")  # 90 of 80 GiB: waits too
    time.sleep(1.5)
    assert state(sbox, big) in ("queued", "allocating")
    shown = ts(sbox, "dave", "-g").stdout
    held_by = rf"job {a} \(alice\), job {b} \(bob\)"
    status = rf"busy: shared by --gpu-mem jobs {a}, {b} \(70\.0 of 80\.0 GiB declared\)"
    assert re.search(rf"^0 .*{held_by} +{status}$", shown, re.M), shown
    sbox.run(["touch", path])
    assert ts(sbox, "dave", "-w", str(whole), check=False, timeout=60).returncode == 0
    assert ts(sbox, "dave", "-w", str(big), check=False, timeout=60).returncode == 0


def test_bobs_gpu_use_outside_tsd_is_his_in_ts_a_l_ts_g_and_his_quota(sbox: Box) -> None:
    gpus = simple_gpus(2)
    set_picture(sbox, gpus)
    pidfile = "/tmp/bob-outside.pid"
    sbox.run(f"runuser -u bob -- sh -c 'echo $$ > {pidfile}; exec sleep 300' >/dev/null 2>&1 &")
    wait_for(lambda: sbox.run(["test", "-s", pidfile], check=False).returncode == 0)
    pid = int(sbox.read_file(pidfile))
    try:
        gpus[0] = FakeGpu(0, uuid_for(0), gpus[0].name, 80 * GIB, 6 * GIB)
        set_picture(sbox, gpus, [FakeProc(gpu=0, pid=pid, used=6 * GIB)])
        # The service samples NVML on its own (system mode): no ts -g needed first.
        def listed() -> list[str]:
            rows = ts(sbox, "alice", "-A", "-l").stdout.splitlines()
            return [r for r in rows if r.startswith("- ")]

        rows = wait_for(listed, timeout=15)
        assert rows[0].split()[:5] == ["-", "bob", "unmanaged", "pid", str(pid)], rows
        shown = ts(sbox, "alice", "-g").stdout
        assert re.search(rf"^0 .* pid {pid} \(bob\) +busy: used by pid {pid} \(bob\)", shown,
                         re.M), shown  # fmt: skip
        job = submit(sbox, "bob", "-G", "1", "true")
        wait_for(lambda: state(sbox, job) == "allocating")
        assert wait_reason(sbox, job).startswith("user quota: 1 of 1 GPUs in use (max_gpus)")
        other = submit(sbox, "alice", "-G", "1", "true")  # GPU 1 is free for others
        assert ts(sbox, "alice", "-w", str(other), check=False, timeout=60).returncode == 0
        assert jobs(sbox)[other]["GPU_IDs"] == [1]
        sbox.run(["kill", str(pid)], check=False)
        set_picture(sbox, simple_gpus(2))
        assert ts(sbox, "bob", "-w", str(job), check=False, timeout=60).returncode == 0
    finally:
        sbox.run(["kill", str(pid)], check=False)
        set_picture(sbox, simple_gpus(2))


def test_a_jobs_own_process_in_its_scope_is_its_gpu_use_not_unmanaged(sbox: Box) -> None:
    set_picture(sbox, simple_gpus(1))
    path, hold = gate(sbox)
    job = submit(sbox, "alice", "--gpu-mem", "2G", *hold)
    wait_for(lambda: state(sbox, job) == "running")
    pid = int(ts(sbox, "alice", "-p", str(job)).stdout)
    cgroup = sbox.read_file(f"/proc/{pid}/cgroup")
    assert f"/tsd-job-{job}.scope" in cgroup, cgroup
    gpus = [FakeGpu(0, uuid_for(0), "NVIDIA A100-SXM4-80GB", 80 * GIB, 3 * GIB)]
    set_picture(sbox, gpus, [FakeProc(gpu=0, pid=pid, used=3 * GIB)])
    try:
        wait_for(lambda: jobs(sbox)[job].get("GPU_Mem_Peak_MiB") == 3072, timeout=15)
        assert jobs(sbox)[job]["GPU_Mem_Now_MiB"] == 3072
        assert not [r for r in ts(sbox, "root", "-A", "-l").stdout.splitlines()
                    if r.startswith("- ")]  # fmt: skip
        assert "GPU memory peak: 3.0 GiB (exceeded the 2.0 GiB declared)" in ts(
            sbox, "alice", "-i", str(job)).stdout
        # bob sees who holds the GPU, not alice's command.
        shown = ts(sbox, "bob", "-g").stdout
        assert re.search(rf"^0 .*job {job} \(alice\) +busy: shared by --gpu-mem job {job} ",
                         shown, re.M), shown  # fmt: skip
    finally:
        sbox.run(["touch", path])
        set_picture(sbox, simple_gpus(1))
    assert ts(sbox, "alice", "-w", str(job), check=False, timeout=60).returncode == 0
    assert jobs(sbox)[job]["GPU_Mem_Peak_MiB"] == 3072

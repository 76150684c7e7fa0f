"""GPUs on the system service, in a booted systemd: quotas, fairness, device fences.

The service loads the NVML stand-in (built inside the box, where its /tmp is
private) through a drop-in's Environment=, and reads its GPUs from a picture
file the tests rewrite. bob has the default quota of one GPU, alice four, and
dave (an admin) eight, more than the server's four.

The last test lays a box-only overlay over /dev holding fake /dev/nvidia<N>
nodes (char 195:N, like the real driver's). No driver answers for them here, so
opening one that the job's device cgroup allows fails with ENXIO, and one it
denies fails with EPERM: that difference is what shows the fence.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence

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
admins: [root, dave]
defaults:
  max_running_slots: 8
  max_gpus: 1
  max_queued: 1000
users:
  alice: {max_gpus: 4}
  dave: {max_gpus: 8}
kill_grace_seconds: 3
"""

DROP_IN = f"""\
[Service]
Environment=TSD_NVML_LIBRARY={LIBRARY} TSD_FAKE_NVML={PICTURE}
"""

# Opens each node and prints `path errno-name` (or `path ok`).
PROBE = (
    "import errno, os, sys\n"
    "for p in sys.argv[1:]:\n"
    "    try:\n"
    "        os.close(os.open(p, os.O_RDWR))\n"
    "        print(p, 'ok')\n"
    "    except OSError as e:\n"
    "        print(p, errno.errorcode[e.errno])\n"
)


def set_picture(box: Box, gpus: Sequence[FakeGpu], procs: Sequence[FakeProc] = ()) -> None:
    """Replace the picture atomically: the service may read it at any moment."""
    text = "".join(item.line() + "\n" for item in [*gpus, *procs])
    box.write_file(PICTURE + ".new", text)
    box.run(["mv", "-f", PICTURE + ".new", PICTURE])


@pytest.fixture(scope="module")
def gbox(box: Box) -> Iterator[Box]:
    box.run([box.python, "/src/tests/fixtures/nvml/build.py", NVML_DIR])
    set_picture(box, simple_gpus(4))
    box.write_file("/etc/systemd/system/tsd.service.d/fake-nvml.conf", DROP_IN)
    deploy(box, CONFIG)
    yield box


class Gates:
    """Flag files in the box; a `held(gate)` job runs until its gate exists."""

    def __init__(self, box: Box) -> None:
        self.box = box
        self.made: list[str] = []

    def new(self) -> str:
        path = f"/tmp/gate-{time.monotonic_ns()}"
        self.made.append(path)
        return path

    def open(self, path: str) -> None:
        self.box.run(["touch", path])


@pytest.fixture
def gates(gbox: Box) -> Iterator[Gates]:
    """Gates for one test; at its end all are opened and no job may still run."""
    made = Gates(gbox)
    yield made
    if made.made:
        gbox.run(["touch", *made.made])
    wait_for(lambda: ts(gbox, "root", "-R").stdout.strip() == "0")


def held(gate: str, *echo: str) -> list[str]:
    words = " ".join(echo)
    return ["sh", "-c", f"echo {words}; while [ ! -e {gate} ]; do sleep 0.05; done"]


def submit(box: Box, user: str, *args: str) -> int:
    out = ts(box, user, *args).stdout
    assert re.fullmatch(r"[0-9]+\n", out), out
    return int(out)


def state(box: Box, job: int) -> str:
    return str(jobs(box)[job]["State"])


def wait_state(box: Box, job: int, *states: str, timeout: float = 30.0) -> None:
    wait_for(lambda: state(box, job) in states, timeout=timeout)


def wait_reason(box: Box, job: int) -> str:
    text = ts(box, "root", "-i", str(job)).stdout
    for line in text.splitlines():
        if line.startswith("Wait reason: "):
            return line.removeprefix("Wait reason: ")
    raise AssertionError(f"job {job} shows no wait reason:\n{text}")


def first_line(box: Box, user: str, job: int) -> str:
    path = ts(box, user, "-o", str(job)).stdout.strip()
    wait_for(lambda: box.run(["test", "-s", path], check=False).returncode == 0)
    return box.read_file(path).splitlines()[0]


def gpu_ids(box: Box, job: int) -> list[int]:
    return list(jobs(box)[job]["GPU_IDs"])


def refusal(box: Box, user: str, *args: str) -> str:
    r = ts(box, user, *args, check=False)
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ts: "), r.stderr
    return lines[0]


# --------------------------------------------------------------------- tests


def test_gpu_job_without_nvidia_device_nodes_runs_unfenced_with_its_gpu(
    gbox: Box, gates: Gates
) -> None:
    gate = gates.new()
    argv = held(gate, "$CUDA_VISIBLE_DEVICES", "$CUDA_DEVICE_ORDER")
    job = submit(gbox, "alice", "-G", "1", *argv)
    wait_state(gbox, job, "running")
    assert first_line(gbox, "alice", job) == "0 PCI_BUS_ID"
    unit = jobs(gbox)[job]["Unit"]
    assert unit == f"tsd-job-{job}.scope"
    props = gbox.show(unit, "DevicePolicy", "DeviceAllow")
    # No /dev/nvidia* here: there is nothing to fence, and the job must still run.
    assert props["DevicePolicy"] == "auto" and props.get("DeviceAllow", "") == "", props
    gates.open(gate)
    assert ts(gbox, "alice", "-w", str(job), check=False).returncode == 0


def test_over_quota_or_over_pool_requests_are_refused_at_submit(gbox: Box) -> None:
    line = refusal(gbox, "bob", "-G", "2", "true")
    assert line == "ts: job needs 2 GPUs but your quota (max_gpus) is 1"
    line = refusal(gbox, "bob", "-g", "0,1", "true")
    assert "max_gpus" in line
    line = refusal(gbox, "alice", "-G", "5", "true")
    assert line == "ts: job needs 5 GPUs but your quota (max_gpus) is 4"
    line = refusal(gbox, "dave", "-G", "5", "true")
    assert line == "ts: job needs 5 GPUs but the server has 4"
    line = refusal(gbox, "alice", "-g", "4", "true")
    assert line == "ts: GPU 4 is not in the visible set (0,1,2,3)"
    assert all(j["Command"] != "true" for j in jobs(gbox).values())


def test_a_users_second_gpu_job_waits_for_his_quota_while_another_user_runs_beside(
    gbox: Box, gates: Gates
) -> None:
    gate = gates.new()
    first = submit(gbox, "bob", "-G", "1", *held(gate, "$CUDA_VISIBLE_DEVICES"))
    wait_state(gbox, first, "running")
    second = submit(gbox, "bob", "-G", "1", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES")
    wait_state(gbox, second, "allocating")
    assert wait_reason(gbox, second) == "user quota: 1 of 1 GPUs in use (max_gpus)"
    beside = submit(gbox, "alice", "-G", "2", *held(gate, "$CUDA_VISIBLE_DEVICES"))
    wait_state(gbox, beside, "running")
    assert state(gbox, second) == "allocating"  # two GPUs are still free: only the quota holds
    taken = gpu_ids(gbox, first) + gpu_ids(gbox, beside)
    assert sorted(taken) == [0, 1, 2]
    # Everyone sees the server's GPU jobs and GPUs with ts -g.
    shown = ts(gbox, "bob", "-g").stdout.splitlines()
    assert shown[1:3] == [f"{first:<4} {gpu_ids(gbox, first)[0]}",
                          f"{beside:<4} {' '.join(map(str, gpu_ids(gbox, beside)))}"]
    assert any(re.match(r"^3 .* free$", line) for line in shown), shown
    # bob's first job ends: his second starts at once, on a free GPU.
    ts(gbox, "root", "-k", str(first))
    assert ts(gbox, "bob", "-w", str(second), check=False, timeout=30).returncode == 0
    assert len(gpu_ids(gbox, second)) == 1
    assert gpu_ids(gbox, second)[0] not in gpu_ids(gbox, beside)
    assert first_line(gbox, "bob", second) == str(gpu_ids(gbox, second)[0])


def test_a_freed_gpu_goes_to_the_user_with_fewer_running_jobs_not_the_older_request(
    gbox: Box, gates: Gates
) -> None:
    gate = gates.new()
    alice_gates = [gates.new() for _ in range(3)]
    alice = [submit(gbox, "alice", "-G", "1", *held(g)) for g in alice_gates]
    dave = submit(gbox, "dave", "-G", "1", *held(gate))
    for job in [*alice, dave]:
        wait_state(gbox, job, "running")
    older = submit(gbox, "alice", "-G", "1", "true")  # alice is at 3 of her 4 GPUs
    newer = submit(gbox, "bob", "-G", "1", *held(gate))
    for job in (older, newer):
        wait_state(gbox, job, "allocating")
        assert wait_reason(gbox, job) == "waiting for 1 free GPU (0 free)"
    freed = gpu_ids(gbox, alice[0])
    gates.open(alice_gates[0])
    # alice still runs 2 jobs, bob none: bob's later request gets the GPU.
    wait_state(gbox, newer, "running")
    assert gpu_ids(gbox, newer) == freed
    assert state(gbox, older) == "allocating"
    gates.open(alice_gates[1])
    assert ts(gbox, "alice", "-w", str(older), check=False).returncode == 0


def test_an_outside_process_makes_its_gpu_busy_and_ts_g_names_its_user(
    gbox: Box, gates: Gates
) -> None:
    gate = gates.new()
    # carol (not in group tsd) runs something on GPU 0 by hand, outside tsd.
    pidfile = "/tmp/outsider.pid"
    gbox.run(f"runuser -u carol -- sh -c 'echo $$ > {pidfile}; exec sleep 300' "
             ">/dev/null 2>&1 &")
    wait_for(lambda: gbox.run(["test", "-s", pidfile], check=False).returncode == 0)
    pid = int(gbox.read_file(pidfile))
    try:
        gpus = simple_gpus(4)
        gpus[0] = FakeGpu(0, uuid_for(0), gpus[0].name, 80 * GIB, 20 * GIB)
        set_picture(gbox, gpus, [FakeProc(gpu=0, pid=pid, used=20 * GIB)])
        # NVML pictures are reused for a moment (0.2 s); ts -g takes a fresh one.
        wait_for(lambda: f"used by pid {pid}" in ts(gbox, "bob", "-g").stdout)
        job = submit(gbox, "bob", "-G", "1", *held(gate, "$CUDA_VISIBLE_DEVICES"))
        wait_state(gbox, job, "running")
        assert gpu_ids(gbox, job) == [1]
        shown = ts(gbox, "bob", "-g").stdout
        busy = rf"^0 .* busy: used by pid {pid} \(carol\), 20\.0 GiB$"
        assert re.search(busy, shown, re.M), shown
        assert f"pid {pid} (carol) 20.0 GiB" in shown
    finally:
        gbox.run(["kill", str(pid)], check=False)
        set_picture(gbox, simple_gpus(4))


def _fake_nvidia_dev(box: Box, count: int) -> None:
    """Overlay the box's /dev (box only: /dev is the host's, rbound) and add nvidia nodes."""
    nodes = " ".join(f"nvidia{n}" for n in range(count))
    box.run(f"""set -e
mkdir -p /run/hostdev /run/devov/upper /run/devov/work
mount --rbind /dev /run/hostdev
mount -t overlay overlay -o lowerdir=/dev,upperdir=/run/devov/upper,workdir=/run/devov/work /dev
for m in pts shm mqueue; do mount --rbind /run/hostdev/$m /dev/$m; done
n=0; for node in {nodes}; do mknod -m 666 /dev/$node c 195 $n; n=$((n+1)); done
mknod -m 666 /dev/nvidiactl c 195 255
""")


def test_a_job_scope_may_open_only_its_own_gpus_device_nodes(gbox: Box, gates: Gates) -> None:
    gate = gates.new()
    _fake_nvidia_dev(gbox, 4)
    nodes = [f"/dev/nvidia{n}" for n in range(4)] + ["/dev/nvidiactl", "/dev/null"]
    probe = ["python3", "-c", PROBE, *nodes]
    job = submit(gbox, "alice", "-g", "1,3", *probe)
    assert ts(gbox, "alice", "-w", str(job), check=False).returncode == 0
    out = gbox.read_file(ts(gbox, "alice", "-o", str(job)).stdout.strip()).splitlines()
    assert out == [
        "/dev/nvidia0 EPERM",  # denied by the scope's device cgroup
        "/dev/nvidia1 ENXIO",  # allowed; no driver behind the fake node
        "/dev/nvidia2 EPERM",
        "/dev/nvidia3 ENXIO",
        "/dev/nvidiactl ENXIO",
        "/dev/null ok",
    ]
    held_job = submit(gbox, "alice", "-g", "2", *held(gate))
    wait_state(gbox, held_job, "running")
    props = gbox.show(f"tsd-job-{held_job}.scope", "DevicePolicy", "DeviceAllow")
    assert props["DevicePolicy"] == "closed"
    allowed = props["DeviceAllow"]
    assert "/dev/nvidia2 rw" in allowed and "/dev/nvidiactl rw" in allowed
    assert not re.search(r"/dev/nvidia[013] ", allowed), allowed
    # A CPU job gets no GPU at all: CUDA_VISIBLE_DEVICES is empty and the nodes are shut.
    cpu = submit(gbox, "bob", *probe)
    assert ts(gbox, "bob", "-w", str(cpu), check=False).returncode == 0
    out = gbox.read_file(ts(gbox, "bob", "-o", str(cpu)).stdout.strip()).splitlines()
    assert out[:5] == [f"{n} EPERM" for n in nodes[:4]] + ["/dev/nvidiactl EPERM"]
    assert out[5] == "/dev/null ok"
    # Outside any job, nothing is fenced (the nodes exist and have no driver).
    r = gbox.run(["python3", "-c", PROBE, "/dev/nvidia0"])
    assert r.stdout == "/dev/nvidia0 ENXIO\n"

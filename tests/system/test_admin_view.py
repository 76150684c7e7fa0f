"""The admin's view on the system service in a booted box: the Prometheus textfile at its
default path (after a config reload turns it on), and idle-GPU notices run as the job's
user, through the NVML stand-in."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from box import Box
from deploy import deploy
from fixtures.nvml.picture import GIB, FakeGpu, uuid_for

parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client not installed")

NVML_DIR = "/opt/fake-nvml"
LIBRARY = f"{NVML_DIR}/libnvidia-ml.so.1"
PICTURE = f"{NVML_DIR}/picture.txt"
DEFAULT_PROM = "/var/lib/prometheus/node-exporter/tsd.prom"

BASE = """\
slots: 4
gpus:
  poll_seconds: 1
admins: [root]
defaults:
  max_queued: 100
gpu:
  idle_after: 2s
  idle_notify: 'id -un > /tmp/idle-$TS_JOB_ID; id -Gn >> /tmp/idle-$TS_JOB_ID'
kill_grace_seconds: 3
"""
METRICS_OFF = BASE + 'metrics:\n  textfile: ""\n'

DROP_IN = f"""\
[Service]
Environment=TSD_NVML_LIBRARY={LIBRARY} TSD_FAKE_NVML={PICTURE}
"""


@pytest.fixture(scope="module")
def sbox(box: Box) -> Iterator[Box]:
    box.run([box.python, "/src/tests/fixtures/nvml/build.py", NVML_DIR])
    gpus = [FakeGpu(0, uuid_for(0), "NVIDIA A100", 80 * GIB, GIB, util=0, memory_util=0,
                    temperature=40, power_mw=60_000, power_limit_mw=400_000),
            FakeGpu(1, uuid_for(1), "NVIDIA A100", 80 * GIB, 0, util=75, memory_util=20)]
    box.write_file(PICTURE, "".join(g.line() + "\n" for g in gpus))
    box.write_file("/etc/systemd/system/tsd.service.d/fake-nvml.conf", DROP_IN)
    deploy(box, METRICS_OFF)
    yield box


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def ts(box: Box, user: str, *args: str) -> str:
    return box.run(["ts", *args], user=user).stdout


def wait_for(box: Box, what: str, check: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check() if callable(check) else check:  # type: ignore[operator]
            return
        time.sleep(0.2)
    log = box.run("journalctl -u tsd --no-pager | tail -n 30", check=False).stdout
    pytest.fail(f"timed out waiting for {what}\n{log}")


def test_the_system_service_writes_the_default_textfile_once_a_reload_turns_it_on(
    sbox: Box,
) -> None:
    box = sbox
    job = int(ts(box, "alice", "-G", "1", "sh", "-c", "sleep 60"))
    wait_for(box, "the job to run", lambda: ts(box, "alice", "-s", str(job)).strip() == "running")
    time.sleep(6)  # longer than the write interval: metrics are off
    assert not box.exists(DEFAULT_PROM)

    box.write_file("/etc/tsd/tsd.yaml", BASE)  # no metrics: key, so the default path
    box.systemctl("reload", "tsd")
    wait_for(box, DEFAULT_PROM, lambda: box.exists(DEFAULT_PROM), timeout=10)
    stat = box.run(["stat", "-c", "%U %a", DEFAULT_PROM]).stdout.split()
    assert stat == ["root", "644"]
    got = samples(box.read_file(DEFAULT_PROM))
    assert got[("tsd_jobs", (("state", "running"), ("user", "alice")))] == 1
    assert got[("tsd_slots", (("kind", "total"),))] == 4
    assert got[("tsd_slots", (("kind", "used"),))] == 1
    assert got[("tsd_gpus", (("kind", "total"),))] == 2
    assert got[("tsd_gpus", (("kind", "allocated"),))] == 1
    assert got[("tsd_gpu_utilization_percent", (("gpu", "1"), ("uuid", uuid_for(1))))] == 75
    assert got[("tsd_gpu_power_limit_watts", (("gpu", "0"), ("uuid", uuid_for(0))))] == 400
    assert got[("tsd_user_gpu_seconds_total", (("user", "alice"),))] >= 0
    ts(box, "root", "-k", str(job))


def test_the_idle_notice_runs_as_the_jobs_user_with_her_groups(sbox: Box) -> None:
    box = sbox
    job = int(ts(box, "alice", "-g", "0", "sh", "-c", "sleep 60"))
    notice = f"/tmp/idle-{job}"
    wait_for(box, "the idle notice", lambda: box.exists(notice), timeout=20)
    time.sleep(0.5)
    who, groups = box.read_file(notice).splitlines()
    assert who == "alice"
    assert set(groups.split()) >= {"alice", "tsd", "lab"}
    assert "running(idle)" in ts(box, "alice", "-l")
    ts(box, "alice", "-k", str(job))

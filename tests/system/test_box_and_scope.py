"""The systemd box itself, tsd's unit files, and tsd.scope against a real systemd.

Everything runs inside one booted box per module (see conftest.py); scope
operations go through tests/system/scope_probe.py, run with the project's
Python inside the box, the way the daemon will call tsd.scope.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from box import Box, BoxError

PROBE = "/src/tests/system/scope_probe.py"


def probe(box: Box, *args: str, expect_rc: int = 0) -> Any:
    """Run scope_probe.py in the box and return its JSON answer."""
    r = box.run([box.python, PROBE, *args], env={"PYTHONPATH": "/src"}, check=False)
    assert r.returncode == expect_rc, f"probe {args}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout)


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll `cond` until it holds; fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def cgroup_of(box: Box, pid: int) -> str:
    """The cgroup2 path of `pid` in the box."""
    for line in box.read_file(f"/proc/{pid}/cgroup").splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"no cgroup2 line for {pid}")


def alive(box: Box, pid: int) -> bool:
    """Whether `pid` exists in the box and is not a zombie."""
    r = box.run(["cat", f"/proc/{pid}/stat"], check=False)
    return r.returncode == 0 and r.stdout.split(") ", 1)[1][0] != "Z"


@pytest.fixture(scope="module")
def alice(box: Box) -> int:
    """User alice in the box; her uid."""
    return box.add_user("alice")


@pytest.fixture(scope="module")
def installed(box: Box) -> None:
    """tsd's sysusers, tmpfiles and units installed in the box as a package would."""
    box.run(["systemd-sysusers", "/src/systemd/tsd.sysusers"])
    box.run(["systemd-tmpfiles", "--create", "/src/systemd/tsd.tmpfiles"])
    for unit in ("tsd.socket", "tsd.service", "tsd.slice"):
        box.run(["cp", f"/src/systemd/{unit}", f"/usr/lib/systemd/system/{unit}"])
    box.systemctl("daemon-reload")


# ---- the box ---------------------------------------------------------------------


def test_box_runs_systemd_as_pid1_and_systemctl_answers(box: Box) -> None:
    assert box.read_file("/proc/1/comm").strip() == "systemd"
    state = box.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state in ("running", "degraded")
    assert box.show("dbus.service", "ActiveState") == {"ActiveState": "active"}
    # The host sees the box's PID 1 as systemd too.
    assert os.readlink(f"/proc/{box.pid}/exe").endswith("/systemd")


def test_box_writes_stay_in_the_box(box: Box) -> None:
    name = f"tsdbox-probe-{uuid.uuid4().hex}"
    box.write_file(f"/tmp/{name}", "tmp\n")
    box.write_file(f"/etc/{name}", "etc\n", mode=0o600)
    assert box.read_file(f"/etc/{name}") == "etc\n"
    assert box.run(["stat", "-c", "%a", f"/etc/{name}"]).stdout.strip() == "600"
    assert not Path(f"/tmp/{name}").exists()
    assert not Path(f"/etc/{name}").exists()


def test_box_sees_the_checkout_read_only_at_src(box: Box) -> None:
    assert box.exists("/src/tsd/scope.py")
    r = box.run(["touch", "/src/tsd/should-not-exist"], check=False)
    assert r.returncode != 0
    assert "Read-only" in r.stderr
    assert box.run([box.python, "-c", "import pydbus, sys; print(sys.prefix)"]).stdout.strip()


def test_box_runs_commands_as_a_user_with_a_login_environment(box: Box, alice: int) -> None:
    r = box.run('echo "$(id -un) $(id -u) $HOME $USER $(pwd)"', user="alice")
    assert r.stdout.split() == ["alice", str(alice), "/home/alice", "alice", "/home/alice"]
    r = box.run(["sh", "-c", "cat; echo $EXTRA"], user="alice", input="in\n", env={"EXTRA": "x"})
    assert r.stdout == "in\nx\n"


def test_add_user_creates_missing_groups_and_joins_them(box: Box) -> None:
    uid = box.add_user("bob", groups=["tsdtest-a", "tsdtest-b"])
    assert box.uid("bob") == uid >= 1000
    groups = box.run(["id", "-nG"], user="bob").stdout.split()
    assert sorted(groups) == ["bob", "tsdtest-a", "tsdtest-b"]


def test_box_run_failure_names_command_code_and_output(box: Box) -> None:
    with pytest.raises(BoxError) as err:
        box.run("echo out; echo err >&2; exit 3")
    msg = str(err.value)
    assert "exited 3" in msg and "out" in msg and "err" in msg and "exit 3" in msg


def test_stopped_box_leaves_no_process_cgroup_or_files(box: Box) -> None:
    other = Box.start(box.src)
    pid, cgroup, tmp = other.pid, other.cgroup, other.tmp
    assert other.run(["systemctl", "is-system-running", "--wait"], check=False).stdout
    other.stop()
    other.stop()  # idempotent
    assert not Path(f"/proc/{pid}").exists()
    assert not cgroup.exists()
    assert not tmp.exists()
    # The module's own box is untouched by another box's life.
    assert box.read_file("/proc/1/comm").strip() == "systemd"


# ---- unit files ------------------------------------------------------------------


def test_sysusers_creates_system_group_tsd(box: Box, installed: None) -> None:
    line = box.run(["getent", "group", "tsd"]).stdout.strip()
    gid = int(line.split(":")[2])
    assert gid < 1000, f"tsd should be a system group: {line}"


def test_tmpfiles_creates_root_only_state_dir(box: Box, installed: None) -> None:
    out = box.run(["stat", "-c", "%U:%G %a", "/var/lib/tsd", "/etc/tsd"]).stdout.split("\n")
    assert out[:2] == ["root:root 700", "root:root 755"]


def test_unit_files_pass_systemd_analyze_verify(box: Box) -> None:
    r = box.run(
        [
            "systemd-analyze",
            "verify",
            *(f"/src/systemd/{u}" for u in ("tsd.socket", "tsd.service", "tsd.slice")),
        ],
        check=False,
    )
    # The daemon's binary is not installed in the box; any other complaint is a bug.
    problems = [
        line
        for line in r.stderr.splitlines()
        if line.strip() and "/usr/bin/tsd is not executable" not in line
    ]
    assert problems == []


def test_socket_unit_makes_root_tsd_0660_socket_without_starting_daemon(
    box: Box, installed: None
) -> None:
    box.systemctl("start", "tsd.socket")
    try:
        out = box.run(["stat", "-c", "%U:%G %a %F", "/run/tsd/tsd.sock", "/run/tsd"]).stdout
        assert out.splitlines() == ["root:tsd 660 socket", "root:root 755 directory"]
        assert box.show("tsd.socket", "ActiveState")["ActiveState"] == "active"
        assert box.show("tsd.service", "ActiveState")["ActiveState"] == "inactive"
        props = box.show("tsd.service", "KillMode", "Type", "NotifyAccess", "Requires")
        assert props["KillMode"] == "process"
        assert props["Type"] == "notify"
        assert props["NotifyAccess"] == "main"
        assert "tsd.socket" in props["Requires"]
    finally:
        box.systemctl("stop", "tsd.socket")
    # RemoveOnStop: no stale socket file to mislead ts.
    assert not box.exists("/run/tsd/tsd.sock")


# ---- tsd.scope -------------------------------------------------------------------


def test_scope_puts_user_job_in_its_slice_under_tsd_slice(
    box: Box, alice: int, installed: None
) -> None:
    started = probe(box, "start", "7", "alice", "--", "sleep 1000")
    unit, pid = started["unit"], started["pid"]
    try:
        want = f"/tsd.slice/tsd-u{alice}.slice/tsd-job-7.scope"
        assert unit == "tsd-job-7.scope"
        assert cgroup_of(box, pid) == want
        assert started["cgroup"] == want
        # The job's own processes run as alice, in that scope too.
        wait_until(
            lambda: box.run(["pgrep", "-u", "alice", "-x", "sleep"], check=False).returncode == 0,
            "alice's sleep",
        )
        sleep_pid = int(box.run(["pgrep", "-u", "alice", "-x", "sleep"]).stdout.split()[0])
        assert cgroup_of(box, sleep_pid) == want
        assert box.show(unit, "Slice")["Slice"] == f"tsd-u{alice}.slice"
        assert box.show(f"tsd-u{alice}.slice", "Slice")["Slice"] == "tsd.slice"
        # tsd.slice is the installed unit, not an implicit one.
        assert box.show("tsd.slice", "Description")["Description"] == "tsd jobs"
    finally:
        probe(box, "kill", unit, str(int(signal.SIGKILL)))


def test_scope_carries_memory_cpu_and_tasks_limits(box: Box, alice: int) -> None:
    started = probe(
        box,
        "start",
        "10",
        "alice",
        "--memory-max",
        str(3 << 30),
        "--cpu-quota",
        "400",
        "--tasks-max",
        "77",
        "--",
        "sleep 1000",
    )
    unit = started["unit"]
    try:
        props = box.show(unit, "MemoryMax", "CPUQuotaPerSecUSec", "TasksMax", "CollectMode")
        assert props == {
            "MemoryMax": str(3 << 30),
            "CPUQuotaPerSecUSec": "4s",
            "TasksMax": "77",
            "CollectMode": "inactive-or-failed",
        }
    finally:
        probe(box, "kill", unit, str(int(signal.SIGKILL)))


def test_list_jobs_and_usage_see_a_running_scope(box: Box, alice: int) -> None:
    unit = probe(
        box,
        "start",
        "11",
        "alice",
        "--",
        "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; sleep 1000",
    )["unit"]
    try:
        assert probe(box, "list").get("11") == "tsd-job-11.scope"
        wait_until(
            lambda: (probe(box, "usage", unit)["cpu_seconds"] or 0) > 0.01,
            "the busy loop's CPU time to show",
        )
        assert probe(box, "cgroup", unit)["cgroup"].endswith("/tsd-job-11.scope")
    finally:
        probe(box, "kill", unit, str(int(signal.SIGKILL)))
    wait_until(lambda: "11" not in probe(box, "list"), "the killed scope to go away")


def test_kill_ends_the_whole_tree_including_a_daemonized_child(box: Box, alice: int) -> None:
    pidfile = "/tmp/tsd-daemonized-8.pid"
    started = probe(
        box,
        "start",
        "8",
        "alice",
        "--",
        f"setsid sh -c 'sleep 1001 & echo $! > {pidfile}'; exec sleep 1002",
    )
    unit, main_pid = started["unit"], started["pid"]
    wait_until(
        lambda: box.exists(pidfile) and box.read_file(pidfile).strip() != "",
        "the daemonized child's pid file",
    )
    daemon_pid = int(box.read_file(pidfile))
    # It escaped the job's session and process group but not its cgroup.
    assert box.run(["ps", "-o", "sid=", "-p", str(daemon_pid)]).stdout.strip() != (
        box.run(["ps", "-o", "sid=", "-p", str(main_pid)]).stdout.strip()
    )
    assert cgroup_of(box, daemon_pid) == cgroup_of(box, main_pid)
    assert alive(box, main_pid) and alive(box, daemon_pid)

    assert probe(box, "kill", unit, str(int(signal.SIGTERM))) == {"ok": True}
    wait_until(
        lambda: not alive(box, main_pid) and not alive(box, daemon_pid),
        "both the job and its daemonized child to die",
    )
    wait_until(lambda: "8" not in probe(box, "list"), "the empty scope to be collected")
    assert probe(box, "kill", unit, "15") == {"ok": False}


def test_kill_stop_usage_of_a_missing_unit_report_it_is_gone(box: Box) -> None:
    assert probe(box, "kill", "tsd-job-999999.scope", "15") == {"ok": False}
    assert probe(box, "stop", "tsd-job-999999.scope") == {"ok": True}
    assert probe(box, "usage", "tsd-job-999999.scope") == {"cpu_seconds": None, "memory_peak": None}
    assert probe(box, "cgroup", "tsd-job-999999.scope") == {"cgroup": None}


def test_stop_ends_a_scope(box: Box, alice: int) -> None:
    started = probe(box, "start", "12", "alice", "--", "sleep 1000")
    probe(box, "stop", started["unit"])
    wait_until(lambda: not alive(box, started["pid"]), "the stopped job to die")
    wait_until(lambda: "12" not in probe(box, "list"), "the stopped scope to go away")


def test_a_scope_of_the_name_made_for_something_else_fails_with_one_clear_line(
    box: Box, alice: int
) -> None:
    # Ids start again with a new state.db while the old one's jobs may still run.
    unit = probe(box, "start", "13", "alice", "--desc", "job 13, old", "--", "sleep 1000")["unit"]
    try:
        err = probe(box, "start", "13", "alice", "--desc", "job 13, new", "--", "sleep 1000",
                    expect_rc=3)["error"]
        assert "tsd-job-13.scope" in err and "\n" not in err
        assert "already exists" in err
    finally:
        probe(box, "kill", unit, "9")


def test_a_scope_left_from_a_dead_start_of_the_same_job_is_replaced(box: Box, alice: int) -> None:
    first = probe(box, "start", "41", "alice", "--desc", "job 41", "--", "sleep 1000")
    again = probe(box, "start", "41", "alice", "--desc", "job 41", "--", "sleep 1000")
    try:
        assert again["unit"] == first["unit"] == "tsd-job-41.scope"
        deadline = time.monotonic() + 10  # the leftover's process is gone (and reaped)
        while box.exists(f"/proc/{first['pid']}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not box.exists(f"/proc/{first['pid']}")
    finally:
        probe(box, "kill", again["unit"], "9")


def test_device_policy_and_allow_list_appear_on_the_scope(box: Box, alice: int) -> None:
    unit = probe(
        box,
        "start",
        "14",
        "alice",
        "--device",
        "/dev/nvidia0",
        "--device",
        "/dev/nvidiactl",
        "--",
        "sleep 1000",
    )["unit"]
    try:
        props = box.show(unit, "DevicePolicy", "DeviceAllow")
        assert props["DevicePolicy"] == "closed"
        assert sorted(props["DeviceAllow"].splitlines()) == ["/dev/nvidia0 rw", "/dev/nvidiactl rw"]
    finally:
        probe(box, "kill", unit, "9")


def _openable_device(box: Box) -> str:
    """A device node outside systemd's always-allowed set that root can open in the box."""
    for dev in ("/dev/loop0", "/dev/loop-control", "/dev/vcs", "/dev/vcsa"):
        if box.run(["sh", "-c", f"true < {dev}"], check=False).returncode == 0:
            return dev
    pytest.skip("no device node that root can open in this box to test DevicePolicy with")


@pytest.mark.parametrize(
    ("allow", "expect"),
    [(None, "dev-ok"), ("listed", "dev-ok"), ("empty", "dev-denied")],
)
def test_device_policy_closes_unlisted_devices_but_keeps_dev_null(
    box: Box, allow: str | None, expect: str
) -> None:
    dev = _openable_device(box)
    job = {None: 20, "listed": 21, "empty": 22}[allow]
    out = f"/tmp/tsd-devices-{job}.txt"
    devices: list[str] = []
    if allow == "listed":
        devices = ["--device", dev]
    elif allow == "empty":
        devices = ["--close-devices"]  # devices=[]: only the standard pseudo devices
    script = f"true < {dev} && echo dev-ok || echo dev-denied; true > /dev/null && echo null-ok"
    probe(box, "start", str(job), "root", *devices, "--", f"({script}) > {out}")
    wait_until(lambda: box.exists(out) and box.read_file(out).count("\n") == 2, "the job's report")
    assert box.read_file(out).split() == [expect, "null-ok"]


def test_start_with_a_vanished_pid_fails_and_leaves_no_scope(box: Box) -> None:
    err = probe(box, "start-pid", "15", "0", "999999", expect_rc=3)["error"]
    assert "tsd-job-15.scope" in err and "\n" not in err
    assert "15" not in probe(box, "list")
    assert box.show("tsd-job-15.scope", "LoadState")["LoadState"] == "not-found"


def test_starting_a_scope_takes_well_under_a_second(box: Box) -> None:
    timing = probe(box, "bench", "100", "20")
    median, worst = timing["median_s"] * 1000, timing["max_s"] * 1000
    print(f"scope start: median {median:.1f} ms, max {worst:.1f} ms")
    assert timing["median_s"] < 0.5

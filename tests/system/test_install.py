"""packaging/install.sh and uninstall.sh, run in a booted box as an admin would.

The box starts as a copy of this machine without tsd: no /opt/tsd, no group
tsd. The tests run in file order on one box and build on each other: install,
a multi-user session, a second run that must change nothing, an edited
config, an upgrade from a changed checkout with jobs running and queued,
uninstall, and finally an install where systemd is not running.

`run_session` is the short multi-user session that test_deb.py runs against
the .deb as well.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from box import Box

REPO = Path(__file__).resolve().parents[2]
VERSION = re.search(
    r'^__version__ = "(.*)"$', (REPO / "tsd" / "__init__.py").read_text(), re.M
).group(1)  # type: ignore[union-attr]

# Everything install.sh writes outside /var/lib/tsd (the daemon's state).
INSTALLED_PATHS = (
    "/opt/tsd",
    "/usr/local/bin/ts",
    "/usr/local/bin/tsd",
    "/usr/local/lib/systemd/system",
    "/usr/local/lib/sysusers.d",
    "/usr/local/lib/tmpfiles.d",
    "/usr/local/share/man/man1",
    "/usr/local/share/man/man8",
    "/usr/local/share/bash-completion",
    "/usr/local/share/fish",
    "/usr/local/share/zsh",
    "/etc/tsd",
    "/etc/systemd/system/multi-user.target.wants",
    "/etc/systemd/system/sockets.target.wants",
)


# ---------------------------------------------------------------- helpers (shared)


def report(request: pytest.FixtureRequest, line: str) -> None:
    """Print a measurement on the terminal, around pytest's output capture."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n[measure] {line}")


def ts(
    box: Box, user: str | None, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`ts ARGS` in the box as `user` (None: root)."""
    return box.run(["ts", *args], user=user, check=check)


def ts_without_systemd(
    box: Box, user: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`ts ARGS` as `user` (a login shell) where /run/systemd/system is hidden, as in a
    container or chroot: ts then sees no running systemd, so no system service."""
    inner = shlex.join(["ts", *args])
    script = f"mount -t tmpfs none /run/systemd && exec runuser -l {user} -c {shlex.quote(inner)}"
    return box.run(["unshare", "--mount", "sh", "-c", script], check=check)


def submit(box: Box, user: str | None, *cmd: str) -> int:
    """Queue `cmd` as `user`; the job id ts printed."""
    out = ts(box, user, *cmd).stdout.strip()
    assert out.isdigit(), f"ts {cmd} printed {out!r}, not a job id"
    return int(out)


def check_lean_ts(box: Box, launcher: str, python: str, site: str) -> None:
    """The installed `ts` is tsd/entry.py's launcher run by PYTHON -S, and works as ts.

    An everyday call (as alice, through PATH) loads neither site.py and its .pth
    files' modules nor re; errors and exit codes are ts's own; a module outside
    the standard library (a rarely used path's) is still found, site loaded then.
    """
    assert box.read_file(launcher).splitlines()[0] == f"#!{python} -S"
    listed = box.run(["ts", "-l"], user="alice", env={"PYTHONPROFILEIMPORTTIME": "1"})
    mods = {
        x.rsplit("|", 1)[1].strip() for x in listed.stderr.splitlines()
        if x.startswith("import time:")
    }  # fmt: skip
    assert "tsd.cli" in mods, listed.stderr
    heavy = {"site", "sitecustomize", "_distutils_hack", "re", "enum", "typing", "dataclasses"}
    assert not mods & heavy, sorted(mods & heavy)
    bad = ts(box, "alice", "-x", check=False)
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr == "ts: unknown option -x (see ts -h)\n"
    assert ts(box, "alice", "-h").stdout.startswith(f"Task Spooler v{VERSION} (tsd)")
    job = submit(box, "alice", "sh", "-c", "exit 3")
    assert ts(box, "alice", "-w", str(job), check=False).returncode == 3
    third_party = (
        f"import sys; sys.path.append({site!r}); from tsd.entry import SiteOnDemand; "
        "sys.meta_path.append(SiteOnDemand); import click, yaml, psutil, pynvml"
    )
    box.run([python, "-S", "-c", third_party], user="alice")


def jobs(box: Box) -> dict[int, dict[str, Any]]:
    """Every user's jobs, as root sees them (`ts -A -M json`), by id."""
    return {j["ID"]: j for j in json.loads(ts(box, None, "-A", "-M", "json").stdout)}


def wait_state(box: Box, user: str, job: int, state: str, timeout: float = 20.0) -> None:
    """Poll `ts -s JOB` until it says `state`."""
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        seen = ts(box, user, "-s", str(job)).stdout.strip()
        if seen == state:
            return
        time.sleep(0.1)
    pytest.fail(f"job {job} is {seen!r}, not {state!r}, after {timeout}s")


def socket_owner_and_mode(box: Box) -> str:
    """`user:group mode` of the system socket."""
    return box.run(["stat", "-c", "%U:%G %a %F", "/run/tsd/tsd.sock"]).stdout.strip()


def versions(box: Box) -> tuple[str, str]:
    """The versions `ts -V` and `tsd --version` print."""
    ts_v = re.search(r"v(\S+) \(tsd\)", ts(box, "alice", "-V").stdout)
    tsd_v = re.search(r"version (\S+)", box.run(["tsd", "--version"]).stdout)
    assert ts_v and tsd_v, "no version in ts -V or tsd --version"
    return ts_v.group(1), tsd_v.group(1)


def run_session(box: Box) -> None:
    """The short multi-user session: alice and bob (both in group tsd) share the server."""
    first = submit(box, "alice", "echo", "hi")
    assert ts(box, "alice", "-w").returncode == 0  # waits for her last job
    assert ts(box, "alice", "-c", str(first)).stdout == "hi\n"
    listing = ts(box, "alice", "-l").stdout.splitlines()
    assert listing[0].startswith("ID   State      Output")
    assert any(re.match(rf"{first}\s+finished\s.*echo hi$", row) for row in listing), listing

    long = submit(box, "alice", "sleep", "60")
    bobs = submit(box, "bob", "echo", "from bob")
    ts(box, "bob", "-w", str(bobs))
    wait_state(box, "alice", long, "running")

    # Her own list shows her jobs only; -A shows everyone's, with a User column.
    assert f"{bobs} " not in "\n".join(r[:6] for r in ts(box, "alice", "-l").stdout.splitlines())
    everyone = ts(box, "alice", "-A", "-l").stdout.splitlines()
    assert "User" in everyone[0].split()
    assert any(re.match(rf"{bobs}\s+bob\s+finished\s", r) for r in everyone), everyone
    assert any(re.match(rf"{long}\s+alice\s+running\s", r) for r in everyone), everyone

    # bob cannot kill alice's job; she can.
    r = ts(box, "bob", "-k", str(long), check=False)
    assert (r.returncode, r.stderr.strip()) == (1, f"ts: job {long} belongs to alice")
    assert ts(box, "alice", "-s", str(long)).stdout.strip() == "running"
    ts(box, "alice", "-k", str(long))
    assert ts(box, "alice", "-w", str(long), check=False).returncode == 255  # killed


def tab_complete(box: Box, user: str, typed: str, expect: str) -> str:
    """Type `typed` and Tab in a new login shell of `user` (bash -l in a tmux pane in the
    box, as a terminal would start it); the screen once it shows `expect` (or after 10 s),
    then the screen after `complete -p ts` in that shell."""
    sock = f"/tmp/tmux-complete-{user}.sock"

    def tmux(*args: str) -> str:
        return box.run(["tmux", "-S", sock, *args], user=user, env={"TERM": "xterm"}).stdout

    tmux("new-session", "-d", "-x", "160", "-y", "20", "bash -l")
    try:
        deadline = time.monotonic() + 10
        while not tmux("capture-pane", "-p").strip() and time.monotonic() < deadline:
            time.sleep(0.1)  # the prompt
        tmux("send-keys", "-l", typed)
        tmux("send-keys", "Tab")
        screen = ""
        while time.monotonic() < deadline:
            screen = tmux("capture-pane", "-p")
            if expect in screen:
                break
            time.sleep(0.1)
        tmux("send-keys", "C-u")
        tmux("send-keys", "-l", "complete -p ts")
        tmux("send-keys", "Enter")
        time.sleep(0.5)
        return screen + tmux("capture-pane", "-p")
    finally:
        box.run(["tmux", "-S", sock, "kill-server"], user=user, check=False)


def snapshot(box: Box) -> str:
    """Path, type, mode, owner, mtime, link target and checksum of every installed file."""
    paths = " ".join(INSTALLED_PATHS)
    script = (
        f"find {paths} -printf '%p %y %m %u:%g %T@ %l\\n' 2>/dev/null | LC_ALL=C sort; "
        f"find {paths} -type f -exec sha256sum {{}} + 2>/dev/null | LC_ALL=C sort; "
        "getent group tsd"
    )
    return box.run(script, check=False).stdout


def main_pid(box: Box) -> int:
    """tsd.service's MainPID (0 when it is not running)."""
    return int(box.show("tsd.service", "MainPID")["MainPID"])


@dataclass(frozen=True)
class HeldJobs:
    """A job that runs until released, then exits `code`, and one queued behind it (-d)."""

    user: str
    running: int
    queued: int
    pid: int  # of the running job, as `ts -p` says
    code: int
    release: str  # the file whose creation lets the running job end


def running_and_queued(box: Box, user: str, code: int) -> HeldJobs:
    """Start a held job for `user` and queue one behind it."""
    release = f"/tmp/release-{user}-{time.time_ns()}"
    running = submit(
        box, user, "sh", "-c", f"while [ ! -e {release} ]; do sleep 0.1; done; exit {code}"
    )
    wait_state(box, user, running, "running")
    queued = submit(box, user, "-d", "echo", "after")
    assert ts(box, user, "-s", str(queued)).stdout.strip() == "queued"
    pid = int(ts(box, user, "-p", str(running)).stdout.strip())
    return HeldJobs(user, running, queued, pid, code, release)


def diagnose(box: Box) -> str:
    """Every job and the daemon's recent log, for a failure message."""
    listing = ts(box, None, "-A", "-M", "json", check=False).stdout
    log = box.run("journalctl -u tsd --no-pager | tail -n 40", check=False).stdout
    return f"\n--- ts -A -M json:\n{listing}\n--- journalctl -u tsd:\n{log}"


def check_jobs_survived(box: Box, held: HeldJobs) -> None:
    """The held job kept its pid and ends with its own code once released; the queued one
    runs after it."""
    user = held.user
    assert ts(box, user, "-s", str(held.running)).stdout.strip() == "running", diagnose(box)
    assert int(ts(box, user, "-p", str(held.running)).stdout.strip()) == held.pid, diagnose(box)
    assert ts(box, user, "-s", str(held.queued)).stdout.strip() == "queued", diagnose(box)
    box.run(["touch", held.release])
    r = ts(box, user, "-w", str(held.running), check=False)
    assert r.returncode == held.code, diagnose(box)
    assert ts(box, user, "-w", str(held.queued), check=False).returncode == 0
    assert ts(box, user, "-c", str(held.queued)).stdout == "after\n"
    listed = jobs(box)
    assert listed[held.running]["E-Level"] == held.code
    assert listed[held.running]["End"] <= listed[held.queued]["Start"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def first_install(box: Box, request: pytest.FixtureRequest) -> subprocess.CompletedProcess[str]:
    """install.sh run once, as the README says, on a box without tsd."""
    # The box's root is an overlay of this machine's: tsd must not be installed here.
    assert not box.exists("/opt/tsd"), "/opt/tsd exists on this machine already"
    assert not box.exists("/usr/local/bin/ts"), "/usr/local/bin/ts exists on this machine already"
    assert box.run(["getent", "group", "tsd"], check=False).returncode == 2, "group tsd exists"
    t0 = time.monotonic()
    # README: `packaging/install.sh` as root, from the checkout.
    r = box.run("cd /src && packaging/install.sh", check=False, timeout=300)
    report(request, f"install.sh, first run: {time.monotonic() - t0:.1f}s")
    assert r.returncode == 0, f"install.sh failed:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def users(box: Box, first_install: subprocess.CompletedProcess[str]) -> None:
    """alice and bob, members of group tsd."""
    box.add_user("alice", ["tsd"])
    box.add_user("bob", ["tsd"])


# ---------------------------------------------------------------- tests


def test_install_sh_sets_up_the_socket_root_tsd_0660_and_enables_the_units(
    box: Box, first_install: subprocess.CompletedProcess[str]
) -> None:
    assert "listening on /run/tsd/tsd.sock" in first_install.stdout
    assert socket_owner_and_mode(box) == "root:tsd 660 socket"
    assert box.run(["systemctl", "is-enabled", "tsd.socket", "tsd.service"]).stdout.split() == [
        "enabled",
        "enabled",
    ]
    unit = box.read_file("/usr/local/lib/systemd/system/tsd.service")
    assert "\nExecStart=/opt/tsd/bin/tsd --system\n" in unit
    # Reload checks the config with the installed tsd before signalling it.
    assert "\nExecReload=/opt/tsd/bin/tsd --check-config\n" in unit
    assert "/usr/bin/tsd" not in unit
    assert box.read_file("/etc/tsd/tsd.yaml") == (REPO / "etc" / "tsd.yaml").read_text()
    # The venv sees Debian's gi/pydbus, and has pynvml.
    box.run(["/opt/tsd/bin/python", "-c", "import gi, pydbus, pynvml, tsd.daemon"])
    assert box.run(["readlink", "/usr/local/bin/ts"]).stdout.strip() == "/opt/tsd/bin/ts"
    if (REPO / "tsd" / "manpage.py").exists():
        assert ".TH TS 1" in box.read_file("/usr/local/share/man/man1/ts.1").upper()
        assert ".TH TSD 8" in box.read_file("/usr/local/share/man/man8/tsd.8")


def test_completion_files_are_what_ts_prints_and_a_new_login_shell_completes_ts(
    box: Box, users: None
) -> None:
    from tsd.cli_completion import answer

    for shell, path in (
        ("bash", "/usr/local/share/bash-completion/completions/ts"),
        ("zsh", "/usr/local/share/zsh/site-functions/_ts"),
        ("fish", "/usr/local/share/fish/vendor_completions.d/ts.fish"),
    ):
        # One source: the checkout's tsd/cli_completion.py, through the installed ts.
        assert box.read_file(path) == answer(f"{shell}_source", {})[1], path
    # install.sh brought bash-completion, which loads ts's completion on the first Tab.
    assert box.exists("/usr/share/bash-completion/bash_completion")
    assert not box.exists("/etc/profile.d/tsd-completion.sh")
    if box.run(["sh", "-c", "command -v tmux"], check=False).returncode != 0:
        pytest.skip("tmux is not installed (tests/run installs it when run as root)")
    screen = tab_complete(box, "alice", "ts --full_c", "ts --full_cmd")
    assert "ts --full_cmd" in screen, screen
    assert "complete -o nosort -F _ts_completion ts" in screen, screen


def test_users_in_group_tsd_share_the_server_and_cannot_kill_each_others_jobs(
    box: Box, users: None
) -> None:
    run_session(box)


def test_ts_and_tsd_report_the_installed_version(box: Box, users: None) -> None:
    assert versions(box) == (VERSION, VERSION)


def test_ts_is_the_lean_launcher_and_loads_no_site_or_re_on_an_everyday_call(
    box: Box, users: None
) -> None:
    where = "import os, tsd; print(os.path.dirname(os.path.dirname(tsd.__file__)))"
    site = box.run(["/opt/tsd/bin/python", "-I", "-c", where]).stdout.strip()
    assert site.startswith("/opt/tsd/lib/python3.")
    check_lean_ts(box, "/opt/tsd/bin/ts", "/opt/tsd/bin/python", site)


def test_second_run_changes_nothing_and_keeps_running_and_queued_jobs(
    box: Box, users: None, request: pytest.FixtureRequest
) -> None:
    held = running_and_queued(box, "alice", 3)
    before, daemon = snapshot(box), main_pid(box)
    assert daemon != 0
    assert re.search(r"^[0-9a-f]{64}  /usr/local/lib/systemd/system/tsd.service$", before, re.M)
    assert "\n/usr/local/bin/ts l 777 root:root " in before
    t0 = time.monotonic()
    r = box.run("cd /src && packaging/install.sh", timeout=300)
    report(request, f"install.sh, second run (nothing to do): {time.monotonic() - t0:.1f}s")
    assert "nothing changed: left alone" in r.stdout
    assert "tsd install: installed " not in r.stdout
    assert "tsd install: linked " not in r.stdout
    assert snapshot(box) == before
    assert main_pid(box) == daemon
    check_jobs_survived(box, held)


def test_an_edited_config_is_kept_and_the_new_example_goes_to_dist(box: Box, users: None) -> None:
    edited = box.read_file("/etc/tsd/tsd.yaml").replace("\nslots: 4\n", "\nslots: 3\n")
    assert "\nslots: 3\n" in edited
    box.write_file("/etc/tsd/tsd.yaml", edited)
    r = box.run("cd /src && packaging/install.sh", timeout=300)
    assert "kept your edited /etc/tsd/tsd.yaml" in r.stdout
    assert box.read_file("/etc/tsd/tsd.yaml") == edited
    assert box.read_file("/etc/tsd/tsd.yaml.dist") == (REPO / "etc" / "tsd.yaml").read_text()


def test_install_from_a_newer_checkout_restarts_the_daemon_and_jobs_survive(
    box: Box, users: None, request: pytest.FixtureRequest
) -> None:
    new = f"{VERSION}+next1"
    box.run(
        "set -e; mkdir /root/next; cd /src; "
        "cp -r pyproject.toml tsd systemd etc packaging /root/next/; "
        "[ ! -f README.md ] || cp README.md /root/next/; "
        "rm -rf /root/next/packaging/out /root/next/tsd/__pycache__; "
        f"sed -i 's/^__version__ = .*/__version__ = \"{new}\"/' /root/next/tsd/__init__.py; "
        f"sed -i 's/^version = .*/version = \"{new}\"/' /root/next/pyproject.toml"
    )
    held = running_and_queued(box, "bob", 4)
    daemon = main_pid(box)
    t0 = time.monotonic()
    r = box.run("/root/next/packaging/install.sh", timeout=300)
    report(request, f"install.sh, upgrade with jobs running: {time.monotonic() - t0:.1f}s")
    assert "restarted tsd.service" in r.stdout
    assert main_pid(box) not in (0, daemon)
    assert versions(box) == (new, new)
    check_jobs_survived(box, held)


def test_uninstall_removes_the_program_and_keeps_config_and_state(box: Box, users: None) -> None:
    queued_before = set(jobs(box))
    box.run("cd /src && packaging/uninstall.sh", timeout=120)
    for gone in (
        "/opt/tsd",
        "/usr/local/bin/ts",
        "/usr/local/bin/tsd",
        "/usr/local/lib/systemd/system/tsd.service",
        "/usr/local/lib/systemd/system/tsd.socket",
        "/usr/local/share/man/man1/ts.1",
        "/usr/local/share/man/man8/tsd.8",
        "/usr/local/share/bash-completion/completions/ts",
        "/etc/profile.d/tsd-completion.sh",
        "/run/tsd/tsd.sock",
        "/etc/systemd/system/sockets.target.wants/tsd.socket",
    ):
        assert not box.exists(gone), f"{gone} is still there"
    assert box.systemctl("is-active", "tsd.service", check=False).stdout.strip() == "inactive"
    assert box.exists("/etc/tsd/tsd.yaml") and box.exists("/var/lib/tsd/state.db")
    assert queued_before  # the jobs of the earlier tests are in that state.db

    box.run("cd /src && packaging/uninstall.sh --purge", timeout=120)
    assert not box.exists("/etc/tsd") and not box.exists("/var/lib/tsd")


def test_air_gapped_without_systemd_install_sh_installs_and_ts_runs_in_personal_mode(
    box: Box, users: None
) -> None:
    # An nvidia-ml-py wheel fetched "elsewhere", then no index at all: pip's
    # config is ignored and its index is a closed port.
    box.run("python3 -m pip download -q --no-deps -d /root/wheels nvidia-ml-py", timeout=120)
    offline = {"PIP_CONFIG_FILE": "/dev/null", "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    # What install.sh checks to tell whether systemd runs, /run/systemd/system,
    # is hidden in this mount namespace (as in a container or chroot).
    r = box.run(
        "unshare --mount sh -c 'mount -t tmpfs none /run/systemd && "
        "cd /src && exec packaging/install.sh --no-apt --wheels /root/wheels'",
        env=offline,
        timeout=300,
    )
    assert "the system service could NOT be started" in r.stdout
    assert "installed nvidia-ml-py" in r.stdout
    box.run(["/opt/tsd/bin/python", "-c", "import pynvml"])
    assert box.systemctl("is-active", "tsd.socket", check=False).stdout.strip() == "inactive"
    assert not box.exists("/run/tsd/tsd.sock")
    # Still installed and enabled for the next boot.
    assert box.exists("/etc/systemd/system/sockets.target.wants/tsd.socket")
    # Where systemd does not run, alice's first ts call starts her own daemon.
    job = int(ts_without_systemd(box, "alice", "echo", "personal").stdout)
    assert ts_without_systemd(box, "alice", "-w", str(job)).returncode == 0
    assert ts_without_systemd(box, "alice", "-c", str(job)).stdout == "personal\n"
    ts_without_systemd(box, "alice", "-K")  # her personal daemon; the box goes anyway


def test_without_an_index_or_wheel_install_sh_warns_and_installs_without_gpus(
    box: Box, users: None
) -> None:
    box.run("cd /src && packaging/uninstall.sh --purge", timeout=120)
    offline = {"PIP_CONFIG_FILE": "/dev/null", "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    t0 = time.monotonic()
    r = box.run("cd /src && packaging/install.sh --no-apt", env=offline, timeout=300)
    assert time.monotonic() - t0 < 60  # no long waits on an unreachable index
    assert "WARNING: nvidia-ml-py could not be installed" in r.stdout
    assert box.run(["/opt/tsd/bin/python", "-c", "import pynvml"], check=False).returncode == 1
    assert "listening on /run/tsd/tsd.sock" in r.stdout
    job = submit(box, "alice", "echo", "no gpus")
    assert ts(box, "alice", "-w", str(job)).returncode == 0


def test_without_bash_completion_a_login_shell_gets_ts_completion_through_profile_d(
    box: Box, users: None
) -> None:
    box.run(["env", "DEBIAN_FRONTEND=noninteractive", "dpkg", "--purge", "bash-completion"],
            timeout=120)
    assert not box.exists("/usr/share/bash-completion/bash_completion")
    offline = {"PIP_CONFIG_FILE": "/dev/null", "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    box.run("cd /src && packaging/install.sh --no-apt", env=offline, timeout=300)
    assert box.exists("/etc/profile.d/tsd-completion.sh")
    # A new login shell (interactive) knows ts's completion at once.
    r = box.run(["su", "-", "alice", "-c", "bash -lic 'complete -p ts'"], check=False)
    assert "complete -o nosort -F _ts_completion ts" in r.stdout, (r.stdout, r.stderr)
    # A login shell of another kind (sh) is not disturbed by the file.
    assert box.run(["su", "-", "alice", "-s", "/bin/sh", "-c", "echo ok"]).stdout == "ok\n"
    box.run("cd /src && packaging/uninstall.sh", timeout=120)
    assert not box.exists("/etc/profile.d/tsd-completion.sh")

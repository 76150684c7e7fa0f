"""The .deb: built by packaging/build-deb.sh, installed with apt in a fresh box.

The box starts without tsd. Both packages (this version and a bumped one) are
built inside it, then the tests run in file order on that box: install with
apt, the multi-user session of test_install.py, an upgrade with jobs running
and queued, remove and purge, and an install where systemd is not running.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from box import Box
from test_install import (
    REPO,
    VERSION,
    check_jobs_survived,
    check_lean_ts,
    main_pid,
    report,
    run_session,
    running_and_queued,
    socket_owner_and_mode,
    ts_without_systemd,
    versions,
)

NEXT = f"{VERSION}+upgrade1"
OUT = "/root/debs"
DEB = f"{OUT}/tsd_{VERSION}_all.deb"
NEXT_DEB = f"{OUT}/tsd_{NEXT}_all.deb"


def apt(box: Box, *args: str) -> subprocess.CompletedProcess[str]:
    """apt-get ARGS in the box, never prompting."""
    return box.run(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", *args], timeout=240)


@pytest.fixture(scope="module")
def debs(box: Box, request: pytest.FixtureRequest) -> None:
    """Both packages built in the box (the checkout is read-only there)."""
    t0 = time.monotonic()
    box.run(["/src/packaging/build-deb.sh", "--out", OUT], timeout=240)
    report(request, f"build-deb.sh: {time.monotonic() - t0:.1f}s")
    box.run(["/src/packaging/build-deb.sh", "--version", NEXT, "--out", OUT], timeout=240)


@pytest.fixture(scope="module")
def installed(box: Box, debs: None, request: pytest.FixtureRequest) -> str:
    """The package installed with apt, as the README says; apt's output."""
    # The box's root is an overlay of this machine's: tsd must not be installed here.
    assert not box.exists("/usr/bin/ts"), "/usr/bin/ts exists on this machine already"
    assert box.run(["getent", "group", "tsd"], check=False).returncode == 2, "group tsd exists"
    # A Docker image's policy-rc.d (this machine's root may be one) forbids
    # maintainer scripts to start services; a real server has none.
    box.run(["rm", "-f", "/usr/sbin/policy-rc.d"])
    t0 = time.monotonic()
    r = apt(box, "install", "-y", DEB)
    report(request, f"apt-get install tsd_{VERSION}_all.deb: {time.monotonic() - t0:.1f}s")
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def users(box: Box, installed: str) -> None:
    """alice and bob, members of group tsd."""
    box.add_user("alice", ["tsd"])
    box.add_user("bob", ["tsd"])


def control(box: Box, deb: str, *fields: str) -> list[str]:
    """Fields of a package's control file."""
    return box.run(["dpkg-deb", "-f", deb, *fields]).stdout.splitlines()


def test_build_deb_names_the_package_by_version_and_declares_its_depends(
    box: Box, debs: None
) -> None:
    assert control(box, DEB, "Package", "Version", "Architecture")[:3] == [
        "Package: tsd",
        f"Version: {VERSION}",
        "Architecture: all",
    ]
    depends = {d.strip() for d in control(box, DEB, "Depends")[0].split(",")}
    assert depends == {
        "python3 (>= 3.11)",
        "python3-pydbus",
        "python3-gi",
        "python3-psutil",
        "python3-click",
        "python3-yaml",
        "dbus",
        "systemd",
    }
    # bash-completion loads the packaged completion in every interactive bash.
    assert control(box, DEB, "Recommends") == ["bash-completion"]
    files = set(box.run(["dpkg-deb", "-c", DEB]).stdout.split())
    for path in (
        "./usr/bin/ts",
        "./usr/bin/tsd",
        "./usr/lib/python3/dist-packages/tsd/daemon.py",
        "./usr/lib/python3/dist-packages/tsd/cli.py",
        "./usr/lib/tsd/vendor/pynvml.py",
        "./usr/lib/python3/dist-packages/tsd-vendor.pth",
        "./usr/lib/systemd/system/tsd.socket",
        "./usr/lib/systemd/system/tsd.service",
        "./usr/lib/systemd/system/tsd.slice",
        "./usr/lib/sysusers.d/tsd.conf",
        "./usr/lib/tmpfiles.d/tsd.conf",
        "./etc/tsd/tsd.yaml",
        "./usr/share/doc/tsd/copyright",
    ):
        assert path in files, f"{path} is not in the package"
    if (REPO / "tsd" / "manpage.py").exists():
        assert "./usr/share/man/man1/ts.1.gz" in files
        assert "./usr/share/man/man8/tsd.8.gz" in files
    conffiles = box.run(f"dpkg-deb --ctrl-tarfile {DEB} | tar -xO ./conffiles").stdout
    assert conffiles.split() == ["/etc/tsd/tsd.yaml"]
    # --version is written into the packaged code, so ts -V agrees with dpkg.
    init = box.run(
        f"dpkg-deb --fsys-tarfile {NEXT_DEB} | "
        "tar -xO ./usr/lib/python3/dist-packages/tsd/__init__.py"
    ).stdout
    assert f'__version__ = "{NEXT}"' in init


def test_apt_installs_the_deb_and_starts_the_socket_root_tsd_0660(box: Box, installed: str) -> None:
    assert socket_owner_and_mode(box) == "root:tsd 660 socket"
    assert box.run(["systemctl", "is-enabled", "tsd.socket", "tsd.service"]).stdout.split() == [
        "enabled",
        "enabled",
    ]
    assert box.read_file("/etc/tsd/tsd.yaml") == (REPO / "etc" / "tsd.yaml").read_text()
    # The vendored pynvml is on /usr/bin/python3's path, after its own site-packages.
    where = box.run(["python3", "-c", "import pynvml; print(pynvml.__file__)"]).stdout
    assert where.strip() == "/usr/lib/tsd/vendor/pynvml.py"


def test_the_packaged_completion_is_what_ts_prints_from_the_one_source(
    box: Box, installed: str
) -> None:
    from tsd.cli_completion import answer

    for shell, path in (
        ("bash", "/usr/share/bash-completion/completions/ts"),
        ("zsh", "/usr/share/zsh/vendor-completions/_ts"),
        ("fish", "/usr/share/fish/vendor_completions.d/ts.fish"),
    ):
        assert box.read_file(path) == answer(f"{shell}_source", {})[1], path


def test_users_in_group_tsd_share_the_packaged_server(box: Box, users: None) -> None:
    run_session(box)


def test_ts_and_tsd_report_the_package_version(box: Box, users: None) -> None:
    assert versions(box) == (VERSION, VERSION)
    assert box.run(["dpkg-query", "-W", "-f=${Version}", "tsd"]).stdout == VERSION


def test_ts_is_the_lean_launcher_and_loads_no_site_or_re_on_an_everyday_call(
    box: Box, users: None
) -> None:
    check_lean_ts(box, "/usr/bin/ts", "/usr/bin/python3", "/usr/lib/python3/dist-packages")


def test_upgrade_restarts_the_daemon_and_running_and_queued_jobs_survive(
    box: Box, users: None, request: pytest.FixtureRequest
) -> None:
    held = running_and_queued(box, "alice", 3)
    daemon = main_pid(box)
    t0 = time.monotonic()
    apt(box, "install", "-y", NEXT_DEB)
    report(request, f"apt-get upgrade to {NEXT} with jobs running: {time.monotonic() - t0:.1f}s")
    assert box.run(["dpkg-query", "-W", "-f=${Version}", "tsd"]).stdout == NEXT
    assert main_pid(box) not in (0, daemon)
    assert versions(box) == (NEXT, NEXT)
    check_jobs_survived(box, held)


def test_remove_keeps_config_and_state_and_purge_removes_them(box: Box, users: None) -> None:
    apt(box, "remove", "-y", "tsd")
    assert box.systemctl("is-active", "tsd.socket", check=False).stdout.strip() == "inactive"
    assert box.systemctl("is-active", "tsd.service", check=False).stdout.strip() == "inactive"
    for gone in ("/usr/bin/ts", "/run/tsd/tsd.sock", "/usr/lib/python3/dist-packages/tsd"):
        assert not box.exists(gone), f"{gone} is still there"
    # Nothing left behind by byte-compilation either.
    assert not box.exists("/usr/lib/tsd")
    assert box.exists("/etc/tsd/tsd.yaml") and box.exists("/var/lib/tsd/state.db")

    apt(box, "purge", "-y", "tsd")
    assert not box.exists("/etc/tsd") and not box.exists("/var/lib/tsd")
    assert not box.exists("/etc/systemd/system/sockets.target.wants/tsd.socket")


def test_without_systemd_the_package_installs_and_ts_runs_in_personal_mode(
    box: Box, users: None
) -> None:
    # As in a chroot or a container: /run/systemd/system is missing.
    r = box.run(
        f"unshare --mount sh -c 'mount -t tmpfs none /run/systemd && exec dpkg -i {DEB}'",
        timeout=240,
    )
    assert "systemd is not running here: tsd.socket was not started" in r.stdout
    assert box.systemctl("is-active", "tsd.socket", check=False).stdout.strip() == "inactive"
    assert not box.exists("/run/tsd/tsd.sock")
    assert re.search(r"^ii\s+tsd\s", box.run(["dpkg", "-l", "tsd"]).stdout, re.M)
    job = int(ts_without_systemd(box, "alice", "echo", "personal").stdout)
    assert ts_without_systemd(box, "alice", "-w", str(job)).returncode == 0
    assert ts_without_systemd(box, "alice", "-c", str(job)).stdout == "personal\n"
    ts_without_systemd(box, "alice", "-K")

"""Boot a real systemd as PID 1 in a throwaway container, for system tests.

The box follows DESIGN.md "Testing against a real systemd here":

* `unshare --pid --mount --uts --ipc --cgroup --fork` runs a boot script that
  builds a new root: a tmpfs holding an overlay with `lowerdir=/`, so the box
  sees the host's files (the venv, the checkout at its real path) but every
  write lands in the tmpfs and vanishes with the box;
* proc, `/sys` (read-only, so udev and friends stay off), `/dev` (rbind, so GPU
  nodes are there on a GPU machine), a fresh cgroup2 mount, tmpfs on `/run`,
  `/tmp` and `/dev/shm`, and the checkout read-only at `/src`;
* units that would touch the real kernel, hardware or the network are masked;
* `pivot_root`, then `exec /lib/systemd/systemd`.

Each box gets its own cgroup (a child of the caller's cgroup2 group) and a
cgroup namespace rooted there, so several boxes, and whatever else runs on the
host, never fight over the same cgroup tree. `Box.run` enters the box's
mount, pid, uts, ipc and cgroup namespaces with `nsenter`, so paths in
`/proc/<pid>/cgroup` read inside match what the box's systemd reports.

The host here mounts cgroup v1 controllers, so inside the box the cgroup2 tree
has no memory/cpu/pids controllers: systemd accepts MemoryMax= and friends but
cannot enforce them. `cpu.stat` exists in every cgroup2 group regardless.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fnmatch
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SYSTEMD = "/lib/systemd/systemd"

# Units masked in every box, as fnmatch patterns over unit file names. Each one
# would otherwise reach the shared kernel, the host's devices or its network
# (the box shares the host's network namespace), or just waste boot time.
MASKED_PATTERNS: tuple[str, ...] = (
    "systemd-sysctl.service",  # writes host sysctls
    "systemd-binfmt.service",  # registers binfmt handlers in the host kernel
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-modules-load.service",  # loads kernel modules
    "kmod-static-nodes.service",  # creates nodes in the host's /dev
    "systemd-tmpfiles-setup-dev.service",  # same
    "systemd-random-seed.service",  # feeds the host's entropy pool
    "systemd-pstore.service",  # empties the host's pstore
    "systemd-journald-audit.socket",  # subscribes to the host's audit stream
    "systemd-timesyncd.service",  # would set the host clock
    "getty@*.service",
    "serial-getty@*.service",
    "console-getty.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
    "postgresql*",  # would try to listen on the host's port 5432
    "apt-daily*",
    "dpkg-db-backup.*",
    "e2scrub*",
    "fstrim.*",
    "man-db.*",
    "logrotate.*",
    "cron.service",
    "ssh.service",
    "ssh.socket",
    "systemd-networkd*",
    "systemd-resolved.service",
    "NetworkManager*",
)

# The cgroup (under the box's root cgroup) that `Box.run` commands start in.
_EXEC_CGROUP = "tsdbox-exec"

_UNIT_DIRS = ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")

# A plain environment for commands in the box: nothing of the test runner's
# (VIRTUAL_ENV, PYTHONPATH, pytest's variables) leaks in unless asked for.
_BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}

_BOOT_SCRIPT = r"""#!/bin/sh
# Runs as PID 1 of the box's new pid, mount and cgroup namespaces.
set -eu
B={base}
R=$B/root
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tsdbox $B
mkdir -p $B/upper $B/work $R
mount -t overlay overlay -o lowerdir=/,upperdir=$B/upper,workdir=$B/work $R
mount -t proc proc $R/proc
mount --rbind /sys $R/sys
mount --make-rslave $R/sys
# Read-only /sys keeps udev and its coldplug off the host's devices.
mount -o remount,bind,ro $R/sys
umount -l $R/sys/fs/cgroup 2>/dev/null || true
# In the new cgroup namespace this shows only the box's own subtree.
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
mount --rbind /dev $R/dev
mount --make-rslave $R/dev
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mkdir -p $R/src
mount --bind {src} $R/src
mount -o remount,bind,ro $R/src
# A checkout under a path the box mounts afresh (CI may clone into /tmp) stays
# visible at its own path too, read-only, so its venv's absolute paths work.
case {src} in
    /tmp/*|/run/*|/dev/shm/*)
        mkdir -p "$R"{src}
        mount --bind {src} "$R"{src}
        mount -o remount,bind,ro "$R"{src};;
esac
# A tsd installed on this machine (packaging/install.sh, the README's first
# command) is no part of a box: each box starts as a machine without tsd, so
# the project's own uninstall takes it out of the box's overlay (not the host).
if [ -e $R/opt/tsd ] || [ -e $R/usr/local/lib/systemd/system/tsd.service ] || [ -e $R/etc/tsd ]
then
    chroot $R /bin/bash /src/packaging/uninstall.sh --purge >/dev/null
    # uninstall keeps group tsd (files may belong to it); a machine without tsd has none.
    if chroot $R getent group tsd >/dev/null; then chroot $R groupdel tsd; fi
fi
mkdir -p $R/etc/systemd/system
for u in {masked}; do
    rm -f "$R/etc/systemd/system/$u"
    ln -s /dev/null "$R/etc/systemd/system/$u"
done
echo {hostname} > $R/etc/hostname
mkdir -p $R/.oldroot
cd $R
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
mount -o remount,bind,ro /proc/sys 2>/dev/null \
    || {{ mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys; }}
hostname {hostname}
export container=tsdtest
exec {systemd} --unit=multi-user.target --show-status=false
"""


class BoxError(RuntimeError):
    """The box could not boot, or a command inside it failed."""


def _masked_units() -> list[str]:
    """Unit names to mask: those installed here that match MASKED_PATTERNS, plus literals."""
    names: set[str] = set()
    for d in _UNIT_DIRS:
        for _root, _dirs, files in os.walk(d):
            names.update(files)  # includes the symlinks in *.wants/
    masked = {n for n in names if any(fnmatch.fnmatch(n, p) for p in MASKED_PATTERNS)}
    # Literal names are masked even when not installed: harmless, and future-proof.
    masked.update(p for p in MASKED_PATTERNS if not any(c in p for c in "*?["))
    # An enabled instance is a symlink to the template: mask it by its own name too.
    masked.add("getty@tty1.service")
    return sorted(masked)


def _cgroup2_mount() -> Path | None:
    """Where this process sees the cgroup2 hierarchy (root of it), or None."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype = right.split()[0] if right else ""
            if fstype == "cgroup2":
                fields = left.split()
                if fields[3] == "/":
                    return Path(fields[4])
    return None


def _own_cgroup() -> str:
    """This process's cgroup2 path."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return "/"


def _rmdir_tree(path: Path) -> None:
    """Remove an (empty of processes) cgroup subtree, deepest first."""
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir():
            _rmdir_tree(child)
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            # Processes take a moment to leave after the box's PID 1 dies.
            time.sleep(0.1)


_can_boot_cache: tuple[bool, str] | None = None


@dataclass
class Box:
    """A running systemd container. Make one with `Box.start(src)`."""

    src: Path
    tmp: Path
    cgroup: Path
    proc: subprocess.Popen[bytes]
    pid: int  # the box's PID 1 (systemd) as seen from the host
    repo: Path  # the checkout's host path; visible at the same path in the box
    python: str  # interpreter for the project inside the box (repo's venv if any)
    boot_seconds: float = 0.0
    _stopped: bool = field(default=False, repr=False)
    _homes: dict[str, str] = field(default_factory=dict, repr=False)

    # ---- lifecycle -------------------------------------------------------------

    @staticmethod
    def can_boot() -> tuple[bool, str]:
        """Whether boxes can boot here; the reason when not (the caller skips with it)."""
        global _can_boot_cache
        if _can_boot_cache is None:
            _can_boot_cache = _probe()
        return _can_boot_cache

    @classmethod
    def start(cls, src: Path, timeout: float = 60.0) -> Box:
        """Boot a box with checkout `src` mounted read-only at /src; return once it is up."""
        ok, why = cls.can_boot()
        if not ok:
            raise BoxError(f"cannot boot a box here: {why}")
        src = src.resolve()
        t0 = time.monotonic()
        name = "tsdbox-" + uuid.uuid4().hex[:10]
        tmp = Path(tempfile.mkdtemp(prefix=name + "."))
        base = tmp / "mnt"
        base.mkdir()
        cg_mount = _cgroup2_mount()
        assert cg_mount is not None  # checked by can_boot
        cgroup = cg_mount / _own_cgroup().lstrip("/") / name
        cgroup.mkdir()
        # Commands entered with nsenter start here, inside the box's cgroup
        # namespace: systemd in the box may only move processes that are.
        (cgroup / _EXEC_CGROUP).mkdir()
        script = tmp / "boot.sh"
        script.write_text(
            _BOOT_SCRIPT.format(
                base=shlex.quote(str(base)),
                src=shlex.quote(str(src)),
                masked=" ".join(shlex.quote(u) for u in _masked_units()),
                hostname=name,
                systemd=SYSTEMD,
            )
        )
        script.chmod(0o700)
        log = open(tmp / "boot.log", "wb")  # noqa: SIM115 - lives as long as the box
        # The shell joins the box's cgroup first, so the cgroup namespace that
        # unshare creates is rooted there.
        launcher = (
            f"echo $$ > {shlex.quote(str(cgroup / 'cgroup.procs'))} && exec unshare "
            f"--pid --mount --uts --ipc --cgroup --fork --kill-child {shlex.quote(str(script))}"
        )
        proc = subprocess.Popen(
            ["/bin/sh", "-c", launcher],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(_BASE_ENV),
            preexec_fn=_die_with_parent,
        )
        log.close()
        repo = src
        venv_python = repo / ".venv" / "bin" / "python"
        python = str(venv_python) if venv_python.exists() else "/usr/bin/python3"
        box = cls(src=src, tmp=tmp, cgroup=cgroup, proc=proc, pid=0, repo=repo, python=python)
        atexit.register(box.stop)
        try:
            box._wait_booted(t0 + timeout)
        except BaseException:
            box.stop()
            raise
        box.boot_seconds = time.monotonic() - t0
        return box

    def _log_tail(self) -> str:
        try:
            return (self.tmp / "boot.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def _wait_booted(self, deadline: float) -> None:
        # 1. the unshare child execs systemd
        while True:
            if self.proc.poll() is not None:
                raise BoxError(
                    f"box died while booting (rc {self.proc.returncode}):\n" + self._log_tail()
                )
            pid = self._find_pid1()
            if pid is not None:
                self.pid = pid
                break
            if time.monotonic() > deadline:
                raise BoxError("box did not exec systemd in time:\n" + self._log_tail())
            time.sleep(0.02)
        # 2. D-Bus is up (systemctl needs it for --wait)
        while not os.path.exists(f"/proc/{self.pid}/root/run/dbus/system_bus_socket"):
            if self.proc.poll() is not None:
                raise BoxError("box died while booting:\n" + self._log_tail())
            if time.monotonic() > deadline:
                raise BoxError("box's D-Bus socket never appeared:\n" + self._log_tail())
            time.sleep(0.02)
        # 3. the boot transaction is done
        left = max(1.0, deadline - time.monotonic())
        r = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=left)
        state = r.stdout.strip()
        if state == "degraded":
            failed = self.run(
                ["systemctl", "list-units", "--failed", "--no-legend", "--plain"], check=False
            ).stdout
            print(f"box {self.pid}: degraded; failed units:\n{failed}")
        elif state != "running":
            raise BoxError(f"box state is {state!r} after boot:\n{r.stderr}\n{self._log_tail()}")

    def _find_pid1(self) -> int | None:
        """The unshare child once it has become systemd."""
        unshare_pid = self.proc.pid
        try:
            children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
        except OSError:
            return None
        for c in children:
            try:
                exe = os.readlink(f"/proc/{c}/exe")
            except OSError:
                continue
            if exe.endswith("/systemd"):
                return int(c)
        return None

    def stop(self) -> None:
        """Kill the box (its PID 1, so the kernel ends everything in it) and clean up."""
        if self._stopped:
            return
        self._stopped = True
        if self.pid:
            # SIGKILL from outside is the one signal a namespace's PID 1 cannot
            # ignore; the kernel then kills everything else in the namespace.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        try:
            # unshare reaps the box's PID 1 and exits with it.
            self.proc.wait(timeout=20 if self.pid else 0.01)
        except subprocess.TimeoutExpired:
            # Still in the boot script (no systemd yet): unshare --kill-child
            # passes a SIGKILL on to its child.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        _rmdir_tree(self.cgroup)
        shutil.rmtree(self.tmp, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def __enter__(self) -> Box:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- running things inside -------------------------------------------------

    def run(
        self,
        cmd: Sequence[str] | str,
        user: str | None = None,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` in the box (a string goes through `sh -c`), as root or as `user`.

        As a user the command gets a login-like environment (HOME, USER, LOGNAME,
        SHELL, cwd = home unless `cwd`) through `runuser`, without a PAM login
        session. `env` adds to or overrides the environment.
        """
        if self._stopped:
            raise BoxError("the box is stopped")
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full_env = dict(_BASE_ENV)
        prefix: list[str] = []
        if user is None:
            full_env.update(HOME="/root", USER="root", LOGNAME="root", SHELL="/bin/sh")
        else:
            home = self._home(user)
            full_env.update(HOME=home, USER=user, LOGNAME=user, SHELL="/bin/bash")
            full_env.pop("SYSTEMD_PAGER", None)
            cwd = cwd or home
            prefix = ["runuser", "-u", user, "--"]
        if env:
            full_env.update(env)
        if cwd:
            argv = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', cwd, *argv]
        # env -i inside, so nsenter and runuser do not add or keep anything else.
        inner = ["env", "-i", *(f"{k}={v}" for k, v in full_env.items()), *argv]
        procs = str(self.cgroup / _EXEC_CGROUP / "cgroup.procs")
        full = [
            "/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs,
            "nsenter", "-t", str(self.pid), "-m", "-p", "-u", "-i", "-C", "--",
            *prefix, *inner,
        ]  # fmt: skip
        try:
            r = subprocess.run(
                full,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=dict(_BASE_ENV),
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise BoxError(
                f"in box: {_show(cmd)} timed out after {timeout}s: "
                f"stdout={e.stdout!r} stderr={e.stderr!r}"
            ) from None
        if check and r.returncode != 0:
            raise BoxError(
                f"in box{' as ' + user if user else ''}: {_show(cmd)} exited {r.returncode}\n"
                f"--- stdout:\n{r.stdout}--- stderr:\n{r.stderr}"
            )
        return r

    def _home(self, user: str) -> str:
        if user not in self._homes:
            r = self.run(["getent", "passwd", user], check=False)
            if r.returncode != 0:
                raise BoxError(f"no user {user!r} in the box")
            self._homes[user] = r.stdout.strip().split(":")[5]
        return self._homes[user]

    def write_file(self, path: str, text: str, mode: int = 0o644, owner: str | None = None) -> None:
        """Create or replace `path` in the box (parents made as needed)."""
        q = shlex.quote(path)
        script = f'mkdir -p "$(dirname {q})" && cat > {q} && chmod {mode:o} {q}'
        if owner:
            script += f" && chown {shlex.quote(owner)}: {q}"
        self.run(script, input=text)

    def read_file(self, path: str) -> str:
        """The text of `path` in the box."""
        return self.run(["cat", "--", path]).stdout

    def exists(self, path: str) -> bool:
        """Whether `path` exists in the box."""
        return self.run(["test", "-e", path], check=False).returncode == 0

    def add_user(self, name: str, groups: Sequence[str] = ()) -> int:
        """Create a user with a home and a primary group of its own name; return its uid.

        Missing supplementary groups are created first (as ordinary groups).
        """
        for g in groups:
            self.run(["groupadd", "-f", g])
        cmd = ["useradd", "-m", "-U", "-s", "/bin/bash"]
        if groups:
            cmd += ["-G", ",".join(groups)]
        self.run([*cmd, name])
        return self.uid(name)

    def uid(self, name: str) -> int:
        """The uid of `name` in the box."""
        return int(self.run(["id", "-u", name]).stdout.strip())

    def gid(self, group: str) -> int:
        """The gid of `group` in the box."""
        return int(self.run(["getent", "group", group]).stdout.split(":")[2])

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`systemctl ARGS` in the box."""
        return self.run(["systemctl", "--no-pager", *args], check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show -p ...` of a unit, as a dict."""
        args = ["show", unit]
        for p in props:
            args += ["-p", p]
        out = self.systemctl(*args).stdout
        result: dict[str, str] = {}
        for line in out.splitlines():
            k, _, v = line.partition("=")
            if k in result:
                result[k] += "\n" + v  # repeated keys, e.g. DeviceAllow=
            else:
                result[k] = v
        return result


def _die_with_parent() -> None:
    """In the launcher, before exec: SIGKILL it if the test runner dies.

    atexit covers a normal exit; this covers a killed pytest. unshare passes the
    signal on to the box's PID 1 (--kill-child), which takes the box down.
    """
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def _show(cmd: Sequence[str] | str) -> str:
    return cmd if isinstance(cmd, str) else shlex.join(cmd)


def _probe() -> tuple[bool, str]:
    """Check, without booting anything, that every step of a boot can work here."""
    if os.geteuid() != 0:
        return False, "system tests need root (they boot systemd in namespaces)"
    for tool in ("unshare", "nsenter", "runuser", "useradd", "mount"):
        if shutil.which(tool) is None:
            return False, f"{tool} is not installed"
    if not os.access(SYSTEMD, os.X_OK):
        return False, f"{SYSTEMD} is missing"
    if _cgroup2_mount() is None:
        return False, "no cgroup2 hierarchy is mounted on the host"
    tmp = tempfile.mkdtemp(prefix="tsdbox-probe.")
    try:
        test = (
            "set -e; mount --make-rprivate /; "
            f"mount -t tmpfs tmpfs {tmp}; mkdir {tmp}/u {tmp}/w {tmp}/r; "
            f"mount -t overlay overlay -o lowerdir=/,upperdir={tmp}/u,workdir={tmp}/w {tmp}/r; "
            f"mkdir -p {tmp}/cg; mount -t cgroup2 cgroup2 {tmp}/cg"
        )
        r = subprocess.run(
            ["unshare", "--mount", "--pid", "--cgroup", "--fork", "sh", "-c", test],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode != 0:
            return False, f"cannot mount the box's overlay/cgroup2: {r.stderr.strip()}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True, ""

"""Shared helpers for the benchmarks: a private personal daemon and timing."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import spoolers
from spoolers import cgroup_usage_s

BIN = Path(sys.executable).parent
TS = str(BIN / "ts")


class PersonalDaemon:
    """A personal tsd in a temp dir, started by the first `ts` call, stopped by pid."""

    def __init__(self, ts: str = TS, outputs: str | None = None, **extra_env: str) -> None:
        self.ts_path = ts
        self.root = Path(tempfile.mkdtemp(prefix="tsd-bench-", dir="/tmp"))
        # TMPDIR, where the jobs' output files go: in the root, or in a directory of
        # its own under `outputs` (another file system), removed with the root.
        self.tmp = self.root / "tmp"
        if outputs is None:
            self.tmp.mkdir()
        else:
            self.tmp = Path(tempfile.mkdtemp(prefix="tsd-bench-out-", dir=outputs))
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("TS_", "XDG_"))
        }
        self.env.update(
            TMPDIR=str(self.tmp),
            XDG_STATE_HOME=str(self.root / "state"),
            TS_SOCKET=str(self.root / "run" / "tsd.sock"),
            **extra_env,
        )

    @property
    def state_dir(self) -> Path:
        return self.root / "state" / "tsd"

    def ts(self, *args: str) -> str:
        """Run `ts ARGS` against this daemon; its stdout."""
        return subprocess.run(
            [self.ts_path, *args], env=self.env, check=True, capture_output=True, text=True
        ).stdout

    def pid(self) -> int:
        """The daemon's pid (from its pid file)."""
        return int((self.state_dir / "tsd.pid").read_text())

    def stop(self) -> None:
        """Stop the daemon (-T, -K, then SIGKILL by pid) and remove its directory."""
        try:
            pid = self.pid()
        except OSError:
            pid = None
        if pid is not None:
            subprocess.run([self.ts_path, "-T"], env=self.env, capture_output=True)
            subprocess.run([self.ts_path, "-K"], env=self.env, capture_output=True)
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def slots_held(d: PersonalDaemon, slots: int) -> contextlib.AbstractContextManager[None]:
    """spoolers.slots_held on this daemon: its slots held by gates for the block."""
    return spoolers.slots_held(slots, d.tmp, lambda k: d.ts("-S", str(k)), d.ts)


def time_command(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    """Wall seconds of `runs` runs of a command."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    return out


def med_ms(xs: list[float]) -> float:
    """Median of seconds, in ms."""
    return statistics.median(xs) * 1000


class Cgroup:
    """A cgroup2 group of the bench's own, to count the CPU of one spooler's processes.

    Whatever the bench starts while `inside()` (a daemon, its supervisors and jobs,
    task-spooler's server and its background clients) lands in the group and stays
    there with all its descendants; `usage_s()` is their CPU, exited ones included.
    Needs root and a cgroup2 mount; `make` returns None otherwise.
    """

    def __init__(self, path: Path, home: Path) -> None:
        self.path, self.home = path, home

    @classmethod
    def make(cls, name: str) -> Cgroup | None:
        """A new group named `name` under this process's own cgroup2 group, or None."""
        mount = cgroup2_mount()
        if mount is None or os.geteuid() != 0:
            return None
        own = ""
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                own = line[3:].strip().lstrip("/")
        home = mount / own
        path = home / f"{name}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            path.mkdir()
            (path / "cpu.stat").read_text()
        except OSError:
            return None
        return cls(path, home)

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Move this process into the group for the block (its children stay there)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (self.home / "cgroup.procs").write_text(str(os.getpid()))

    def usage_s(self) -> float:
        """CPU seconds of everything that ever ran in the group."""
        return cgroup_usage_s(self.path)

    def pids(self) -> list[int]:
        """The processes in the group now."""
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def remove(self) -> None:
        """SIGKILL what is left in the group (all started by this bench), then remove it."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            self.path.rmdir()


def cgroup2_mount() -> Path | None:
    """Where the cgroup2 hierarchy is mounted (its root), or None."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"] and left.split()[3] == "/":
            return Path(left.split()[4])
    return None

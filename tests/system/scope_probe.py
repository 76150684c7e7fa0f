"""Drive tsd.scope inside a box, the way the job launcher will: run with the box's python.

scope_probe.py start JOB_ID USER [--memory-max B] [--cpu-quota P] [--tasks-max N]
               [--device PATH ...] [--close-devices] -- COMMAND...
    forks a child that waits on a pipe, puts it in the job's scope, lets it
    drop to USER and exec COMMAND through sh -c; prints JSON {unit, pid, cgroup}
scope_probe.py kill UNIT SIGNUM      prints JSON {ok}
scope_probe.py stop UNIT
scope_probe.py list                  prints JSON {job_id: unit}
scope_probe.py usage UNIT            prints JSON {cpu_seconds, memory_peak}
scope_probe.py cgroup UNIT           prints JSON {cgroup}
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tsd.model import JobLimits
from tsd.scope import ScopeError, SystemdScopes, _message

_UNIT_RE = re.compile(r"^tsd-job-(\d+)\.scope$")
_UINT64_MAX = 2**64 - 1  # systemd's "not known" for t-typed counters
# Scopes being torn down still hold processes; they still count as the job's.
_LIVE_STATES = ["active", "activating", "deactivating"]


class ProbeScopes(SystemdScopes):
    """SystemdScopes plus what only the tests ask of systemd: listing and measuring scopes."""

    def list_jobs(self) -> dict[int, str]:
        """Job scopes that still hold processes: job id -> unit name."""
        with self._lock:
            mgr = self._mgr()
            try:
                units = mgr.ListUnitsByPatterns(_LIVE_STATES, ["tsd-job-*.scope"])
            except Exception as e:
                raise ScopeError(f"cannot list units: {_message(e)}") from e
        found: dict[int, str] = {}
        for row in units:
            m = _UNIT_RE.match(str(row[0]))
            if m:
                found[int(m.group(1))] = str(row[0])
        return found

    def usage(self, unit: str) -> dict[str, Any]:
        """CPU time and peak memory of `unit` so far (both None when it is gone)."""
        with self._lock:
            cpu = self._property(unit, "Scope", "CPUUsageNSec")
            peak = self._property(unit, "Scope", "MemoryPeak")  # systemd >= 254 only
            cgroup = self._property(unit, "Scope", "ControlGroup")
        cpu_seconds = cpu / 1e9 if isinstance(cpu, int) and cpu != _UINT64_MAX else None
        memory_peak = peak if isinstance(peak, int) and peak != _UINT64_MAX else None
        if memory_peak is None and isinstance(cgroup, str) and cgroup:
            memory_peak = _read_memory_peak(cgroup)
        return {"cpu_seconds": cpu_seconds, "memory_peak": memory_peak}

    def cgroup_path(self, unit: str) -> str | None:
        """The scope's cgroup as systemd names it (e.g. /tsd.slice/...); None when gone."""
        with self._lock:
            cg = self._property(unit, "Scope", "ControlGroup")
        return cg if isinstance(cg, str) and cg else None


def _cgroup2_root() -> Path | None:
    """Where the cgroup2 hierarchy is mounted here (unified or hybrid layout)."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if right.split()[:1] == ["cgroup2"] and len(fields) > 4 and fields[3] == "/":
                    return Path(fields[4])
    except OSError:
        return None
    return None


def _read_memory_peak(cgroup: str) -> int | None:
    """memory.peak of a cgroup (kernel >= 5.19, memory controller on), else None."""
    root = _cgroup2_root()
    if root is None:
        return None
    try:
        return int((root / cgroup.lstrip("/") / "memory.peak").read_text().strip())
    except (OSError, ValueError):
        return None


def start(args: argparse.Namespace) -> None:
    pw = pwd.getpwnam(args.user)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # wait until we are in the scope, as the launcher's child does
        os.initgroups(pw.pw_name, pw.pw_gid)
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
        os.chdir(pw.pw_dir)
        # Detach from the probe's output so the caller's read of it ends.
        fd = os.open(os.devnull, os.O_RDWR)
        for i in (0, 1, 2):
            os.dup2(fd, i)
        env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "PATH": "/usr/bin:/bin"}
        os.execve("/bin/sh", ["sh", "-c", " ".join(args.command)], env)
    os.close(r)
    limits = JobLimits(
        memory_max=args.memory_max, cpu_quota_percent=args.cpu_quota, tasks_max=args.tasks_max
    )
    devices = args.device if args.device else ([] if args.close_devices else None)
    scopes = ProbeScopes()
    try:
        unit = scopes.start(
            args.job_id, pw.pw_uid, [pid], limits, devices=devices, description=args.desc
        )
    except ScopeError as e:
        os.kill(pid, 9)
        print(json.dumps({"error": str(e)}))
        sys.exit(3)
    os.write(w, b"x")
    os.close(w)
    print(json.dumps({"unit": unit, "pid": pid, "cgroup": scopes.cgroup_path(unit)}))


def start_pid(args: argparse.Namespace) -> None:
    """start() on a pid the caller names (e.g. one that does not exist)."""
    try:
        unit = ProbeScopes().start(args.job_id, args.uid, [args.pid], JobLimits())
    except ScopeError as e:
        print(json.dumps({"error": str(e)}))
        sys.exit(3)
    print(json.dumps({"unit": unit}))


def bench(args: argparse.Namespace) -> None:
    """Time start() + kill() for N children that exit when killed; print the timings."""
    scopes = ProbeScopes()
    starts: list[float] = []
    for i in range(args.n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.read(r, 1)
            os.read(r, 1)  # blocks until killed
            os._exit(0)
        t = time.perf_counter()
        unit = scopes.start(args.first + i, 0, [pid], JobLimits())
        starts.append(time.perf_counter() - t)
        scopes.kill(unit, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(w)
        os.close(r)
    starts.sort()
    print(json.dumps({"n": args.n, "median_s": starts[len(starts) // 2], "max_s": starts[-1]}))


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("job_id", type=int)
    s.add_argument("user")
    s.add_argument("--memory-max", type=int)
    s.add_argument("--cpu-quota", type=int)
    s.add_argument("--tasks-max", type=int)
    s.add_argument("--device", action="append")
    s.add_argument("--close-devices", action="store_true", help="devices=[] unless --device")
    s.add_argument("--desc", default="")
    s.add_argument("command", nargs="+")
    k = sub.add_parser("kill")
    k.add_argument("unit")
    k.add_argument("sig", type=int)
    for name in ("stop", "usage", "cgroup"):
        sub.add_parser(name).add_argument("unit")
    sub.add_parser("list")
    sp = sub.add_parser("start-pid")
    sp.add_argument("job_id", type=int)
    sp.add_argument("uid", type=int)
    sp.add_argument("pid", type=int)
    b = sub.add_parser("bench")
    b.add_argument("first", type=int)
    b.add_argument("n", type=int)
    args = p.parse_args()
    scopes = ProbeScopes()
    if args.cmd == "start":
        start(args)
    elif args.cmd == "start-pid":
        start_pid(args)
    elif args.cmd == "bench":
        bench(args)
    elif args.cmd == "kill":
        print(json.dumps({"ok": scopes.kill(args.unit, args.sig)}))
    elif args.cmd == "stop":
        scopes.stop(args.unit)
        print(json.dumps({"ok": True}))
    elif args.cmd == "list":
        print(json.dumps({str(k): v for k, v in scopes.list_jobs().items()}))
    elif args.cmd == "usage":
        print(json.dumps(scopes.usage(args.unit)))
    elif args.cmd == "cgroup":
        print(json.dumps({"cgroup": scopes.cgroup_path(args.unit)}))


if __name__ == "__main__":
    main()

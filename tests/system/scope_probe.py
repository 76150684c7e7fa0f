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
import signal
import sys
import time

from tsd.model import JobLimits
from tsd.scope import ScopeError, SystemdScopes


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
    scopes = SystemdScopes()
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
        unit = SystemdScopes().start(args.job_id, args.uid, [args.pid], JobLimits())
    except ScopeError as e:
        print(json.dumps({"error": str(e)}))
        sys.exit(3)
    print(json.dumps({"unit": unit}))


def bench(args: argparse.Namespace) -> None:
    """Time start() + kill() for N children that exit when killed; print the timings."""
    scopes = SystemdScopes()
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
    scopes = SystemdScopes()
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
        u = scopes.usage(args.unit)
        print(json.dumps({"cpu_seconds": u.cpu_seconds, "memory_peak": u.memory_peak}))
    elif args.cmd == "cgroup":
        print(json.dumps({"cgroup": scopes.cgroup_path(args.unit)}))


if __name__ == "__main__":
    main()

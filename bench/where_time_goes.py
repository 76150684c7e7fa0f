"""Where the time goes: the personal daemon under cProfile for submit, dispatch and a big
listing, and the client's imports (`python -X importtime`) for `ts -l` and `ts true`.

Daemon side: a personal tsd runs under cProfile (every thread: the event loop and the
I/O pool; the forked supervisors are not profiled). On SIGUSR2 it writes a snapshot
of its counters; a workload's profile is the difference between the snapshots
around it:

  submit    N `ts true` submits into a daemon with 0 slots (nothing runs)
  dispatch  then `ts -S 2` (--slots): those N jobs run, until `ts -w` on the last returns
  listing   a daemon started on BIG seeded jobs (big_queue.py's seeding), one `ts -l`;
            its start on that queue is printed too

For each: profiled wall time, time idle in the event loop or in a waiting thread,
busy time per job, the share of busy time in SQLite (all statements, and the
BEGIN/COMMIT of Store._tx), fsync, fork/spawn, JSON, logging, dataclasses and
socket I/O (inclusive time entered from outside that group), then the top
functions by own time and tsd's top functions by cumulative time. cProfile slows
Python code down (often ~2x) and not system calls: read shares, not absolute ms.

Client side: `python -X importtime` of `ts -l` and `ts true`: the time of all
imports against the command's wall time, by top-level package, and the slowest
modules. The client runs from a throwaway regular install unless --editable.

Usage: .venv/bin/python bench/where_time_goes.py [--quick] [--jobs N (500)] [--big N (100000)]
           [--top K (15)] [--slots S (2)] [--only submit,dispatch,listing,client] [--editable]
"""

from __future__ import annotations

import argparse
import contextlib
import marshal
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from big_queue import seed
from client_start import installed_venv
from common import TS, PersonalDaemon
from spoolers import Spooler, submit_many

# Runs as the daemon: cProfile in every thread, a snapshot of all counters on SIGUSR2.
WRAPPER = r"""
import cProfile, marshal, os, signal, sys, threading
out, sock = sys.argv[1], sys.argv[2]
profiles = [cProfile.Profile()]
def _thread_start(frame, event, arg):
    sys.setprofile(None)
    p = cProfile.Profile()
    profiles.append(p)
    p.enable()
threading.setprofile(_thread_start)
# A forked supervisor runs a copy of this process: it profiles nothing, writes nothing.
os.register_at_fork(after_in_child=lambda: (sys.setprofile(None), threading.setprofile(None)))
me, taken = os.getpid(), [0]
def snapshot(*_):
    if os.getpid() != me:
        return
    stats = []
    for p in list(profiles):
        p.snapshot_stats()
        stats.append(p.stats)
    path = f"{out}.{taken[0]}"
    taken[0] += 1
    with open(path + ".tmp", "wb") as f:
        marshal.dump(stats, f)
    os.rename(path + ".tmp", path)
signal.signal(signal.SIGUSR2, snapshot)
profiles[0].enable()
try:
    from tsd.daemon_entry import main  # as ts starts a daemon
    main(["--user", "--socket", sock])
except SystemExit:
    pass
"""

Func = tuple[str, int, str]
# cProfile's counters per function: calls, primitive calls, own s, cumulative s, callers.
Entry = tuple[int, int, float, float, dict[Func, tuple[int, int, float, float]]]
Stats = dict[Func, Entry]

IDLE = re.compile(r"method 'poll' of 'select\.|method 'select' of|method 'acquire' of "
                  r"'_thread\.lock|built-in method time\.sleep|method 'control' of 'select\.")


def _is_sqlite(f: Func) -> bool:
    return f[0] == "~" and "sqlite3." in f[2]


def _in_file(part: str) -> Callable[[Func], bool]:
    return lambda f: part in f[0] or (f[0] == "~" and f"_{part.strip('/')}" in f[2])


GROUPS: tuple[tuple[str, Callable[[Func], bool]], ...] = (
    ("SQLite, all statements (their fsyncs included)", _is_sqlite),
    ("fsync / fdatasync (SQLite's own: in its statements)",
     lambda f: f[0] == "~" and ("fsync" in f[2] or "fdatasync" in f[2])),
    ("fork / spawn / exec (in the daemon)", lambda f: f[0] == "~" and any(
        k in f[2] for k in ("posix.fork", "posix_spawn", "fork_exec", "posix.execv"))),
    ("JSON (json module)", _in_file("/json/")),
    ("logging", _in_file("/logging/")),
    ("dataclasses (replace, asdict...)", lambda f: f[0].endswith("/dataclasses.py")),
    ("socket send/recv", lambda f: f[0] == "~" and "socket" in f[2] and any(
        k in f[2] for k in ("send", "recv"))),
)


def load(path: Path) -> Stats:
    """One snapshot file: every thread's counters, merged."""
    merged: Stats = {}
    with open(path, "rb") as f:
        per_thread: list[Stats] = marshal.load(f)
    for stats in per_thread:
        for func, (cc, nc, tt, ct, callers) in stats.items():
            old = merged.get(func)
            if old is None:
                merged[func] = (cc, nc, tt, ct, dict(callers))
                continue
            merged_callers = dict(old[4])
            for c, v in callers.items():
                w = merged_callers.get(c, (0, 0, 0.0, 0.0))
                merged_callers[c] = (w[0] + v[0], w[1] + v[1], w[2] + v[2], w[3] + v[3])
            merged[func] = (old[0] + cc, old[1] + nc, old[2] + tt, old[3] + ct, merged_callers)
    return merged


def _is_profiler(f: Func) -> bool:
    """The snapshot's own work (the signal handler, cProfile), not the daemon's."""
    return f[0].endswith("cProfile.py") or f[0] == "<string>" or "_lsprof" in f[2]


def diff(after: Stats, before: Stats) -> Stats:
    """The counters of what happened between two snapshots, less the snapshots' own."""
    out: Stats = {}
    for func, (cc, nc, tt, ct, callers) in after.items():
        if _is_profiler(func):
            continue
        b = before.get(func)
        if b is None:
            out[func] = (cc, nc, tt, ct, callers)
            continue
        if cc == b[0] and nc == b[1]:
            continue
        dc = {}
        for c, v in callers.items():
            w = b[4].get(c, (0, 0, 0.0, 0.0))
            if v[0] != w[0]:
                dc[c] = (v[0] - w[0], v[1] - w[1], v[2] - w[2], v[3] - w[3])
        out[func] = (cc - b[0], nc - b[1], tt - b[2], ct - b[3], dc)
    return out


def entered(stats: Stats, member: Callable[[Func], bool]) -> float:
    """Inclusive seconds spent in a group of functions, entered from outside the group."""
    total = 0.0
    for func, entry in stats.items():
        if member(func):
            total += sum(v[3] for c, v in entry[4].items() if not member(c))
    return total


def name(f: Func) -> str:
    """file:line(function), shortened."""
    if f[0] == "~":
        return f[2]
    path = f[0]
    for marker in ("/tsd/", "/python3.11/", "/python3/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/tsd/":
                path = "tsd/" + path
            break
    return f"{path}:{f[1]}({f[2]})"


def report(title: str, stats: Stats, wall: float, jobs: int, top: int) -> None:
    """One workload's summary."""
    own = sum(e[2] for e in stats.values())
    idle = sum(e[2] for f, e in stats.items() if IDLE.search(f[2]))
    busy = max(own - idle, 1e-9)
    print(f"\n== {title}: {wall:.2f} s wall; profiled threads {own:.2f} s, of which idle "
          f"{idle:.2f} s, busy {busy:.2f} s = {busy / jobs * 1000:.2f} ms per job "
          f"({jobs} jobs)")
    print("   share of busy time (inclusive, entered from outside the group):")
    tx = sum(v[3] for f, e in stats.items() if _is_sqlite(f)
             for c, v in e[4].items() if c[2] in ("_tx", "commit", "_commit"))
    lines = [("SQLite BEGIN/COMMIT (called by Store._tx)", tx)]
    lines += [(label, entered(stats, member)) for label, member in GROUPS]
    for label, seconds in lines:
        print(f"     {label:52} {seconds / busy * 100:5.1f} %  {seconds / jobs * 1000:7.3f} "
              f"ms/job")
    busy_funcs = [(f, e) for f, e in stats.items() if not IDLE.search(f[2])]
    print(f"   top {top} by own time:            calls   own ms  cum ms")
    for f, e in sorted(busy_funcs, key=lambda x: x[1][2], reverse=True)[:top]:
        print(f"     {name(f)[:60]:60} {e[1]:8} {e[2] * 1000:8.1f} {e[3] * 1000:8.1f}")
    print(f"   top {top} of tsd's functions by cumulative time:")
    ours = [(f, e) for f, e in busy_funcs if "/tsd/" in f[0]]
    for f, e in sorted(ours, key=lambda x: x[1][3], reverse=True)[:top]:
        print(f"     {name(f)[:60]:60} {e[1]:8} {e[2] * 1000:8.1f} {e[3] * 1000:8.1f}")


class Profiled:
    """A personal daemon that this bench starts under cProfile (instead of `ts` starting it)."""

    def __init__(self, d: PersonalDaemon) -> None:
        self.d = d
        self.prefix = d.root / "profile"
        self.taken = 0
        self.sock = d.env["TS_SOCKET"]
        Path(self.sock).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, str(self.prefix), self.sock], env=d.env, cwd="/",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        t0 = time.perf_counter()
        deadline = time.monotonic() + 60
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"profile: the profiled daemon did not start "
                                 f"(see {d.state_dir / 'tsd.log'})")
            time.sleep(0.01)
        # The socket takes connections before the daemon has loaded its queue: the
        # start ends with the answer to a first request.
        d.ts("-S")
        self.start_s = time.perf_counter() - t0

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(self.sock)
            except OSError:
                return False
        return True

    def snapshot(self) -> Stats:
        """Every counter now."""
        path = Path(f"{self.prefix}.{self.taken}")
        self.taken += 1
        os.kill(self.proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while not path.exists():
            if time.monotonic() > deadline:
                raise SystemExit("profile: the daemon wrote no snapshot")
            time.sleep(0.01)
        return load(path)

    @contextlib.contextmanager
    def measure(self) -> Iterator[list[Stats | float]]:
        """The block's profile and wall seconds, appended to the yielded list at its end."""
        before = self.snapshot()
        out: list[Stats | float] = []
        t0 = time.perf_counter()
        yield out
        wall = time.perf_counter() - t0
        out += [diff(self.snapshot(), before), wall]

    def stop(self) -> None:
        """Stop the daemon, then remove its directory."""
        self.d.stop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def daemon_profiles(jobs: int, top: int, only: list[str], slots: int = 2) -> None:
    """submit and dispatch on one daemon, profiled between snapshots."""
    d = PersonalDaemon(TS_SLOTS="0", TS_MAXCONN=str(jobs + 100))
    p = Profiled(d)
    try:
        s = Spooler("tsd", TS, d.env, d.tmp)
        with p.measure() as got:
            ids, _ = submit_many(s, ["true"], jobs, workers=2)
        stats, wall = got
        assert isinstance(stats, dict) and isinstance(wall, float)
        if "submit" in only:
            report(f"submit: {jobs} x `ts true` (2 clients at once, 0 slots)", stats, wall,
                   jobs, top)
        if "dispatch" in only:
            with p.measure() as got:
                s.run("-S", str(slots))
                s.run("-w", str(ids[-1]), check=False)
            stats, wall = got
            assert isinstance(stats, dict) and isinstance(wall, float)
            report(f"dispatch: those {jobs} jobs on {slots} slots", stats, wall, jobs, top)
    finally:
        p.stop()


def listing_profile(n: int, top: int) -> None:
    """A daemon started on n seeded jobs; its start, then one `ts -l`."""
    d = PersonalDaemon(TS_SLOTS="0", TS_MAXCONN=str(2 * n))
    seed(d.state_dir, n, d.env)
    p = Profiled(d)
    try:
        start_stats = diff(p.snapshot(), {})
        report(f"daemon start on {n:,} queued jobs (until it answers `ts -S`)", start_stats,
               p.start_s, n, top)
        with p.measure() as got:
            subprocess.run([TS, "-l"], env=d.env, check=True, stdout=subprocess.DEVNULL)
        stats, wall = got
        assert isinstance(stats, dict) and isinstance(wall, float)
        report(f"listing: one `ts -l` of {n:,} queued jobs (client included in wall)", stats,
               wall, n, top)
    finally:
        p.stop()


@dataclass
class Imp:
    """One line of -X importtime."""

    self_us: int
    cum_us: int
    depth: int
    module: str


def importtime(ts: str, args: list[str], env: dict[str, str]) -> list[Imp]:
    """The imports of one `ts ARGS` run, started by its own shebang line (the lean
    launcher's `python -S` included): -X importtime through its variable."""
    r = subprocess.run([ts, *args], env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
                       capture_output=True, text=True)
    out = []
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            out.append(Imp(int(m[1]), int(m[2]), len(m[3]) // 2, m[4]))
    return out


def client_profiles(python: str, ts: str, top: int) -> None:
    """-X importtime of `ts -l` and `ts true` against a daemon with 10 finished jobs."""
    d = PersonalDaemon(ts=ts, TS_SLOTS="4")
    d.env.pop("PYTHONDONTWRITEBYTECODE", None)
    try:
        for _ in range(10):
            d.ts("true")
        d.ts("-w")
        for args in (["-l"], ["true"]):
            runs = [importtime(ts, args, d.env) for _ in range(5)]
            walls, bare = [], []
            for _ in range(5):
                t0 = time.perf_counter()
                subprocess.run([ts, *args], env=d.env, check=True, stdout=subprocess.DEVNULL)
                walls.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                subprocess.run([python, "-c", "pass"], env=d.env, check=True)
                bare.append(time.perf_counter() - t0)
            # The median run by total import time stands for all.
            runs.sort(key=lambda imps: sum(i.self_us for i in imps))
            imps = runs[len(runs) // 2]
            total = sum(i.self_us for i in imps) / 1000
            wall = statistics.median(walls) * 1000
            print(f"\n== client `ts {' '.join(args)}`: wall {wall:.1f} ms (python -c pass "
                  f"{statistics.median(bare) * 1000:.1f} ms); imports {total:.1f} ms "
                  f"({len(imps)} modules) = {total / wall * 100:.0f} % of wall")
            by_pkg: dict[str, int] = {}
            for i in imps:
                key = i.module.split(".")[0]
                by_pkg[key] = by_pkg.get(key, 0) + i.self_us
            pkgs = sorted(by_pkg.items(), key=lambda kv: kv[1], reverse=True)[:top]
            print("   by top-level package (own time, ms): " + ", ".join(
                f"{k} {v / 1000:.1f}" for k, v in pkgs))
            print("   slowest modules (own ms / cumulative ms):")
            for i in sorted(imps, key=lambda i: i.self_us, reverse=True)[:top]:
                print(f"     {i.module:44} {i.self_us / 1000:6.1f} {i.cum_us / 1000:7.1f}")
            firsts = [i for i in imps if i.depth == 0]
            print("   imported directly by the client's start (cumulative ms): " + ", ".join(
                f"{i.module} {i.cum_us / 1000:.1f}" for i in
                sorted(firsts, key=lambda i: i.cum_us, reverse=True)[:top]))
    finally:
        d.stop()


def main() -> None:
    p = argparse.ArgumentParser(description="where tsd's time goes")
    p.add_argument("--quick", action="store_true", help="small sizes (200 jobs, 20,000 listed)")
    p.add_argument("--jobs", type=int)
    p.add_argument("--big", type=int)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--slots", type=int, default=2, help="the dispatch's slots (2)")
    p.add_argument("--only", default="submit,dispatch,listing,client")
    p.add_argument("--editable", action="store_true",
                   help="client from this checkout's .venv, not a fresh regular install")
    args = p.parse_args()
    jobs = args.jobs or (200 if args.quick else 500)
    big = args.big or (20_000 if args.quick else 100_000)
    only = [x.strip() for x in args.only.split(",")]
    print(f"tsd profiles; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} "
          "(a shared machine: read shares, not absolute times)")
    if "submit" in only or "dispatch" in only:
        daemon_profiles(jobs, args.top, only, args.slots)
    if "listing" in only:
        listing_profile(big, args.top)
    if "client" in only:
        if args.editable:
            client_profiles(sys.executable, TS, args.top)
        else:
            venv = installed_venv()
            try:
                client_profiles(str(venv / "bin" / "python"), str(venv / "bin" / "ts"),
                                args.top)
            finally:
                subprocess.run(["rm", "-rf", str(venv)], check=False)


if __name__ == "__main__":
    main()

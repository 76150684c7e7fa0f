"""The floor of a durable dispatch in CPython, side by side with task-spooler.

What any spooler that keeps issue 10's promises must do per job, done by the
leanest Python loop we can write (no socket, no asyncio, no client): create the
job's output file, posix_spawn `true` into it, learn its end, and record the
start and the end in SQLite (WAL) made durable with one fdatasync per loop
turn, before a job runs and before its end counts. Two shapes:

* one: the loop itself is the jobs' parent (a pidfd per job in epoll);
* split: one long-lived helper process per slot is the jobs' parent and reports
  "id code" on a pipe, the shape that lets a job outlive its daemon (tsd's
  supervisors), with nothing of theirs beyond that (no subreaper, no signal
  hygiene, no exit report file, no scope).

Nothing else: no leftovers ended, no per-user anything.

Beside it, in the same run, tsp (Debian's task-spooler, the C core, not
durable) through the dispatch of vs_tsp.py. If even the floor cannot reach
tsp's rate, a durable Python spooler cannot; if it can, what tsd lacks is its
own overhead, not the language or the durability. Prints, asserts nothing.

Usage: .venv/bin/python bench/dispatch_floor.py [--jobs N] [--slots 2,16] [--runs R]
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from spoolers import dispatch, ensure_tsp
from vs_tsp import tsp_side


def _cpu_s(live: list[int] | None = None) -> float:
    """CPU seconds of this process, its reaped children, and the `live` children with
    what they reaped (read from /proc: they are reaped only after the measurement)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    for pid in live or ():
        data = Path(f"/proc/{pid}/stat").read_bytes()
        fields = data[data.rfind(b")") + 2 :].split()
        total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def _start_job(root: Path, job: int, devnull: int) -> int:
    """Job `job`: `true` spawned into its own new output file; its pid."""
    out = os.open(root / f"out.{job}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        return os.posix_spawn("/usr/bin/true", ["true"], os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, devnull, 0),
            (os.POSIX_SPAWN_DUP2, out, 1),
            (os.POSIX_SPAWN_DUP2, out, 2),
        ], setpgroup=0)
    finally:
        os.close(out)


def _helper(root: Path, req_r: int, rep_w: int) -> None:
    """A job's parent that is not the loop (what lets a job outlive its daemon): reads a
    job id, runs the job into its output file, waits for it, reports "id code"."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    while line := os.read(req_r, 64):
        job = int(line)
        pid = _start_job(root, job, devnull)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        os.write(rep_w, f"{job} {code}\n".encode())


def _out_dir(root: Path, outputs: str | None) -> Path:
    """Where the jobs' output files go: the state's own directory, or one under `outputs`."""
    return root if outputs is None else Path(tempfile.mkdtemp(prefix="tsd-floor-", dir=outputs))


def split_run(n: int, slots: int, outputs: str | None = None) -> tuple[float, float]:
    """floor_run with one long-lived helper process per slot as the jobs' parent (the
    restart-surviving shape: the loop only sends job ids and reads exit codes)."""
    root = Path(tempfile.mkdtemp(prefix="tsd-floor-", dir="/tmp"))
    out = _out_dir(root, outputs)
    helpers: list[tuple[int, int, int]] = []  # (pid, request fd, report fd)
    try:
        for _ in range(slots):
            req_r, req_w = os.pipe()
            rep_r, rep_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(req_w)
                    os.close(rep_r)
                    for _, w, r in helpers:
                        os.close(w)
                        os.close(r)
                    _helper(out, req_r, rep_w)
                finally:
                    os._exit(0)
            os.close(req_r)
            os.close(rep_w)
            helpers.append((pid, req_w, rep_r))
        db, wal = _state(root, n)
        epoll = select.epoll()
        for _, _, rep_r in helpers:
            epoll.register(rep_r, select.EPOLLIN)
        idle = [req_w for _, req_w, _ in helpers]
        by_report = {rep_r: req_w for _, req_w, rep_r in helpers}
        queued = list(range(n - 1, -1, -1))
        ended: list[tuple[int, int]] = []
        busy = 0
        pids = [pid for pid, _, _ in helpers]
        cpu0, t0 = _cpu_s(pids), time.perf_counter()
        while queued or busy:
            starting = [queued.pop() for _ in range(min(len(idle), len(queued)))]
            _record(db, wal, ended, starting)
            ended.clear()
            for job in starting:
                os.write(idle.pop(), f"{job}".encode())
                busy += 1
            for fd, _ in epoll.poll():
                for line in os.read(fd, 4096).decode().split("\n"):
                    if line:
                        job, code = (int(x) for x in line.split())
                        ended.append((job, code))
                        busy -= 1
                idle.append(by_report[fd])
        _record(db, wal, ended, [])
        elapsed, used = time.perf_counter() - t0, _cpu_s(pids) - cpu0
        db.close()
        os.close(wal)
        epoll.close()
        return n / elapsed, used / n * 1000
    finally:
        for pid, req_w, rep_r in helpers:
            os.close(req_w)  # end of file: the helper exits
            os.close(rep_r)
            os.waitpid(pid, 0)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def _state(root: Path, n: int) -> tuple[sqlite3.Connection, int]:
    """The state db with n queued jobs, and the WAL's fd to fdatasync."""
    db = sqlite3.connect(root / "state.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # the commit writes; the fdatasync syncs
    db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, state TEXT, code INTEGER)")
    db.executemany("INSERT INTO jobs VALUES (?, 'queued', NULL)", ((i,) for i in range(n)))
    return db, os.open(root / "state.db-wal", os.O_RDONLY)


def _record(
    db: sqlite3.Connection, wal: int, ended: list[tuple[int, int]], starting: list[int]
) -> None:
    """One turn's record, durable: the ends just seen and the starts about to happen."""
    db.execute("BEGIN")
    db.executemany("UPDATE jobs SET state='finished', code=? WHERE id=?",
                   ((code, job) for job, code in ended))
    db.executemany("UPDATE jobs SET state='running' WHERE id=?", ((job,) for job in starting))
    db.execute("COMMIT")
    os.fdatasync(wal)


def floor_run(n: int, slots: int, outputs: str | None = None) -> tuple[float, float]:
    """(jobs/s, CPU ms per job) of the minimal durable loop over n `true` jobs, the loop
    itself the jobs' parent; their outputs under `outputs` when given."""
    root = Path(tempfile.mkdtemp(prefix="tsd-floor-", dir="/tmp"))
    out = _out_dir(root, outputs)
    try:
        db, wal = _state(root, n)
        devnull = os.open(os.devnull, os.O_RDONLY)
        epoll = select.epoll()
        running: dict[int, tuple[int, int]] = {}  # pidfd -> (job id, pid)
        queued = list(range(n - 1, -1, -1))
        ended: list[tuple[int, int]] = []
        cpu0, t0 = _cpu_s(), time.perf_counter()
        while queued or running:
            starting = [queued.pop() for _ in range(min(slots - len(running), len(queued)))]
            _record(db, wal, ended, starting)
            ended.clear()
            for job in starting:
                pid = _start_job(out, job, devnull)
                pidfd = os.pidfd_open(pid)
                epoll.register(pidfd, select.EPOLLIN)
                running[pidfd] = (job, pid)
            for pidfd, _ in epoll.poll():
                job, pid = running.pop(pidfd)
                epoll.unregister(pidfd)
                os.close(pidfd)
                ended.append((job, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])))
        _record(db, wal, ended, [])
        elapsed, used = time.perf_counter() - t0, _cpu_s() - cpu0
        db.close()
        os.close(wal)
        os.close(devnull)
        epoll.close()
        return n / elapsed, used / n * 1000
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=900)  # tsp holds ~1,000 at most
    ap.add_argument("--slots", default="2,16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--outputs", metavar="DIR",
                    help="where the jobs' outputs go, for both (e.g. a tmpfs); default /tmp")
    args = ap.parse_args()
    side = tsp_side(ensure_tsp(), args.outputs)
    try:
        print(f"durable Python floors vs tsp, {args.jobs} `true` jobs, medians of "
              f"{args.runs} interleaved runs; {os.cpu_count()} CPUs. one: the loop is the "
              "jobs' parent; split: a helper process per slot is (restart-surviving shape)")
        print(f"{'slots':>5}  {'one jobs/s':>10}  {'split jobs/s':>12}  {'tsp jobs/s':>10}  "
              f"{'one/tsp':>7}  {'split/tsp':>9}  {'CPU/job one, split, tsp (ms)':>28}")
        for slots in (int(s) for s in args.slots.split(",")):
            one, split, tsp = [], [], []
            for _ in range(args.runs):
                one.append(floor_run(args.jobs, slots, args.outputs))
                split.append(split_run(args.jobs, slots, args.outputs))
                with side.ctx() as s:
                    r = dispatch(s, args.jobs, slots, side.cpu_s)
                tsp.append((r.rate, r.cpu_ms_per_job))
            o, p, t = ([statistics.median(x[i] for x in xs) for i in (0, 1)]
                       for xs in (one, split, tsp))
            print(f"{slots:>5}  {o[0]:>10.0f}  {p[0]:>12.0f}  {t[0]:>10.0f}  "
                  f"{o[0] / t[0]:>6.2f}x  {p[0] / t[0]:>8.2f}x  "
                  f"{o[1]:>10.2f} {p[1]:>6.2f} {t[1]:>6.2f}")
    finally:
        side.close()


if __name__ == "__main__":
    main()

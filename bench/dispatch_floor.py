"""The floor of a durable dispatch in CPython, side by side with task-spooler.

What any spooler that keeps issue 10's promises must do per job, done by the
leanest Python loop we can write, in one process (no daemon/supervisor split,
no socket, no asyncio, no client): create the job's output file, posix_spawn
`true` into it, learn its end from a pidfd (epoll), and record the start and
the end in SQLite (WAL) made durable with one fdatasync per loop turn, before
a job runs and before its end counts. Nothing else: no restart survival (a job
dies with this process), no leftovers ended, no per-user anything.

Beside it, in the same run, tsp (Debian's task-spooler, the C core, not
durable) through the dispatch of vs_tsp.py. If even the floor cannot reach
tsp's rate, a durable Python spooler cannot: the gap that is left is the
language and the durability, not tsd's design. Prints, asserts nothing.

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


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def floor_run(n: int, slots: int) -> tuple[float, float]:
    """(jobs/s, CPU ms per job) of the minimal durable loop over n `true` jobs."""
    root = Path(tempfile.mkdtemp(prefix="tsd-floor-", dir="/tmp"))
    try:
        db = sqlite3.connect(root / "state.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # the commit writes; the fdatasync below syncs
        db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, state TEXT, code INTEGER)")
        db.executemany("INSERT INTO jobs VALUES (?, 'queued', NULL)", ((i,) for i in range(n)))
        wal = os.open(root / "state.db-wal", os.O_RDONLY)
        devnull = os.open(os.devnull, os.O_RDONLY)
        epoll = select.epoll()
        running: dict[int, tuple[int, int]] = {}  # pidfd -> (job id, pid)
        queued = list(range(n - 1, -1, -1))
        ended: list[tuple[int, int]] = []
        cpu0, t0 = _cpu_s(), time.perf_counter()
        while queued or running:
            starting = [queued.pop() for _ in range(min(slots - len(running), len(queued)))]
            # One turn's record: the ends just seen and the starts about to happen.
            db.execute("BEGIN")
            db.executemany("UPDATE jobs SET state='finished', code=? WHERE id=?",
                           ((code, job) for job, code in ended))
            db.executemany("UPDATE jobs SET state='running' WHERE id=?",
                           ((job,) for job in starting))
            db.execute("COMMIT")
            os.fdatasync(wal)
            ended.clear()
            for job in starting:
                out = os.open(root / f"out.{job}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                pid = os.posix_spawn("/usr/bin/true", ["true"], os.environ, file_actions=[
                    (os.POSIX_SPAWN_DUP2, devnull, 0),
                    (os.POSIX_SPAWN_DUP2, out, 1),
                    (os.POSIX_SPAWN_DUP2, out, 2),
                ], setpgroup=0)
                os.close(out)
                pidfd = os.pidfd_open(pid)
                epoll.register(pidfd, select.EPOLLIN)
                running[pidfd] = (job, pid)
            for pidfd, _ in epoll.poll():
                job, pid = running.pop(pidfd)
                epoll.unregister(pidfd)
                os.close(pidfd)
                ended.append((job, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])))
        db.execute("BEGIN")
        db.executemany("UPDATE jobs SET state='finished', code=? WHERE id=?",
                       ((code, job) for job, code in ended))
        db.execute("COMMIT")
        os.fdatasync(wal)
        elapsed, used = time.perf_counter() - t0, _cpu_s() - cpu0
        db.close()
        os.close(wal)
        os.close(devnull)
        epoll.close()
        return n / elapsed, used / n * 1000
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=900)  # tsp holds ~1,000 at most
    ap.add_argument("--slots", default="2,16")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    side = tsp_side(ensure_tsp())
    try:
        print(f"durable Python floor vs tsp, {args.jobs} `true` jobs, medians of "
              f"{args.runs} interleaved runs; {os.cpu_count()} CPUs")
        print(f"{'slots':>5}  {'floor jobs/s':>12}  {'tsp jobs/s':>10}  {'floor/tsp':>9}  "
              f"{'floor CPU/job':>13}  {'tsp CPU/job':>11}")
        for slots in (int(s) for s in args.slots.split(",")):
            floor, tsp = [], []
            for _ in range(args.runs):
                floor.append(floor_run(args.jobs, slots))
                with side.ctx() as s:
                    r = dispatch(s, args.jobs, slots, side.cpu_s)
                tsp.append((r.rate, r.cpu_ms_per_job))
            fr, fc = (statistics.median(x[i] for x in floor) for i in (0, 1))
            tr, tc = (statistics.median(x[i] for x in tsp) for i in (0, 1))
            print(f"{slots:>5}  {fr:>12.0f}  {tr:>10.0f}  {fr / tr:>8.2f}x  "
                  f"{fc:>10.2f} ms  {tc:>8.2f} ms")
    finally:
        side.close()


if __name__ == "__main__":
    main()

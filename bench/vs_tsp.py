"""tsd (personal mode) side by side with C task-spooler (`tsp`): every row of issue 10's table.

One run measures each row for both spoolers, interleaved, and prints one table:
tsd, tsp, the ratio tsd/tsp, for client starts also tsd/`python -c pass`, and the
goal with whether this run met it. Nothing is asserted; the machine may be shared
and noisy, so read the ratios, and rerun before believing a single number.

Rows (--rows picks groups; sizes are options, --quick makes all of them small):
  dispatch  N `true` jobs queued behind gate jobs that hold every slot, released at
            once onto 2 and 16 slots: jobs/s, and CPU ms per job: everything the
            spooler's processes (server, supervisors, jobs, task-spooler's
            background clients) used meanwhile, from a cgroup of their own (root),
            else the whole machine's busy time. task-spooler holds one connection
            per queued job and blocks new clients past its maximum (~1,000): it
            then runs fewer jobs per dispatch, said under the table.
  client    `ts -l` listing 10 finished jobs, and `ts true`: wall ms of the client,
            also as a multiple of `python -c pass` (same interpreter as tsd's).
  latency   a job ends -> a `ts -w` already waiting returns; submit with a free
            slot -> the job's first instruction. Both with 4 slots.
  big       tsd: BIG jobs seeded into the state db (big_queue.py's seeding), then
            the daemon's start + first call, `ts -l`, and the daemon's RSS.
            tsp: submits into one server until one blocks (up to --tsp-probe), then
            `tsp -l` at that size, and the RSS of its server and waiting clients.
            It keeps no queue across a restart, so it has no start row.

tsd's client runs from a throwaway, byte-compiled, non-editable install (as in
client_start.py) unless --editable. tsp is Debian's task-spooler, installed with
apt when missing (as root).

Usage: .venv/bin/python bench/vs_tsp.py [--quick] [--rows dispatch,client,latency,big]
           [--jobs N] [--reps R] [--runs R] [--big N] [--tsp-probe N] [--editable]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from big_queue import open_big
from client_start import installed_venv
from common import TS, Cgroup, PersonalDaemon
from spoolers import (
    BLOCKED_AFTER_S,
    END_JOB_SLEEP,
    DispatchResult,
    Spooler,
    dispatch,
    end_to_wait_ms,
    ensure_tsp,
    fdatasync_ms,
    machine_busy_s,
    machine_switches,
    med,
    submit_many,
    submit_to_start_ms,
    wall_ms,
)

ROWS = ("dispatch", "client", "latency", "big")


@dataclass
class Side:
    """One spooler on this machine: its client, its cgroup (as root), how to stop it."""

    spooler: Spooler
    cgroup: Cgroup | None
    stop_server: Callable[[], None]

    @property
    def name(self) -> str:
        """tsd or tsp."""
        return self.spooler.name

    @contextlib.contextmanager
    def ctx(self) -> Iterator[Spooler]:
        """Run the block's commands inside this spooler's cgroup."""
        with self.cgroup.inside() if self.cgroup else contextlib.nullcontext():
            yield self.spooler

    def cpu_s(self) -> float:
        """CPU seconds so far: of this spooler's cgroup, else of the whole machine."""
        return self.cgroup.usage_s() if self.cgroup else machine_busy_s()

    def close(self) -> None:
        """Stop the server and end whatever of this spooler still runs."""
        with self.ctx():
            self.stop_server()
        if self.cgroup:
            self.cgroup.remove()


def tsd_side(ts: str, outputs: str | None = None) -> Side:
    """A fresh personal tsd (1 slot) started by its first client call; its jobs'
    outputs in a directory under `outputs` when given."""
    d = PersonalDaemon(ts=ts, outputs=outputs, TS_SLOTS="1", TS_MAXCONN="100000")
    d.env.pop("PYTHONDONTWRITEBYTECODE", None)
    side = Side(Spooler("tsd", ts, d.env, d.tmp), Cgroup.make("tsd-bench-tsd"), d.stop)
    with side.ctx() as s:
        s.run("-l")
    return side


def tsp_side(tsp: str, outputs: str | None = None) -> Side:
    """A fresh task-spooler server (1 slot) with its own socket and TMPDIR (under
    `outputs` when given)."""
    root = Path(tempfile.mkdtemp(prefix="tsp-bench-", dir=outputs or "/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    env.update(TMPDIR=str(root), TS_SOCKET=str(root / "sock"), TS_SLOTS="1",
               TS_MAXFINISHED="100000")

    def stop() -> None:
        subprocess.run([tsp, "-K"], env=env, capture_output=True, timeout=30)
        shutil.rmtree(root, ignore_errors=True)

    side = Side(Spooler("tsp", tsp, env, root), Cgroup.make("tsd-bench-tsp"), stop)
    with side.ctx() as s:
        s.run("-l")
    return side


@dataclass
class Row:
    """One line of the table."""

    name: str
    unit: str
    tsd: float | None
    tsp: float | None
    goal: str
    met: bool | None
    tsp_text: str = ""  # instead of a number: what tsp did
    per_python: float | None = None  # tsd / `python -c pass`
    higher_is_better: bool = False


def print_table(rows: list[Row]) -> None:
    """The table, one line per row."""
    print(f"{'row':40} {'tsd':>10} {'tsp':>12} {'tsd/tsp':>8} {'tsd/py':>7}  "
          f"{'goal':18} met")
    for r in rows:
        tsd = "-" if r.tsd is None else f"{r.tsd:.2f}"
        tsp = r.tsp_text or ("-" if r.tsp is None else f"{r.tsp:.2f}")
        ratio = f"{r.tsd / r.tsp:.2f}x" if r.tsd is not None and r.tsp else "-"
        py = "-" if r.per_python is None else f"{r.per_python:.2f}x"
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        name = f"{r.name} ({r.unit})"
        print(f"{name:40} {tsd:>10} {tsp:>12} {ratio:>8} {py:>7}  {r.goal:18} {met}")


def progress(msg: str) -> None:
    """A line on stderr while the run goes on."""
    print(f"[vs_tsp {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    """One run: both spoolers, the rows asked for, the notes under the table."""

    def __init__(self, args: argparse.Namespace, ts: str, python: str, tsp: str) -> None:
        self.args, self.python, self.tsp_path = args, python, tsp
        self.tsd = tsd_side(ts, args.outputs)
        try:
            self.tsp = tsp_side(tsp, args.outputs)
        except BaseException:
            self.tsd.close()
            raise
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.tsp_cap: int | None = None  # connections tsp held when a submit blocked

    def close(self) -> None:
        """Stop both spoolers."""
        for side in (self.tsd, self.tsp):
            with contextlib.suppress(Exception):
                side.close()

    def _bare_ms(self) -> float:
        return wall_ms([self.python, "-c", "pass"], self.tsd.spooler.env)

    # ---- rows ----------------------------------------------------------------

    def dispatch_rows(self) -> None:
        """jobs/s and CPU per job on 2 and 16 slots, interleaved runs."""
        n, reps = self.args.jobs, self.args.reps
        for slots in (2, 16):
            got: dict[str, list[DispatchResult]] = {"tsd": [], "tsp": []}
            switched: dict[str, list[float]] = {"tsd": [], "tsp": []}
            for rep in range(reps):
                for side in (self.tsd, self.tsp):
                    want = n
                    if side is self.tsp and self.tsp_cap is not None:
                        want = min(n, self.tsp_cap - slots - 1)
                    progress(f"dispatch {side.name}: {want} jobs, {slots} slots, run {rep + 1}")
                    marks: list[int] = []

                    def meter(side: Side = side, marks: list[int] = marks) -> float:
                        marks.append(machine_switches())
                        return side.cpu_s()

                    with side.ctx() as s:
                        r = dispatch(s, want, slots, meter)
                    switched[side.name].append((marks[-1] - marks[0]) / r.jobs)
                    if r.full and side is self.tsp:
                        self.tsp_cap = r.jobs + slots
                    got[side.name].append(r)
            a = med(r.rate for r in got["tsd"])
            b = med(r.rate for r in got["tsp"])
            self.rows.append(Row(f"dispatch, {slots} slots", "jobs/s", a, b, ">= tsp",
                                 a >= b, higher_is_better=True))
            c = med(r.cpu_ms_per_job for r in got["tsd"])
            self.rows.append(Row(f"CPU per dispatched job, {slots} slots", "ms", c,
                                 med(r.cpu_ms_per_job for r in got["tsp"]), "<= 4 ms", c <= 4))
            self.notes.append(
                f"dispatch, {slots} slots: context switches per job (the whole machine's, "
                f"over the same span): tsd {med(switched['tsd']):.1f}, "
                f"tsp {med(switched['tsp']):.1f}")
            # Jobs/s is how busy the spooler keeps the CPUs over its CPU per job: this
            # says which of the two a difference in jobs/s comes from.
            cores = os.cpu_count() or 1
            busy = {name: med(r.cpu_seconds / r.seconds for r in got[name]) / cores
                    for name in got}
            self.notes.append(
                f"dispatch, {slots} slots: share of the {cores} CPUs busy over the span "
                f"(as CPU per job is counted): tsd {busy['tsd']:.0%}, tsp {busy['tsp']:.0%} "
                "(bench/sched_waits.py says where the rest waits)")
            for name in ("tsd", "tsp"):
                sizes = sorted({r.jobs for r in got[name]})
                if sizes != [n]:
                    self.notes.append(f"dispatch, {slots} slots: {name} ran {sizes} jobs per "
                                      f"run, not {n} (a submit blocked: its queue was full)")
        if self.tsp_cap is not None:
            self.notes.append(f"tsp blocked the submit after {self.tsp_cap} jobs "
                              "(gates included) in its queue")
        cpu_from = "each spooler's own cgroup" if self.tsd.cgroup else \
            "the whole machine's busy time (not root: anything else running counts too)"
        self.notes.append(f"CPU per job is from {cpu_from}")
        if self.args.outputs:
            self.notes.append(f"job outputs (TMPDIR) of both spoolers under {self.args.outputs}")

    def client_rows(self) -> None:
        """`ts -l` with 10 jobs and `ts true`, both spoolers and python -c pass, interleaved."""
        sides = (self.tsd, self.tsp)
        for side in sides:
            with side.ctx() as s:
                s.run("-C")
                s.run("-S", "4")
                for _ in range(10):
                    s.queue("true")
                s.run("-w", check=False)
                time.sleep(0.2)  # the last ones end too, not only the one -w waited for
        runs = self.args.runs
        progress(f"client starts: {runs} runs each")
        bare: list[float] = []
        for label, argv in (("ts -l (10 jobs)", ["-l"]), ("ts true", ["true"])):
            ms: dict[str, list[float]] = {"tsd": [], "tsp": []}
            for _ in range(runs):
                bare.append(self._bare_ms())
                for side in sides:
                    with side.ctx() as s:
                        ms[side.name].append(wall_ms([s.argv0, *argv], s.env))
            self.rows.append(Row(label, "ms", med(ms["tsd"]), med(ms["tsp"]), "<= 2x python",
                                 None))
        py = med(bare)
        for row in self.rows[-2:]:
            assert row.tsd is not None
            row.per_python = row.tsd / py
            row.met = row.per_python <= 2
        self.rows.append(Row("python -c pass", "ms", py, None, "", None))
        for side in sides:
            with side.ctx() as s:
                s.run("-w", check=False)

    def latency_rows(self) -> None:
        """job end -> ts -w, and submit -> job start, interleaved."""
        ends: dict[str, list[float]] = {"tsd": [], "tsp": []}
        starts: dict[str, list[float]] = {"tsd": [], "tsp": []}
        for side in (self.tsd, self.tsp):
            with side.ctx() as s:
                s.run("-S", "4")
        runs = max(3, self.args.runs // 2)
        progress(f"latencies: {runs} runs each")
        bare_argv = [self.python, "-I", "-S", "-c", "pass"]
        bare_idle: list[float] = []
        syncs: list[float] = []
        # Beside tsd's state (the same file system), appended to as its WAL is.
        wal = os.open(self.tsd.spooler.tmp / "fdatasync-probe", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for _ in range(runs):
                for side in (self.tsd, self.tsp):
                    with side.ctx() as s:
                        ends[side.name].append(end_to_wait_ms(s))
                        starts[side.name].append(submit_to_start_ms(s))
                # The floors' parts in the state those rows are measured in: after
                # end_to_wait's job, a machine nearly idle for END_JOB_SLEEP. Idle vCPUs
                # (and the virtual disk) wake slower here: a start takes about 1 ms more
                # than back to back, an fdatasync several times as long.
                time.sleep(END_JOB_SLEEP)
                bare_idle.append(wall_ms(bare_argv, self.tsd.spooler.env))
                time.sleep(END_JOB_SLEEP)
                syncs.append(fdatasync_ms(wal))
            warm: list[float] = []
            for _ in range(runs):
                time.sleep(0.02)
                warm.append(fdatasync_ms(wal))
            warm_sync = med(warm)
        finally:
            os.close(wal)
        a = med(ends["tsd"])
        self.rows.append(Row("job end -> ts -w returns", "ms", a, med(ends["tsp"]),
                             "<= 3 ms", a <= 3))
        # A durable end is on disk before anyone hears of it: tsp (which keeps nothing)
        # plus one fdatasync is the floor of any spooler that keeps that promise.
        sync = med(syncs)
        self.notes.append(
            f"job end -> ts -w, the floor of a durable spooler: tsp's {med(ends['tsp']):.2f} ms "
            f"+ one fdatasync of 20 KB appended beside tsd's state, {sync:.2f} ms after "
            f"{END_JOB_SLEEP:g} s idle as the ends are measured ({warm_sync:.2f} ms 20 ms "
            f"apart) = {med(ends['tsp']) + sync:.2f} ms; tsd is "
            f"{a - med(ends['tsp']) - sync:.2f} ms above it"
        )
        a = med(starts["tsd"])
        self.rows.append(Row("submit -> job starts (free slot)", "ms", a, med(starts["tsp"]),
                             "<= 10 ms", a <= 10))
        # The floor of any Python ts: its interpreter's bare start (as the launcher runs
        # it: no site) before the first byte is sent, then everything tsp takes.
        bare = med(bare_idle)
        back_to_back = med([wall_ms(bare_argv, self.tsd.spooler.env) for _ in range(runs)])
        floor = bare + med(starts["tsp"])
        self.notes.append(
            f"submit -> start, the floor of a client in Python: `python -I -S -c pass` "
            f"{bare:.2f} ms after {END_JOB_SLEEP:g} s idle as the submits are measured "
            f"({back_to_back:.2f} ms back to back; the launcher's interpreter, before any "
            f"import) + tsp's {med(starts['tsp']):.2f} ms = {floor:.2f} ms; tsd is "
            f"{a - floor:.2f} ms above it"
        )

    def big_rows(self, ts: str) -> None:
        """A big queue: tsd from a seeded db; tsp filled until a submit blocks."""
        n = self.args.big
        progress(f"big queue: seeding {n} jobs for tsd")
        big, d = open_big(n, self.args.list_runs, ts=ts)
        d.stop()
        progress(f"big queue: filling tsp (up to {self.args.tsp_probe})")
        cap = probe_tsp(self.tsp_path, self.args.tsp_probe)
        at = f"at its {cap.queued}"
        lst = med(big.list_s)
        self.rows.append(Row(f"ts -l with {n:,} queued", "s", lst, None, "<= 1 s", lst <= 1,
                             tsp_text=cap.refusal()))
        self.rows.append(Row(f"daemon RSS at {n:,} queued", "MiB", big.rss_mib, None,
                             "<= 100 MiB", big.rss_mib <= 100,
                             tsp_text=f"{cap.server_rss_mib:.1f} {at}"))
        self.rows.append(Row(f"daemon start with {n:,} queued", "s", big.start_s, None,
                             "<= 1 s", big.start_s <= 1, tsp_text="no queue kept"))
        self.notes.append(
            f"tsp with a big queue: {cap.describe()}; its server held {cap.server_rss_mib:.1f} "
            f"MiB RSS and its {cap.clients} waiting clients {cap.clients_uss_mib:.0f} MiB "
            f"(USS, summed) at {cap.queued} queued")
        runs = ", ".join(f"{x:.2f}" for x in big.list_s)
        self.notes.append(f"tsd: seeding {n:,} jobs took {big.seed_s:.1f} s (not the daemon's "
                          f"work); RSS right after start {big.rss_start_mib:.0f} MiB, highest "
                          f"{big.rss_mib:.0f} MiB; ts -l runs {runs} s")


@dataclass
class TspCap:
    """What task-spooler did when asked to hold a big queue."""

    limit: int  # submits tried at most
    queued: int  # jobs it held (the gate included)
    blocked: bool  # a submit blocked at that size
    list_ms: float | None  # `tsp -l` at that size; None when it blocked too
    server_rss_mib: float
    clients: int  # its background clients, one per queued job
    clients_uss_mib: float

    def refusal(self) -> str:
        """The table's cell: what tsp does with a queue this big."""
        if not self.blocked:
            return f"took {self.queued:,}"
        return f"blocks at {self.queued:,}"

    def describe(self) -> str:
        """One sentence for the notes."""
        if not self.blocked:
            lst = f"{self.list_ms:.1f} ms" if self.list_ms is not None else "blocked"
            return f"took all {self.queued:,} submits tried; tsp -l then took {lst}"
        lst = (f"a `tsp -l` then took {self.list_ms:.1f} ms" if self.list_ms is not None
               else f"a `tsp -l` then blocked too (> {BLOCKED_AFTER_S:.0f} s)")
        return (f"the submit after {self.queued:,} queued jobs did not return within "
                f"{BLOCKED_AFTER_S:.0f} s (its connection limit: one per queued job); {lst}")


def probe_tsp(tsp: str, limit: int) -> TspCap:
    """Fill a fresh tsp server (1 slot, held by a gate) until a submit blocks or `limit`."""
    side = tsp_side(tsp)
    try:
        with side.ctx() as s:
            lock = s.tmp / "gate"
            fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            s.queue("flock", "-s", str(lock), "true")
            ids, full = submit_many(s, ["true"], limit - 1)
            queued = len(ids) + 1
            list_ms: float | None
            try:
                t0 = time.perf_counter()
                s.run("-l", timeout=BLOCKED_AFTER_S)
                list_ms = (time.perf_counter() - t0) * 1000
            except subprocess.TimeoutExpired:
                list_ms = None
            procs = []
            for pid in side.cgroup.pids() if side.cgroup else []:
                with contextlib.suppress(psutil.Error):
                    procs.append(psutil.Process(pid))
            server = min(procs, key=lambda p: (p.create_time(), p.pid)) if procs else None
            rss = server.memory_info().rss / 2**20 if server else float("nan")
            uss = 0.0
            for p in procs:
                if p is not server:
                    with contextlib.suppress(psutil.Error):
                        uss += p.memory_full_info().uss / 2**20
            os.close(fd)
        return TspCap(limit, queued, full, list_ms, rss, len(procs) - 1, uss)
    finally:
        side.close()


def parse(argv: list[str]) -> argparse.Namespace:
    """Options; --quick shrinks every size not given explicitly."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small sizes: a run in under 3 minutes")
    p.add_argument("--rows", default=",".join(ROWS), help=f"groups, from {','.join(ROWS)}")
    p.add_argument("--jobs", type=int, help="jobs per dispatch run (1000; quick 300)")
    p.add_argument("--reps", type=int, help="dispatch runs per spooler and slot count (3; 1)")
    p.add_argument("--runs", type=int, help="client starts timed per command (15; 7)")
    p.add_argument("--big", type=int, help="jobs in tsd's big queue (100000; 20000)")
    p.add_argument("--list-runs", type=int, help="ts -l runs on the big queue (3; 2)")
    p.add_argument("--tsp-probe", type=int, help="most submits tried on tsp (3000; 1500)")
    p.add_argument("--outputs", metavar="DIR",
                   help="where both spoolers' job outputs go (TMPDIR), e.g. a tmpfs; "
                        "default: beside tsd's state, and /tmp for tsp")
    p.add_argument("--editable", action="store_true",
                   help="use this checkout's .venv `ts` instead of a fresh regular install")
    args = p.parse_args(argv)
    defaults = {"jobs": (1000, 300), "reps": (3, 1), "runs": (15, 7), "big": (100_000, 20_000),
                "list_runs": (3, 2), "tsp_probe": (3000, 1500)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = set(args.rows) - set(ROWS)
    if bad:
        p.error(f"unknown rows {sorted(bad)}; choose from {','.join(ROWS)}")
    return args


def main(argv: list[str]) -> None:
    args = parse(argv)
    tsp = ensure_tsp()
    t_start = time.perf_counter()
    venv: Path | None = None
    if args.editable:
        ts, python = TS, sys.executable
    else:
        progress("installing tsd into a throwaway venv (regular install, byte-compiled)")
        venv = installed_venv()
        ts, python = str(venv / "bin" / "ts"), str(venv / "bin" / "python")
    bench = Bench(args, ts, python, tsp)
    try:
        for group in ROWS:
            if group in args.rows:
                if group == "big":
                    bench.big_rows(ts)
                else:
                    getattr(bench, f"{group}_rows")()
    finally:
        bench.close()
        if venv is not None:
            shutil.rmtree(venv, ignore_errors=True)
    print(f"tsd (personal) vs tsp {tsp}, medians of interleaved runs; dispatch {args.jobs} jobs "
          f"x {args.reps} runs, client starts x {args.runs}; {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}; {time.perf_counter() - t_start:.0f} s in all")
    print_table(bench.rows)
    for note in bench.notes:
        print(f"  - {note}")


if __name__ == "__main__":
    main(sys.argv[1:])

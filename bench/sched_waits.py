"""Where a dispatch leaves the CPUs idle, tsd beside tsp: the kernel's scheduler events.

vs_tsp.py's dispatch rows give jobs/s and CPU per job. At 2 slots tsd spends no
more CPU per job than tsp and still runs fewer jobs per second: the difference is
time the CPUs sit idle while a job's next step waits. This bench records the
scheduler (`perf sched record`, every CPU) over one dispatch of each spooler,
interleaved, and reads it back (`perf sched timehist`) over the span from the
first `true` job's start to the last one's end:

  idle        share of all CPUs' time spent idle
  run         CPU ms per job of each kind of process: the spooler's own (tsd: comm
              "python", its daemon, spawner, supervisors and the jobs' children
              before their exec; tsp: comm "tsp", its server, the client that waits
              for each job and the children before exec), the jobs ("true") and
              the rest (gates, ts -w, kernel threads)
  delay       ms per job that processes of that kind waited runnable for a CPU
  delay/idle  the part of that delay during which another CPU was idle: what a
              better placement could have run at once
  server      the share of the idle time during which another CPU ran the
              spooler's busiest process (tsd's daemon, tsp's server): a CPU with
              nothing to run while every slot waits on that one process

Each number is per job of the run; the medians over --reps runs follow.
perf itself costs both spoolers alike (their rates are lower than in vs_tsp.py).
Needs root (perf sched record) and perf; task-spooler is installed as vs_tsp.py
installs it.

Usage: .venv/bin/python bench/sched_waits.py [--slots S] [--jobs N] [--reps R]
           [--outputs DIR]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from common import TS
from spoolers import dispatch, ensure_tsp
from vs_tsp import Side, tsd_side, tsp_side

# "time [cpu] task  wait  sch-delay  run" (ms), as perf sched timehist prints a switch.
_SWITCH = re.compile(r"^\s*(\d+\.\d+)\s+\[(\d+)\]\s+(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")
KINDS = ("spooler", "jobs", "other")


@dataclass
class Span:
    """A task's time on one CPU, and the wait for it just before (seconds)."""

    task: str
    cpu: int
    start: float
    end: float
    delay: float


@dataclass
class Reading:
    """One dispatch, read back."""

    jobs_per_s: float
    idle: float  # share of all CPUs
    idle_server: float = 0.0  # share of the idle time another CPU ran the busiest spooler task
    run: dict[str, float] = field(default_factory=dict)  # kind -> ms per job
    delay: dict[str, float] = field(default_factory=dict)
    delay_idle: dict[str, float] = field(default_factory=dict)


def kind_of(task: str, spooler: str) -> str:
    """Which kind of process a timehist task name ("comm[pid]") is."""
    comm = task.rsplit("[", 1)[0]
    if comm == "true":
        return "jobs"
    own = ("python", "python3") if spooler == "tsd" else ("tsp",)
    return "spooler" if comm in own or comm.startswith("python3.") else "other"


def parse(timehist: str) -> list[Span]:
    """The switches of `perf sched timehist` output."""
    spans = []
    for line in timehist.splitlines():
        m = _SWITCH.match(line)
        if m:
            t, cpu, task = float(m[1]), int(m[2]), m[3]
            run, delay = float(m[6]) / 1000, float(m[5]) / 1000
            spans.append(Span(task, cpu, t - run, t, delay))
    return spans


def read(spans: list[Span], spooler: str, jobs: int, seconds: float) -> Reading:
    """Idle share, run and delays per kind, over the jobs' span."""
    true_spans = [s for s in spans if s.task.startswith("true[")]
    if not true_spans:
        raise RuntimeError("no `true` job in the record")
    a, b = min(s.start for s in true_spans), max(s.end for s in true_spans)
    cpus = {s.cpu for s in spans}
    idle_on: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for s in spans:
        if s.task == "<idle>":
            idle_on[s.cpu].append((s.start, s.end))

    def clip(x: float, y: float) -> float:
        return max(0.0, min(y, b) - max(x, a))

    # A CPU's idle spans do not overlap: in start order their ends are in order too,
    # so the spans a wait overlaps are found by bisection, not by a scan of them all.
    for iv in idle_on.values():
        iv.sort()
    ends = {c: [e for _, e in iv] for c, iv in idle_on.items()}

    def idle_elsewhere(cpu: int, x: float, y: float) -> float:
        total = 0.0
        for c, iv in idle_on.items():
            if c == cpu:
                continue
            i = bisect_right(ends[c], x)
            while i < len(iv) and iv[i][0] < y:
                total += clip(max(x, iv[i][0]), min(y, iv[i][1]))
                i += 1
        return total

    idle = sum(clip(s, e) for iv in idle_on.values() for s, e in iv)
    out = Reading(jobs / seconds, idle / (len(cpus) * (b - a)))
    for k in KINDS:
        out.run[k] = out.delay[k] = out.delay_idle[k] = 0.0
    own: dict[str, float] = defaultdict(float)  # the spooler's tasks: CPU time each
    for s in spans:
        if s.task == "<idle>":
            continue
        k = kind_of(s.task, spooler)
        ran = clip(s.start, s.end)
        out.run[k] += ran
        if k == "spooler":
            own[s.task] += ran
        waited = clip(s.start - s.delay, s.start) if s.delay else 0.0
        if waited:
            out.delay[k] += waited
            out.delay_idle[k] += idle_elsewhere(s.cpu, s.start - s.delay, s.start)
    for d in (out.run, out.delay, out.delay_idle):
        for k in d:
            d[k] *= 1000 / jobs
    if own and idle:
        # The other CPUs' idle time while the busiest spooler task (its server) ran.
        server = max(own, key=lambda t: own[t])
        beside = sum(idle_elsewhere(s.cpu, s.start, s.end) for s in spans if s.task == server)
        out.idle_server = beside / idle
    return out


def one_run(side: Side, jobs: int, slots: int, workdir: Path) -> Reading:
    """One dispatch (spoolers.dispatch), the scheduler recorded over it: its meter, read
    once as the jobs are released and once after the last one ended, starts perf at the
    first reading and stops it at the second."""
    data = workdir / f"{side.name}.data"
    rec: list[subprocess.Popen[bytes]] = []

    def meter() -> float:
        if not rec:
            rec.append(subprocess.Popen(["perf", "sched", "record", "-o", str(data)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)  # perf's own start stays out of the span
        else:
            rec[0].send_signal(2)
            rec[0].wait()
        return side.cpu_s()

    try:
        with side.ctx() as s:
            r = dispatch(s, jobs, slots, meter)
    finally:
        if rec and rec[0].poll() is None:  # the dispatch failed between the readings
            rec[0].send_signal(2)
            rec[0].wait()
    if r.full:
        raise RuntimeError(f"{side.name}: its queue got full; ask for fewer --jobs")
    hist = subprocess.run(["perf", "sched", "timehist", "-i", str(data)], capture_output=True,
                          text=True, check=True).stdout
    data.unlink()
    return read(parse(hist), side.name, r.jobs, r.seconds)


def show(name: str, r: Reading) -> str:
    """One line for one reading."""
    parts = [f"{name}: {r.jobs_per_s:6.0f} jobs/s  idle {100 * r.idle:4.1f}% "
             f"(server {100 * r.idle_server:3.0f}%)"]
    for k in KINDS:
        parts.append(f"{k} run {r.run[k]:.3f} delay {r.delay[k]:.3f} "
                     f"(idle {r.delay_idle[k]:.3f})")
    return "  ".join(parts)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=900,
                    help="tsp blocks submits past ~1,000 queued")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--outputs", default="/dev/shm", help="the jobs' outputs (TMPDIR) under it")
    args = ap.parse_args(argv)
    if shutil.which("perf") is None:
        sys.exit("sched_waits: needs perf (Debian: linux-perf)")
    sides = [tsd_side(TS, args.outputs), tsp_side(ensure_tsp(), args.outputs)]
    got: dict[str, list[Reading]] = {"tsd": [], "tsp": []}
    workdir = Path(tempfile.mkdtemp(prefix="tsd-bench-sched-"))
    try:
        for side in sides:  # a first dispatch each: the pools and caches warm
            with side.ctx() as s:
                dispatch(s, 200, args.slots, side.cpu_s)
        print(f"{args.jobs} true jobs on {args.slots} slots; per job: CPU ms run, ms waited "
              "runnable (of it, ms while another CPU was idle)", flush=True)
        for rep in range(args.reps):
            for side in sides if rep % 2 == 0 else sides[::-1]:
                r = one_run(side, args.jobs, args.slots, workdir)
                got[side.name].append(r)
                print(show(side.name, r), flush=True)
        print("medians:")
        for name, rs in got.items():
            med = Reading(statistics.median(r.jobs_per_s for r in rs),
                          statistics.median(r.idle for r in rs),
                          statistics.median(r.idle_server for r in rs))
            for k in KINDS:
                med.run[k] = statistics.median(r.run[k] for r in rs)
                med.delay[k] = statistics.median(r.delay[k] for r in rs)
                med.delay_idle[k] = statistics.median(r.delay_idle[k] for r in rs)
            print(show(name, med))
    finally:
        for side in sides:
            side.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])

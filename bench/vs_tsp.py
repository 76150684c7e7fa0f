"""tsd (personal mode) side by side with C task-spooler (`tsp`), in the same run.

Each row of the performance table is measured for both spoolers, interleaved, and
printed with its ratio: tsd/tsp, and for client starts also tsd/`python -c pass`.
Nothing is asserted; the machine is shared and noisy, so read the ratios.

Rows:
  dispatch        1,000 `true` jobs queued behind a blocker, then released: jobs/s
                  (2 and 16 slots), and CPU per job (spooler + supervisors + jobs)
  client start    `ts -l` (10 jobs listed) and `ts -n true`, wall ms
  end -> -w       a job ends; how long until a waiting `ts -w` returns
  submit -> run   a free slot; from the client's start to the job's first instruction

`tsp` is Debian's task-spooler package; the script installs it with apt as root
when it is missing. Usage: .venv/bin/python bench/vs_tsp.py [jobs] [runs]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import TS, PersonalDaemon

TSP = "tsp"


def ensure_tsp() -> str:
    """The path of Debian's tsp, installing the package when we may."""
    found = shutil.which(TSP)
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "task-spooler"], check=True,
                       stdout=subprocess.DEVNULL, env={**os.environ,
                                                        "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which(TSP)
    if not found:
        sys.exit("bench: tsp (Debian's task-spooler) is not installed")
    return found


class Spooler:
    """One spooler under test: how to call its client, where its server is."""

    def __init__(self, name: str, argv0: str, env: dict[str, str],
                 stop: Callable[[], None], tmp: Path) -> None:
        self.name, self.argv0, self.env, self.tmp = name, argv0, env, tmp
        self.stop = stop

    def run(self, *args: str, check: bool = True) -> str:
        return subprocess.run([self.argv0, *args], env=self.env, check=check,
                              capture_output=True, text=True).stdout

    def queue(self, *args: str) -> int:
        return int(self.run(*args).strip())



def tsd_spooler() -> Spooler:
    d = PersonalDaemon(TS_SLOTS="1", TS_MAXCONN="100000")
    d.env.pop("PYTHONDONTWRITEBYTECODE", None)
    s = Spooler("tsd", TS, d.env, d.stop, d.root / "tmp")
    s.run("-l")  # start the daemon
    return s


def tsp_spooler() -> Spooler:
    root = Path(tempfile.mkdtemp(prefix="tsp-bench-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    env.update(TMPDIR=str(root), TS_SOCKET=str(root / "sock"), TS_SLOTS="1",
               TS_MAXFINISHED="100000")
    argv0 = ensure_tsp()
    subprocess.run([argv0, "-l"], env=env, check=True, capture_output=True)

    def stop() -> None:
        subprocess.run([argv0, "-K"], env=env, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    return Spooler("tsp", argv0, env, stop, root)


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat.

    task-spooler runs each job from a backgrounded client, not from its server, so
    only a machine-wide count charges both spoolers alike; run on a quiet machine.
    """
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def dispatch(s: Spooler, n: int, slots: int) -> tuple[float, float]:
    """Jobs/s and CPU ms per job for n `true` jobs (output kept) released at once onto `slots`.

    CPU is the machine's busy time over the run: whatever ran the jobs, whoever forked it.
    """
    s.run("-S", "1")
    gate = s.tmp / f"gate-{time.monotonic_ns()}"
    s.queue("sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.005; done")
    last = 0
    for _ in range(n):
        last = s.queue("true")
    s.run("-S", str(slots))
    cpu0 = busy_seconds()
    t0 = time.perf_counter()
    gate.touch()
    s.run("-w", str(last), check=False)
    elapsed = time.perf_counter() - t0
    cpu = busy_seconds() - cpu0
    s.run("-C")
    return n / elapsed, cpu / n * 1000


def end_to_wait(s: Spooler) -> float:
    """ms from a job's last instruction to the return of a `-w` already waiting on it."""
    s.run("-S", "4")
    stamp = s.tmp / f"end-{time.monotonic_ns()}"
    job = s.queue("sh", "-c", f"sleep 0.3; date +%s.%N > {stamp}")
    subprocess.run([s.argv0, "-w", str(job)], env=s.env, capture_output=True)
    returned = time.time()
    return (returned - float(stamp.read_text())) * 1000


def submit_to_start(s: Spooler) -> float:
    """ms from the client's start to the job's first instruction, with a free slot."""
    s.run("-S", "4")
    stamp = s.tmp / f"start-{time.monotonic_ns()}"
    t0 = time.time()
    job = s.queue("sh", "-c", f"date +%s.%N > {stamp}")
    s.run("-w", str(job), check=False)
    return (float(stamp.read_text()) - t0) * 1000


def wall_ms(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter() - t0) * 1000


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def row(name: str, unit: str, a: float, b: float, better_high: bool = False) -> None:
    ratio = a / b if b else float("nan")
    note = "(higher is better)" if better_high else ""
    print(f"{name:34} tsd {a:9.2f} {unit:5} tsp {b:9.2f} {unit:5} tsd/tsp {ratio:6.2f}x {note}")


def main(n: int = 1000, runs: int = 15) -> None:
    tsd, tsp = tsd_spooler(), tsp_spooler()
    try:
        print(f"tsd vs tsp, {n} jobs per dispatch run, medians of interleaved runs")
        for slots in (2, 16):
            rates: dict[str, list[float]] = {"tsd": [], "tsp": []}
            cpus: dict[str, list[float]] = {"tsd": [], "tsp": []}
            for _ in range(3):
                for s in (tsd, tsp):
                    rate, cpu = dispatch(s, n, slots)
                    rates[s.name].append(rate)
                    cpus[s.name].append(cpu)
            row(f"dispatch, {slots} slots", "job/s", med(rates["tsd"]), med(rates["tsp"]), True)
            row(f"CPU per dispatched job, {slots} slots", "ms", med(cpus["tsd"]), med(cpus["tsp"]))
        for s in (tsd, tsp):
            s.run("-S", "4")
            for _ in range(10):
                s.queue("true")
            s.run("-w", check=False)
        bare, lists, submits = [], {"tsd": [], "tsp": []}, {"tsd": [], "tsp": []}
        for _ in range(runs):
            bare.append(wall_ms([sys.executable, "-c", "pass"], tsd.env))
            for s in (tsd, tsp):
                lists[s.name].append(wall_ms([s.argv0, "-l"], s.env))
                submits[s.name].append(wall_ms([s.argv0, "-n", "true"], s.env))
        print(f"{'python -c pass':34} {med(bare):9.2f} ms")
        row("ts -l (10+ jobs)", "ms", med(lists["tsd"]), med(lists["tsp"]))
        print(f"{'':34} tsd/python {med(lists['tsd']) / med(bare):.2f}x")
        row("ts -n true", "ms", med(submits["tsd"]), med(submits["tsp"]))
        print(f"{'':34} tsd/python {med(submits['tsd']) / med(bare):.2f}x")
        ends: dict[str, list[float]] = {"tsd": [], "tsp": []}
        starts: dict[str, list[float]] = {"tsd": [], "tsp": []}
        for _ in range(max(3, runs // 3)):
            for s in (tsd, tsp):
                ends[s.name].append(end_to_wait(s))
                starts[s.name].append(submit_to_start(s))
        row("job end -> ts -w returns", "ms", med(ends["tsd"]), med(ends["tsp"]))
        row("submit -> job starts (free slot)", "ms", med(starts["tsd"]), med(starts["tsp"]))
    finally:
        tsd.stop()
        tsp.stop()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))

"""Spooler-neutral measurements for the side-by-side benchmarks (standard library only).

One `Spooler` is a ts-compatible client (tsd's `ts` or task-spooler's `tsp`) with
the environment that selects its server. The functions here drive either one the
same way and time it. vs_tsp.py uses them on this machine; system_dispatch.py
copies this file into a booted box and runs it there as an ordinary user, so it
must keep to the standard library and python3 as Debian ships it.

How a dispatch run works (`dispatch`): `slots` gate jobs (`flock -s LOCK true`)
take every slot while the bench holds LOCK exclusively; N `true` jobs queue
behind them; a `-w` on the last job starts and settles into its wait; the clock
starts when the bench drops the lock (every gate ends at once, nothing polls) and
stops when that `-w` returns. CPU is what
the meter says was spent meanwhile: the spooler's cgroup where there is one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# A submit that has not returned after this long is blocked: task-spooler's server
# stops accepting connections once it holds its maximum (one per queued job).
BLOCKED_AFTER_S = 5.0


class QueueFull(Exception):
    """A submit did not return in time: the spooler takes no more jobs now."""


def ensure_tsp() -> str:
    """The path of Debian's tsp, installing the package when we may."""
    found = shutil.which("tsp")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "task-spooler"], check=True,
                       stdout=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("tsp")
    if not found:
        sys.exit("bench: tsp (Debian's task-spooler) is not installed")
    return found


@dataclass
class Spooler:
    """A ts-compatible client and the environment that points it at its server."""

    name: str
    argv0: str
    env: dict[str, str]
    tmp: Path

    def run(self, *args: str, check: bool = True, timeout: float | None = None) -> str:
        """Run the client with `args`; its stdout."""
        return subprocess.run(
            [self.argv0, *args], env=self.env, check=check, capture_output=True, text=True,
            timeout=timeout,
        ).stdout

    def queue(self, *args: str, timeout: float | None = None) -> int:
        """Submit a job; its id. QueueFull when the submit blocks past `timeout`."""
        try:
            out = self.run(*args, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise QueueFull(f"{self.name}: a submit blocked for {timeout} s") from None
        return int(out.strip().split()[-1])


def submit_many(s: Spooler, argv: list[str], n: int, workers: int = 4,
                timeout: float = BLOCKED_AFTER_S) -> tuple[list[int], bool]:
    """Submit `argv` n times, `workers` clients at once; (sorted ids, whether it got full).

    Several clients at once only make the setup faster; the timed part of a run
    starts after every submit has returned. Once one submit blocks, no more start.
    """
    full = threading.Event()

    def one(_: int) -> int | None:
        if full.is_set():
            return None
        try:
            return s.queue(*argv, timeout=timeout)
        except QueueFull:
            full.set()
            return None

    with ThreadPoolExecutor(workers) as pool:
        ids = [i for i in pool.map(one, range(n)) if i is not None]
    return sorted(ids), full.is_set()


@dataclass
class DispatchResult:
    """One dispatch run."""

    jobs: int  # `true` jobs released (fewer than asked when the spooler got full)
    seconds: float  # gate released -> `-w` on the last job returned
    cpu_seconds: float  # by the meter, over the same span
    full: bool  # the spooler refused (blocked) a submit while queueing

    @property
    def rate(self) -> float:
        """Jobs per second."""
        return self.jobs / self.seconds

    @property
    def cpu_ms_per_job(self) -> float:
        """CPU milliseconds per dispatched job."""
        return self.cpu_seconds / self.jobs * 1000


@contextlib.contextmanager
def slots_held(
    slots: int, tmp: Path, set_slots: Callable[[int], object], queue: Callable[..., object]
) -> Iterator[None]:
    """`slots` slots (set_slots), every one held by a gate job (queue) that waits on a
    lock held here: what is queued inside the block starts only once it ends.

    One gate for several slots would let the other slots run the queued jobs before
    a measurement starts."""
    set_slots(slots)
    lock = tmp / f"gate-{time.monotonic_ns()}"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for _ in range(slots):
            queue("flock", "-s", str(lock), "true")
        yield
    finally:
        os.close(fd)  # the lock goes with it: the gates end, the jobs start
        lock.unlink()


def dispatch(s: Spooler, n: int, slots: int, cpu: Callable[[], float],
             set_slots: Callable[[int], None] | None = None,
             workers: int = 4) -> DispatchResult:
    """Queue n `true` jobs behind `slots` gates, release them, time until the last one ended.

    `cpu` reads the meter (seconds); `set_slots` sets the slot count (default `-S`).
    """
    with slots_held(
        slots, s.tmp, set_slots or (lambda k: s.run("-S", str(k))),
        lambda *argv: s.queue(*argv, timeout=BLOCKED_AFTER_S),
    ):
        ids, full = submit_many(s, ["true"], n, workers)
        if not ids:
            raise QueueFull(f"{s.name}: no job could be queued behind the gates")
        # The `-w` client starts, and settles into its wait, before the release: the
        # window holds the dispatch, not a client's own start (a C program's ~1 ms for
        # tsp, a Python's 10-25 ms of CPU for tsd, which would compete with the jobs).
        # Client starts have rows of their own.
        waiter = subprocess.Popen([s.argv0, "-w", str(ids[-1])], env=s.env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        settled(waiter.pid)
        cpu0 = cpu()
        t0 = time.perf_counter()
    waiter.wait()
    elapsed = time.perf_counter() - t0
    used = cpu() - cpu0
    clear_finished(s)
    return DispatchResult(len(ids), elapsed, used, full)


def settled(pid: int, most: float = 10.0) -> None:
    """Return once process `pid` sleeps and its CPU time stood still for 50 ms (it
    waits on its server), or has exited, or after `most` seconds."""
    deadline = time.monotonic() + most
    last = None
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return
        now = (fields[0], int(fields[11]) + int(fields[12]))  # state, utime + stime
        if now[0] == "Z" or (now[0] == "S" and now == last):
            return
        last = now
        time.sleep(0.05)


def clear_finished(s: Spooler, tries: int = 20) -> None:
    """`-C`, retried: once (in a box, after its queue had been full) tsp's -C exited 255."""
    for _ in range(tries):
        r = subprocess.run([s.argv0, "-C"], env=s.env, capture_output=True, text=True)
        if r.returncode == 0:
            return
        time.sleep(0.25)
    print(f"bench: {s.name} -C kept failing: {r.stderr.strip()}", file=sys.stderr)


# How long end_to_wait_ms's job sleeps: the machine is nearly idle meanwhile.
END_JOB_SLEEP = 0.3


def end_to_wait_ms(s: Spooler) -> float:
    """ms from a job's last instruction to the return of a `-w` already waiting on it."""
    stamp = s.tmp / f"end-{time.monotonic_ns()}"
    job = s.queue("sh", "-c", f"sleep {END_JOB_SLEEP}; date +%s.%N > {stamp}")
    s.run("-w", str(job), check=False)
    returned = time.time()
    return (returned - float(stamp.read_text())) * 1000


def submit_to_start_ms(s: Spooler) -> float:
    """ms from the client's start to the job's first instruction, with a free slot."""
    stamp = s.tmp / f"start-{time.monotonic_ns()}"
    t0 = time.time()
    job = s.queue("sh", "-c", f"date +%s.%N > {stamp}")
    s.run("-w", str(job), check=False)
    return (float(stamp.read_text()) - t0) * 1000


def fdatasync_ms(fd: int, size: int = 20480) -> float:
    """ms of one fdatasync after appending `size` bytes to `fd` (a job's end appends
    about 20 KB to tsd's WAL: five pages and their frame headers)."""
    os.write(fd, b"\0" * size)
    t0 = time.perf_counter()
    os.fdatasync(fd)
    return (time.perf_counter() - t0) * 1000


def wall_ms(argv: list[str], env: dict[str, str]) -> float:
    """Wall ms of one run of a command (output discarded)."""
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter() - t0) * 1000


def med(xs: Iterable[float]) -> float:
    """Median (nan for none)."""
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def cgroup_usage_s(cgroup: Path) -> float:
    """CPU seconds spent by every process that ever ran in a cgroup2 group (and below)."""
    for line in (cgroup / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) / 1e6
    raise OSError(f"{cgroup}/cpu.stat has no usage_usec")


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def machine_switches() -> int:
    """Context switches of the whole machine since boot, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("ctxt "):
            return int(line.split()[1])
    return 0


def cgroup_usages(root: Path, depth: int = 3) -> dict[str, float]:
    """usage seconds of `root` and of its groups down to `depth` levels, by relative path."""
    out: dict[str, float] = {}

    def walk(p: Path, level: int) -> None:
        with contextlib.suppress(OSError):
            out[str(p.relative_to(root)) if p != root else "."] = cgroup_usage_s(p)
        if level < depth:
            with contextlib.suppress(OSError):
                for child in sorted(p.iterdir()):
                    if child.is_dir():
                        walk(child, level + 1)

    walk(root, 0)
    return out

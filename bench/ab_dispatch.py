"""A/B of tsd source trees on one dispatch: which of two changes is cheaper per job.

Each tree (a directory holding `tsd/`, or a git revision, checked out for the run in a
detached worktree) gets a personal daemon of its own, all running side by side; the
rounds interleave them (ABBA...), so that the machine's noise falls on all alike.
One round: N `true` jobs queued with one `ts --array` (the submits take no time)
behind S jobs that hold the S slots on a lock, then the lock released; the round
ends when `ts -w` on the last job returns. A first round of 200 jobs per tree, not
counted, grows its pool of supervisors.

Printed per tree, medians over the rounds: jobs/s; CPU ms per job of the daemon, of
its live descendants (the spawner, the reused supervisors) and of what they reaped
(the jobs), from /proc, so other load does not count; and context switches per job
of the daemon and its live descendants (voluntary and not), which unlike time do
not move with the noise. Then each round's jobs/s and daemon and supervisor CPU.

On these shared 2-core machines a throughput difference under ~5% is noise even
over 10 rounds; the CPU split and the switches say more. Daemons side by side
sometimes disturb each other (one's CPU per job jumps by half mid-run, never with
one daemon alone): `--solo` runs one at a time instead, a fresh daemon per tree
and round (warmed as above, then stopped), alternating the trees (ABBA...).

Usage: .venv/bin/python bench/ab_dispatch.py [--slots S] [--jobs N] [--rounds R] [--solo]
           [--env NAME=VALUE ...] TREE_OR_REV [TREE_OR_REV ...]
e.g.   .venv/bin/python bench/ab_dispatch.py --slots 16 HEAD~1 .
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from common import PersonalDaemon, slots_held
from dispatch_cpu import descendants, tree_cpu

REPO = Path(__file__).resolve().parent.parent


def switches(daemon: int) -> int:
    """Context switches so far of the daemon and its live descendants."""
    total = 0
    for pid in [daemon, *descendants(daemon)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
    return total


def one_round(d: PersonalDaemon, jobs: int, slots: int) -> tuple[float, ...]:
    """(jobs/s, daemon ms/job, supervisors ms/job, jobs ms/job, switches/job)."""
    with slots_held(d, slots):
        last = d.ts("--array", f"1-{jobs}", "true").split()[-1]
        pid = d.pid()
        cpu0, sw0 = tree_cpu(pid), switches(pid)
        t0 = time.perf_counter()
    d.ts("-w", last)
    elapsed = time.perf_counter() - t0
    time.sleep(0.2)  # the last supervisors have reaped their jobs
    cpu1, sw1 = tree_cpu(pid), switches(pid)
    d.ts("-C")
    own, live, reaped = ((a - b) / jobs * 1000 for a, b in zip(cpu1, cpu0, strict=True))
    return jobs / elapsed, own, live, reaped, (sw1 - sw0) / jobs


@contextlib.contextmanager
def checked_out(spec: str) -> Iterator[Path]:
    """A tree to import tsd from: `spec` itself when it holds tsd/, else that git
    revision in a detached worktree, removed afterwards."""
    if (Path(spec) / "tsd" / "__init__.py").is_file():
        yield Path(spec).resolve()
        return
    rev = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", "-q", f"{spec}^{{commit}}"],
        capture_output=True, text=True,
    )
    if rev.returncode != 0:
        raise SystemExit(f"ab_dispatch: {spec!r} is neither a directory holding tsd/ "
                         "nor a git revision")  # fmt: skip
    where = Path(tempfile.mkdtemp(prefix="tsd-ab-"))
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(where),
                    rev.stdout.strip()], check=True)  # fmt: skip
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)],
                       check=False)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs="+", help="a directory holding tsd/, or a git revision")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="for every daemon, e.g. TS_MAXFINISHED=100 (each end then forgets one)")
    ap.add_argument("--solo", action="store_true",
                    help="one daemon at a time, a fresh one per tree and round")
    args = ap.parse_args()
    extra = dict(e.split("=", 1) for e in args.env)
    with contextlib.ExitStack() as stack:
        trees = [stack.enter_context(checked_out(t)) for t in args.trees]
        for tree in trees:
            # Byte-compiled alike: a tree without .pyc files (a new worktree, with
            # PYTHONDONTWRITEBYTECODE set) would compile tsd at every `ts` it serves.
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "tsd")],
                           check=True)  # fmt: skip

        def started(tree: Path) -> PersonalDaemon:
            # PYTHONPATH puts this tree's tsd ahead of the venv's: the daemon, its
            # spawner and the supervisors all load it (the spawner from the daemon's).
            d = PersonalDaemon(outputs="/dev/shm", PYTHONPATH=str(tree), TS_SLOTS="1",
                               TS_MAXCONN="100000", **extra)  # fmt: skip
            d.ts("-l")
            one_round(d, 200, args.slots)  # not counted: the supervisors' pool grows here
            return d

        daemons = []
        if not args.solo:
            for tree in trees:
                daemons.append(started(tree))
                stack.callback(daemons[-1].stop)
        rows: list[list[tuple[float, ...]]] = [[] for _ in trees]
        for r in range(args.rounds):
            order = list(range(len(trees)))
            for i in order if r % 2 == 0 else order[::-1]:
                if not args.solo:
                    rows[i].append(one_round(daemons[i], args.jobs, args.slots))
                    continue
                d = started(trees[i])
                try:
                    rows[i].append(one_round(d, args.jobs, args.slots))
                finally:
                    d.stop()
    how = "rounds, one daemon at a time" if args.solo else "interleaved rounds"
    print(f"{args.jobs} true jobs on {args.slots} slots, {args.rounds} {how}; "
          f"medians; CPU ms per job; load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for spec, got in zip(args.trees, rows, strict=True):
        rate, own, live, reaped, sw = (statistics.median(x[k] for x in got) for k in range(5))
        print(f"{spec:>14}  {rate:6.0f} jobs/s  daemon {own:.3f}  supervisors {live:.3f}  "
              f"jobs {reaped:.3f}  total {own + live + reaped:.3f}  switches {sw:.2f}")
        print(" " * 16 + "rounds: " + " ".join(f"{x[0]:.0f}/{x[1]:.2f}/{x[2]:.2f}" for x in got))


if __name__ == "__main__":
    main()

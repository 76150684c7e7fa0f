"""Upper bounds of changes to tsd's dispatch, measured on throwaway copies of its tree.

Before a change to the job's start and end is built for real (crash paths, tests),
its best case can be measured: a copy of `tsd/` with the change made in its
simplest, unsafe form (the happy path only, or a feature deleted outright), run by
ab_dispatch.py beside this tree, interleaved. A bound that gains nothing rules the
change out; one that gains says what the real change could be worth at most.

Each bound is a list of edits: a piece of text in a file of `tsd/` and what replaces
it. A bound whose text is no longer in the tree (the code moved on) says so and is
left out of the run; it is measured against the tree it was written for.

  ahead      the daemon off the slots' path: its slot count doubled, its supervisors
             held to the real count (--slots), each sent a second job while its first
             runs and starting it at the first's end without waiting for the daemon's
             answer (taken as ACK)
  ahead-told ahead, with a line on the job's report pipe before each start, which
             the daemon wakes for and reads (the "taking" of the deadline design in
             bench/README.md)
  batch      ahead, with 4 jobs per supervisor and the report pipes read only once a
             1 ms timer ran out since one came ready: the ends of 1 ms in one turn
  no-log     the log line of a job's end deleted
  no-acct    a job's accounting row (and the usage it owes) deleted
  no-env     the SELECT of a job's environment made once (every job gets the first's)
  daemon3    no-log, no-acct and no-env together
  lean-sup   a supervisor's wait and report cut to dispatch_floor.py's helper's:
             waitpid, one fixed line of JSON (no timeout, ts -k, leftovers, records)
  no-save    no savepoint for a grouped write after the group's first

Usage: .venv/bin/python bench/bounds.py [--slots S] [--jobs N] [--rounds R] [BOUND ...]
e.g.   .venv/bin/python bench/bounds.py --slots 2 --rounds 6 ahead daemon3
(no BOUND: every one; bench/README.md, "Latency or CPU", has the results)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The real slot count, for the bounds that run more jobs than slots (ahead, batch).
# Only the daemon reads it: the spawner starts with an empty environment, so an edit
# of the supervisors' code must not depend on a variable (an edit switched on by one
# would never be on there).
SLOTS_ENV = "TSD_BOUND_SLOTS"


@dataclass(frozen=True)
class Edit:
    """`old`, found exactly once in tsd/`path`, becomes `new`."""

    path: str
    old: str
    new: str


def _ahead(per_supervisor: int) -> list[Edit]:
    """The daemon runs `per_supervisor` jobs per real slot; each supervisor takes them
    in turn, the daemon's answer to each end taken as ACK."""
    return [
        Edit(
            "policy.py",
            "        return self._slots if self._slots is not None else self.config.slots\n",
            "        slots = self._slots if self._slots is not None else self.config.slots\n"
            f"        return slots * {per_supervisor}\n",
        ),
        Edit(
            "supervisorpool.py",
            "        if chosen is not None:\n            chosen.taken = True\n",
            f"        cap = int(os.environ.get({SLOTS_ENV!r}) or 0)\n"
            "        if chosen is None and cap and len(self._members) >= cap:\n"
            "            ready = [m for m in self._members.values() if not m.taken]\n"
            "            chosen = min(ready, key=lambda m: m.busy) if ready else None\n"
            "        if chosen is not None:\n            chosen.taken = True\n",
        ),
        Edit(
            "spawner.py",
            "        return self._kept.popleft() if self._kept else self._read()\n",
            "        while True:\n"
            "            message = self._kept.popleft() if self._kept else self._read()\n"
            "            if message[0] not in (launch.ACK, launch.NAK):\n"
            "                return message\n"
            "\n"
            "    def taken_as_acked(self) -> bytes:\n"
            "        self.acked = True\n"
            "        return launch.ACK\n",
        ),
        Edit(
            "spawner.py",
            "launch.run_job(plan, rep_w, link.answer if launch.acks_end(plan) else None)",
            "launch.run_job(plan, rep_w, link.taken_as_acked if launch.acks_end(plan) else None)",
        ),
    ]


# What the job ahead would add to `ahead`: the supervisor's line on the next job's pipe
# before it starts it (the daemon wakes for it and reads it), at every start.
_TAKING_LINE = Edit(
    "launch.py",
    "    child, out, failure, main_status = _start_job(plan, rep_w)\n",
    '    _report(rep_w, f"taking {time.monotonic()}")\n'
    "    child, out, failure, main_status = _start_job(plan, rep_w)\n",
)
_BATCH_READS = Edit(
    "reportpipe.py",
    "    def _ready(self) -> None:\n        if self._epoll is None:\n            return\n",
    "    _held = False\n"
    "\n"
    "    def _ready(self) -> None:\n"
    "        if not self._held and self._epoll is not None:\n"
    "            self._held = True\n"
    "            self._loop.remove_reader(self._epoll.fileno())\n"
    "            self._loop.call_later(0.001, self._release)\n"
    "            return\n"
    "        self._read_ready()\n"
    "\n"
    "    def _release(self) -> None:\n"
    "        self._held = False\n"
    "        if self._epoll is not None:\n"
    "            self._loop.add_reader(self._epoll.fileno(), self._ready)\n"
    "            self._read_ready()\n"
    "\n"
    "    def _read_ready(self) -> None:\n"
    "        if self._epoll is None:\n"
    "            return\n",
)
_NO_LOG = Edit(
    "runend.py",
    'log.info("job %d finished: %s%s", job_id, summary, took)',
    "pass",
)
_NO_ACCT = Edit(
    "store.py",
    "            self.db.execute(\n"
    '                "INSERT OR IGNORE INTO accounting VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",\n'
    "                (job.id, job.uid, job.user, end, slots, gpus, run, wait, int(failed),\n"
    "                 self._next_seq()),\n"
    "            )\n"
    "        # The Prometheus counters too (see save_run), as the ledger replays them.\n"
    "        self.owe(usage, job.user, run * slots, run * gpus)\n"
    "        self.pay_if_due()\n",
    "            pass\n",
)
_NO_ENV = Edit(
    "store.py",
    '        row = self.db.execute("SELECT env FROM job_envs WHERE id=?", (job_id,)).fetchone()\n',
    "        if self._last_env[1]:\n"
    "            return self._last_env[1]\n"
    '        row = self.db.execute("SELECT env FROM job_envs WHERE id=?", (job_id,)).fetchone()\n',
)
_LEAN_SUP = Edit(
    "launch.py",
    "    child, out, failure, main_status = _start_job(plan, rep_w)\n",
    "    child, out, failure, main_status = _start_job(plan, rep_w)\n"
    "    if child is not None and main_status is None:\n"
    "        code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])\n"
    "        line = (f'pid {child}\\nout {out}\\nend {{\"code\": {code}, '\n"
    '                f\'"end": {time.time()}, "output": "{out}"}}\')\n'
    "        if _report(rep_w, line) and answer is not None and answer() == ACK:\n"
    "            return\n"
    "        raise SystemExit(70)\n",
)
_NO_SAVE = Edit(
    "groupcommit.py",
    '        if self.db.in_transaction:\n            self.db.execute("SAVEPOINT w")\n'
    "            return True\n",
    "        if self.db.in_transaction:\n            return False\n",
)

BOUNDS: dict[str, list[Edit]] = {
    "ahead": _ahead(2),
    "ahead-told": [*_ahead(2), _TAKING_LINE],
    "batch": [*_ahead(4), _BATCH_READS],
    "no-log": [_NO_LOG],
    "no-acct": [_NO_ACCT],
    "no-env": [_NO_ENV],
    "daemon3": [_NO_LOG, _NO_ACCT, _NO_ENV],
    "lean-sup": [_LEAN_SUP],
    "no-save": [_NO_SAVE],
}


def build(name: str, edits: list[Edit], root: Path) -> Path | None:
    """A copy of this tree's tsd/ under root/name with the edits made; None (and a line
    on stderr) when one no longer applies."""
    tree = root / name
    shutil.copytree(REPO / "tsd", tree / "tsd", ignore=shutil.ignore_patterns("__pycache__"))
    for edit in edits:
        path = tree / "tsd" / edit.path
        text = path.read_text()
        if text.count(edit.old) != 1:
            print(f"bounds: {name} no longer applies (tsd/{edit.path} changed): left out",
                  file=sys.stderr)  # fmt: skip
            return None
        path.write_text(text.replace(edit.old, edit.new))
    return tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bounds", nargs="*", help=f"of {', '.join(BOUNDS)} (default: all)")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    unknown = [b for b in args.bounds if b not in BOUNDS]
    if unknown:
        ap.error(f"no bound named {', '.join(unknown)} (there are {', '.join(BOUNDS)})")
    root = Path(tempfile.mkdtemp(prefix="tsd-bounds-"))
    try:
        trees = [t for b in args.bounds or list(BOUNDS) if (t := build(b, BOUNDS[b], root))]
        if not trees:
            raise SystemExit("bounds: nothing left to measure")
        # This tree first: ab_dispatch prints each tree as given, the bounds by name.
        subprocess.run(
            [sys.executable, str(REPO / "bench" / "ab_dispatch.py"), "--slots", str(args.slots),
             "--jobs", str(args.jobs), "--rounds", str(args.rounds),
             "--env", f"{SLOTS_ENV}={args.slots}", str(REPO), *(t.name for t in trees)],
            cwd=root, check=True,
        )  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Upper bounds of changes to tsd's dispatch, measured on throwaway copies of its tree.

Before a change to the job's start and end is built for real (crash paths, tests),
its best case can be measured: a copy of `tsd/` with the change made in its
simplest, unsafe form (the happy path only, or a feature deleted outright), run by
ab_dispatch.py beside this tree, interleaved. A bound that gains nothing rules the
change out; one that gains says what the real change could be worth at most.

Each bound is a list of edits: a piece of text in a file of `tsd/` and what replaces
it. A bound whose text is no longer in the tree (the code moved on) says so and is
left out of the run; it is measured against the tree it was written for. The bounds
that measured the job ahead before tsd/ahead.py built it (ahead, ahead-told, batch)
edited the code it replaced: they are in this script as of commit 225721f.

  no-log     the log line of a job's end deleted
  no-acct    a job's accounting row (and the usage it owes) deleted
  no-env     the SELECT of a job's environment made once (every job gets the first's)
  daemon3    no-log, no-acct and no-env together
  lean-sup   a supervisor's wait and report cut to dispatch_floor.py's helper's:
             waitpid, one fixed line of JSON (no timeout, ts -k, leftovers, records)
  lean-all   daemon3 and lean-sup together: what deleting the per-job features of
             both sides could buy at most
  no-save    no savepoint for a grouped write after the group's first
  no-end     a finished job's end not written at all (its row, accounting, usage):
             what recording the ends after the turn's starts, in a second
             commit, could buy at most (a turn's GOs wait for none of it)

Usage: .venv/bin/python bench/bounds.py [--slots S] [--jobs N] [--rounds R] [--solo] [BOUND ...]
e.g.   .venv/bin/python bench/bounds.py --slots 2 --rounds 6 daemon3 lean-sup
(no BOUND: every one; bench/README.md, "bounds.py", has the results)
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
@dataclass(frozen=True)
class Edit:
    """`old`, found exactly once in tsd/`path`, becomes `new`."""

    path: str
    old: str
    new: str


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
    "        word = answer() if report_line(rep_w, line) and answer is not None else b''\n"
    "        if word == ACK:\n"
    "            return None\n"
    "        if word == LATER:  # a job sent ahead runs: settled at its end\n"
    "            return exitreport.ExitReport(exit=ExitInfo(code=code), end=time.time(),\n"
    "                                         output=out)\n"
    "        raise SystemExit(70)\n",
)
_NO_END = Edit(
    "ledger.py",
    "        self._sync()\n        usage: Usage | None = None\n",
    "        if ran is None and job.state is JobState.FINISHED:\n            return\n"
    "        self._sync()\n        usage: Usage | None = None\n",
)
_NO_SAVE = Edit(
    "groupcommit.py",
    '        if self.db.in_transaction:\n            self.db.execute("SAVEPOINT w")\n'
    "            return True\n",
    "        if self.db.in_transaction:\n            return False\n",
)

BOUNDS: dict[str, list[Edit]] = {
    "no-log": [_NO_LOG],
    "no-acct": [_NO_ACCT],
    "no-env": [_NO_ENV],
    "daemon3": [_NO_LOG, _NO_ACCT, _NO_ENV],
    "lean-sup": [_LEAN_SUP],
    "lean-all": [_NO_LOG, _NO_ACCT, _NO_ENV, _LEAN_SUP],
    "no-save": [_NO_SAVE],
    "no-end": [_NO_END],
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
    ap.add_argument("--solo", action="store_true", help="ab_dispatch's --solo")
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
             *(["--solo"] if args.solo else []), str(REPO), *(t.name for t in trees)],
            cwd=root, check=True,
        )  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

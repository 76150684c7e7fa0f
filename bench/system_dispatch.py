"""Dispatch rate of the SYSTEM service (scopes over D-Bus) vs task-spooler, in a booted box.

Boots systemd in a throwaway overlay root (tests/system/box.py, as the system
tests do; never on this machine's root), installs this checkout's tsd there the
way the system tests do (tests/system/deploy.py: units, sysusers, tmpfiles,
config, socket activation) and then, as the box's ordinary user alice, runs the
dispatch bench of vs_tsp.py (spoolers.dispatch, copied into the box) against:

* tsd: `ts` talking to the root service, each job in its own systemd scope;
* tsp: Debian's task-spooler, a personal server of alice's in the same box.

N `true` jobs queue behind gate jobs that hold every slot and are released at
once; jobs/s is N over the time until `-w` on the last returns. CPU per job is
the whole box's CPU over that time (its cgroup: systemd, D-Bus, journald, the
service, the scopes, tsp and its clients; nothing of the host), with the biggest
consumers listed for tsd. Goal (issue 10): tsd >= 0.5x tsp. Prints, asserts nothing.

Needs root (the box). Usage: .venv/bin/python bench/system_dispatch.py
    [--jobs N (1000)] [--reps R (1)] [--slots 2,16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "system"))

from box import Box  # noqa: E402
from deploy import deploy  # noqa: E402
from spoolers import ensure_tsp  # noqa: E402

# Unlimited per user: the queue limit must not make the submits wait.
CONFIG = """\
slots: 2
admins: [root]
defaults:
  max_queued: 100000
"""

INNER_DIR = "/tmp/tsd-bench"

# Runs in the box as alice with the box's python3: one dispatch run, JSON out.
INNER = r"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spoolers import Spooler, cgroup_usages, dispatch

which, n, slots = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
home = Path(os.environ["HOME"])
tmp = home / f"bench-{which}"
tmp.mkdir(exist_ok=True)
env = dict(os.environ)
if which == "tsp":
    env.update(TMPDIR=str(tmp), TS_SOCKET=str(tmp / "sock"), TS_SLOTS="1",
               TS_MAXFINISHED="100000")
s = Spooler(which, "ts" if which == "tsd" else "tsp", env, tmp)
snaps = []

def cpu():
    snaps.append(cgroup_usages(Path("/sys/fs/cgroup"), depth=2))
    return snaps[-1]["."]

# The slot count of the system service is root's to set: done before this runs.
r = dispatch(s, n, slots, cpu, set_slots=(lambda k: None) if which == "tsd" else None)
delta = {k: v - snaps[0].get(k, 0.0) for k, v in snaps[-1].items()}
print(json.dumps({"jobs": r.jobs, "seconds": r.seconds, "cpu": r.cpu_seconds,
                  "full": r.full, "cgroups": delta}))
"""


def run_once(box: Box, which: str, n: int, slots: int) -> dict[str, object]:
    """One dispatch run in the box as alice; its JSON."""
    if which == "tsd":
        box.run(["ts", "-S", str(slots)])  # as root: an admin
    r = box.run(["python3", f"{INNER_DIR}/inner.py", which, str(n), str(slots)],
                user="alice", timeout=3600)
    result: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description="system service dispatch vs tsp in a booted box")
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--slots", default="2,16")
    args = p.parse_args()
    ok, why = Box.can_boot()
    if not ok:
        raise SystemExit(f"system_dispatch: {why}")
    ensure_tsp()  # the box sees this machine's files: installed here, it is there
    slot_counts = [int(x) for x in args.slots.split(",")]
    results: dict[tuple[str, int], list[dict[str, object]]] = {}
    with Box.start(REPO) as box:
        print(f"box booted in {box.boot_seconds:.2f} s", file=sys.stderr)
        deploy(box, CONFIG)
        spoolers_src = (Path(__file__).parent / "spoolers.py").read_text()
        box.write_file(f"{INNER_DIR}/spoolers.py", spoolers_src, mode=0o755)
        box.write_file(f"{INNER_DIR}/inner.py", INNER, mode=0o755)
        box.run(["chmod", "755", INNER_DIR])
        cap: int | None = None
        for slots in slot_counts:
            for rep in range(args.reps):
                for which in ("tsd", "tsp"):
                    n = args.jobs if which == "tsd" or cap is None else min(args.jobs,
                                                                            cap - slots - 1)
                    print(f"{which}: {n} jobs on {slots} slots, run {rep + 1}", file=sys.stderr,
                          flush=True)
                    r = run_once(box, which, n, slots)
                    if which == "tsp" and r["full"]:
                        cap = int(str(r["jobs"])) + slots
                    results.setdefault((which, slots), []).append(r)
    report(results, slot_counts, args.jobs)


def _num(r: dict[str, object], key: str) -> float:
    return float(str(r[key]))


def report(results: dict[tuple[str, int], list[dict[str, object]]], slot_counts: list[int],
           n: int) -> None:
    """The table: jobs/s, ratio to tsp and the goal, CPU per job, tsd's top CPU users."""
    print(f"system service (booted box, scopes over D-Bus) vs tsp as the same user; up to "
          f"{n} `true` jobs per run (tsp holds ~1,000 at most), medians")
    print(f"{'slots':>5} {'tsd jobs/s':>11} {'tsp jobs/s':>11} {'tsd/tsp':>8} "
          f"{'goal >= 0.5x':>12} {'tsd CPU/job':>12} {'tsp CPU/job':>12}")
    for slots in slot_counts:
        med: dict[str, tuple[float, float]] = {}
        for which in ("tsd", "tsp"):
            rs = results[(which, slots)]
            med[which] = (
                statistics.median(_num(r, "jobs") / _num(r, "seconds") for r in rs),
                statistics.median(_num(r, "cpu") / _num(r, "jobs") * 1000 for r in rs),
            )
        ratio = med["tsd"][0] / med["tsp"][0]
        print(f"{slots:>5} {med['tsd'][0]:>11.1f} {med['tsp'][0]:>11.1f} {ratio:>7.2f}x "
              f"{'yes' if ratio >= 0.5 else 'NO':>12} {med['tsd'][1]:>9.2f} ms "
              f"{med['tsp'][1]:>9.2f} ms")
    for slots in slot_counts:
        for which in ("tsd", "tsp"):
            r = results[(which, slots)][-1]
            jobs = _num(r, "jobs")
            groups = r["cgroups"]
            assert isinstance(groups, dict)
            # Leaves and near-leaves say where it went; "." is the whole box.
            top = sorted(((float(v), k) for k, v in groups.items() if k != "."), reverse=True)
            parts = ", ".join(f"{k} {v / jobs * 1000:.2f}" for v, k in top[:6] if v > 0)
            note = ", its queue full" if r["full"] else ""
            print(f"  {which}, {slots} slots, {int(jobs)} jobs{note}; CPU ms/job by cgroup: "
                  f"{parts}")


if __name__ == "__main__":
    main()

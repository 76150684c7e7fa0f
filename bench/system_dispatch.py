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


# The floor of a scope per job, run in the box as root with the project's interpreter:
# what any Python service keeping the system contract must do per job, and nothing
# else. Each of `slots` threads, job after job: fork a child that waits on a pipe; put
# it in a new transient scope in alice's slice (one StartTransientUnit with the
# properties tsd sets, on the thread's own connection through tsd.dbuswire, the leanest
# D-Bus client we have: GDBus costs ~1 ms of CPU more per call); wait until /proc says
# it is in the scope's cgroup; tell it to go; it drops to alice (setgroups, setgid, setuid)
# and execs `true`; reap it. No socket, no client, no queue, no state, no exit report,
# no supervisor: a bound from above on the rate of any design with that contract.
FLOOR = r"""
import itertools, json, os, pwd, sys, threading, time
from pathlib import Path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spoolers import cgroup_usages
from tsd.dbuswire import BusConnection

n, slots, user = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
pw = pwd.getpwnam(user)
groups = os.getgrouplist(user, pw.pw_gid)
local = threading.local()
tag = time.monotonic_ns()
ids = iter(range(n))
take = threading.Lock()
steps = {"fork": 0.0, "dbus": 0.0, "wait": 0.0, "reap": 0.0}  # the loop's CPU by step

def charge(step, since):
    now = time.thread_time()
    with take:
        steps[step] += now - since
    return now

def one(i):
    t = time.thread_time()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(go_w)
            if os.read(go_r, 1) == b"g":
                os.setgroups(groups)
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)
                os.execv("/bin/true", ["true"])
        finally:
            os._exit(127)
    os.close(go_r)
    t = charge("fork", t)
    unit = f"tsd-floor-{tag}-{i}.scope"
    props = [
        ("Description", ("s", f"floor job {i}")),
        ("Slice", ("s", f"tsd-u{pw.pw_uid}.slice")),
        ("PIDs", ("au", [pid])),
        ("CollectMode", ("s", "inactive-or-failed")),
        ("CPUAccounting", ("b", True)),
        ("MemoryAccounting", ("b", True)),
        ("TasksAccounting", ("b", True)),
    ]
    if not hasattr(local, "bus"):
        local.bus = BusConnection()
    local.bus.call("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                   "org.freedesktop.systemd1.Manager", "StartTransientUnit",
                   "ssa(sv)a(sa(sv))", (unit, "fail", props, []))
    t = charge("dbus", t)
    while not Path(f"/proc/{pid}/cgroup").read_text().rstrip().endswith("/" + unit):
        time.sleep(0.0005)
    os.write(go_w, b"g")
    os.close(go_w)
    t = charge("wait", t)
    _, status = os.waitpid(pid, 0)
    charge("reap", t)
    assert status == 0, status

def slot():
    while True:
        with take:
            i = next(ids, None)
        if i is None:
            return
        one(i)

def cpu():
    return cgroup_usages(Path("/sys/fs/cgroup"), depth=2)

before = cpu()
t0 = time.perf_counter()
threads = [threading.Thread(target=slot) for _ in range(slots)]
for t in threads:
    t.start()
for t in threads:
    t.join()
seconds = time.perf_counter() - t0
after = cpu()
delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
print(json.dumps({"jobs": n, "seconds": seconds, "cpu": delta["."], "full": False,
                  "cgroups": delta, "steps": steps}))
"""

CONTENDERS = ("tsd", "floor", "tsp")
# tsp's queue holds ~1,000 jobs; a run that filled it once returned at once, timing
# nothing: its runs stay below that.
TSP_JOBS = 900


def run_once(box: Box, which: str, n: int, slots: int) -> dict[str, object]:
    """One dispatch run in the box as alice; its JSON."""
    if which == "floor":
        r = box.run([box.python, f"{INNER_DIR}/floor.py", str(n), str(slots), "alice"],
                    timeout=3600)
        return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
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
        box.write_file(f"{INNER_DIR}/floor.py", FLOOR, mode=0o755)
        box.run(["chmod", "755", INNER_DIR])
        cap: int | None = None
        for slots in slot_counts:
            for rep in range(args.reps):
                for which in CONTENDERS:
                    n = args.jobs if which != "tsp" else min(
                        args.jobs, TSP_JOBS if cap is None else cap - slots - 1)
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
    """The table: jobs/s and CPU per job of tsd, the floor and tsp, ratios to tsp and
    the goal; then the cgroups that used the most CPU in each run."""
    print(f"system service (booted box, scopes over D-Bus) vs tsp as the same user; up to "
          f"{n} `true` jobs per run (tsp holds ~1,000 at most), medians; floor: a scope per "
          f"job and nothing else (FLOOR)")
    print(f"{'slots':>5} {'tsd jobs/s':>11} {'floor':>8} {'tsp':>8} {'tsd/tsp':>8} "
          f"{'goal >= 0.5x':>12} {'floor/tsp':>9} {'CPU/job: tsd':>13} {'floor':>8} "
          f"{'tsp':>8}")
    for slots in slot_counts:
        med: dict[str, tuple[float, float]] = {}
        for which in CONTENDERS:
            rs = results[(which, slots)]
            med[which] = (
                statistics.median(_num(r, "jobs") / _num(r, "seconds") for r in rs),
                statistics.median(_num(r, "cpu") / _num(r, "jobs") * 1000 for r in rs),
            )
        ratio = med["tsd"][0] / med["tsp"][0]
        print(f"{slots:>5} {med['tsd'][0]:>11.1f} {med['floor'][0]:>8.1f} {med['tsp'][0]:>8.1f} "
              f"{ratio:>7.2f}x {'yes' if ratio >= 0.5 else 'NO':>12} "
              f"{med['floor'][0] / med['tsp'][0]:>8.2f}x {med['tsd'][1]:>10.2f} ms "
              f"{med['floor'][1]:>5.2f} ms {med['tsp'][1]:>5.2f} ms")
    for slots in slot_counts:
        for which in CONTENDERS:
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
            steps = r.get("steps")
            if isinstance(steps, dict):  # the floor loop's own CPU (its threads), by step
                print("    the floor loop's CPU ms/job by step: " + ", ".join(
                    f"{k} {float(v) / jobs * 1000:.2f}" for k, v in steps.items()))


if __name__ == "__main__":
    main()

"""An --array through tsd's Slurm engine vs plain `sbatch --array` vs N single submits.

Boots a systemd box (as the system tests do), starts a one-node Slurm in it
(tests/system/slurmbox.py), installs tsd with `cluster.engine: slurm`, and then,
inside the box as a real user, times for an array of N trivial tasks:

* submit: how long `ts --array 0-<N-1> CMD` takes to return, vs
  `sbatch --array=0-<N-1> --wrap CMD`, vs N separate `ts CMD` (the only way
  before tsd mapped --array to Slurm's job arrays);
* all ran: from just before the submit until every task's command has run
  (each writes its own clock to a file named by its index);
* ts saw all end: until `ts -M json` lists every element finished (tsd's
  poll recorded each task's end).

Needs root (the box) and Debian's slurmctld, slurmd, slurm-client and munge.
Usage: .venv/bin/python bench/slurm_array.py [N] [rounds]    (default 100 tasks, 3 rounds)
"""

from __future__ import annotations

import statistics
import sys

from slurmbench import run_as_alice

# Runs inside the box as alice: plain Python, timing with the box's clock.
INNER = r"""
import json, os, subprocess, sys, time
n, rounds = int(sys.argv[1]), int(sys.argv[2])
home = os.path.expanduser("~")
os.chdir(home)
out = {k: [] for k in ("ts_submit", "sbatch_submit", "singles_submit", "ts_ran",
                       "sbatch_ran", "singles_ran", "ts_seen")}

def wait_all(prefix, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(os.path.exists(f"{prefix}.{i}") for i in range(n)):
            return
        time.sleep(0.01)
    raise SystemExit(f"not all {n} tasks ran ({prefix})")

for r in range(rounds):
    mark = f"{home}/ts{r}"
    t0 = time.time()
    ids = subprocess.run(["ts", "--array", f"0-{n - 1}", "sh", "-c",
                          f"touch {mark}.$TS_ARRAY_TASK_ID"],
                         check=True, capture_output=True, text=True).stdout.split()
    out["ts_submit"].append(time.time() - t0)
    wait_all(mark)
    out["ts_ran"].append(time.time() - t0)
    while True:  # one ts -M json per look: N ts -w calls would time N client starts
        listed = json.loads(subprocess.run(["ts", "-M", "json"], check=True,
                                           capture_output=True, text=True).stdout)
        ended = {str(j["ID"]) for j in listed if j["State"] == "finished"}
        if set(ids) <= ended:
            break
    out["ts_seen"].append(time.time() - t0)

    mark = f"{home}/sb{r}"
    t0 = time.time()
    subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", f"--array=0-{n - 1}",
                    "--wrap", f"touch {mark}.$SLURM_ARRAY_TASK_ID"],
                   check=True, capture_output=True)
    out["sbatch_submit"].append(time.time() - t0)
    wait_all(mark)
    out["sbatch_ran"].append(time.time() - t0)

    mark = f"{home}/one{r}"
    t0 = time.time()
    for i in range(n):
        subprocess.run(["ts", "touch", f"{mark}.{i}"], check=True, capture_output=True)
    out["singles_submit"].append(time.time() - t0)
    wait_all(mark)
    out["singles_ran"].append(time.time() - t0)
print(json.dumps(out))
"""


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    data = run_as_alice("slurm_array", INNER, [str(n), str(rounds)], timeout=1800)
    med = {k: statistics.median(v) for k, v in data.items()}
    print(f"Slurm 22.05 one-node cluster in a box, arrays of {n} trivial tasks, "
          f"{rounds} rounds, medians (seconds):")
    sb = med["sbatch_submit"]
    print(f"  submit returns   ts --array {med['ts_submit']:.3f}   sbatch --array {sb:.3f}"
          f"   {n} x ts {med['singles_submit']:.3f}   ratios ts/sbatch "
          f"{med['ts_submit'] / sb:.2f}x, singles/ts --array "
          f"{med['singles_submit'] / med['ts_submit']:.1f}x")
    sr = med["sbatch_ran"]
    print(f"  all {n} ran       ts --array {med['ts_ran']:.3f}   sbatch --array {sr:.3f}"
          f"   {n} x ts {med['singles_ran']:.3f}   ratio ts/sbatch {med['ts_ran'] / sr:.2f}x")
    print(f"  ts lists all {n} finished: {med['ts_seen']:.3f}"
          f" ({med['ts_seen'] - med['ts_ran']:.3f} after the last ran)")


if __name__ == "__main__":
    main()

"""Submit latency and submit->start through tsd's Slurm engine vs plain sbatch.

Boots a systemd box (as the system tests do), starts a one-node Slurm in it
(tests/system/slurmbox.py), installs tsd with `cluster.engine: slurm`, and then,
inside the box as a real user, times:

* submit: how long `ts true` takes to return vs `sbatch --parsable --wrap true`;
* submit -> start: from just before the submit until the job's command runs
  (it writes its own clock), for `ts` vs `sbatch`, one job at a time.

Needs root (the box) and Debian's slurmctld, slurmd, slurm-client and munge.
Usage: .venv/bin/python bench/slurm_latency.py [runs]    (default 20)
"""

from __future__ import annotations

import statistics
import sys

from slurmbench import run_as_alice

# Runs inside the box as alice: plain Python, timing with the box's clock.
INNER = r"""
import json, os, subprocess, sys, time
runs = int(sys.argv[1])
out = {"ts_submit": [], "sbatch_submit": [], "ts_start": [], "sbatch_start": [], "ts_list": []}
os.chdir(os.path.expanduser("~"))

def wait_file(path, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            text = open(path).read().strip()
            if text:
                return float(text)
        except OSError:
            pass
        time.sleep(0.005)
    raise SystemExit(f"no start seen in {path}")

for i in range(runs):
    t0 = time.time()
    subprocess.run(["ts", "true"], check=True, capture_output=True)
    out["ts_submit"].append(time.time() - t0)
    t0 = time.time()
    subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "true"],
                   check=True, capture_output=True)
    out["sbatch_submit"].append(time.time() - t0)
    t0 = time.time()
    subprocess.run(["ts", "-l"], check=True, capture_output=True)
    out["ts_list"].append(time.time() - t0)

for i in range(runs):
    mark = f"{os.getcwd()}/start.ts.{i}"
    t0 = time.time()
    subprocess.run(["ts", "sh", "-c", f"date +%s.%N > {mark}"], check=True, capture_output=True)
    out["ts_start"].append(wait_file(mark) - t0)
    mark = f"{os.getcwd()}/start.sb.{i}"
    t0 = time.time()
    subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap",
                    f"date +%s.%N > {mark}"], check=True, capture_output=True)
    out["sbatch_start"].append(wait_file(mark) - t0)
print(json.dumps(out))
"""


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    data = run_as_alice("slurm_latency", INNER, [str(runs)], timeout=600)
    med = {k: statistics.median(v) for k, v in data.items()}
    print(f"Slurm 22.05 one-node cluster in a box, {runs} runs each, medians (min-max):")
    for what in ("submit", "start"):
        t, s = med[f"ts_{what}"], med[f"sbatch_{what}"]
        label = "submit returns" if what == "submit" else "submit -> command runs"
        print(f"  {label:24} ts {t * 1000:7.1f} ms "
              f"({min(data[f'ts_{what}']) * 1000:.0f}-{max(data[f'ts_{what}']) * 1000:.0f})"
              f"   sbatch {s * 1000:7.1f} ms "
              f"({min(data[f'sbatch_{what}']) * 1000:.0f}-"
              f"{max(data[f'sbatch_{what}']) * 1000:.0f})   ratio {t / s:.2f}x")
    print(f"  (ts -l, the client's own start and one round trip: {med['ts_list'] * 1000:.1f} ms)")


if __name__ == "__main__":
    main()

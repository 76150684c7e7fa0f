"""Start-up of everyday `ts` calls against `python -c pass`, interleaved, same environment.

Prints medians (wall and CPU, in ms) and their ratios to `python -c pass` (the
aim is at most 2x). The client runs from a throwaway venv with tsd installed
the way install.sh installs it: a regular, byte-compiled install (not the
editable one the tests use) whose bin/ts is the lean launcher of tsd/entry.py
(`python -S`, written by `python -m tsd.entry` as install.sh does), so import
costs are real. For comparison: pip's console script for the same install
(`ts-pip`: it imports re, and Python runs site.py), `python -c 'import re'`
(the floor of that script) and `python -S -c pass` (the floor of the launcher).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import PersonalDaemon, med_ms, time_command

REPO = Path(__file__).resolve().parents[1]


def installed_venv() -> Path:
    """A venv with tsd installed as install.sh installs it; reuses the system's click etc.

    bin/ts is the lean launcher; pip's console script stays as bin/ts-pip.
    """
    venv = Path(tempfile.mkdtemp(prefix="tsd-bench-venv-", dir="/tmp"))
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True
    )
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-build-isolation",
         str(REPO)],
        check=True,
    )
    subprocess.run([str(venv / "bin" / "python"), "-m", "compileall", "-q", str(venv)],
                   check=True, stdout=subprocess.DEVNULL)
    ts = venv / "bin" / "ts"
    ts.rename(venv / "bin" / "ts-pip")
    # As install.sh writes /opt/tsd/bin/ts.
    launcher = subprocess.run([str(venv / "bin" / "python"), "-I", "-m", "tsd.entry"],
                              check=True, capture_output=True, text=True).stdout
    ts.write_text(launcher)
    ts.chmod(0o755)
    return venv


def child_cpu() -> float:
    """CPU seconds of the children so far: steadier than wall time on a busy machine."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(runs: int = 40) -> None:
    venv = installed_venv()
    ts, python = str(venv / "bin" / "ts"), str(venv / "bin" / "python")
    ts_pip = str(venv / "bin" / "ts-pip")
    d = PersonalDaemon(TS_SLOTS="4")
    try:
        d.env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run([ts, "true"], env=d.env, check=True, capture_output=True)
        d.ts("-S", "0")  # nothing runs: the submits below only queue
        for i in range(10):
            d.ts("echo", str(i))  # ts -l lists 10 jobs
        calls = {
            "python -c pass": [python, "-c", "pass"],
            # The floor of the lean launcher: no site.py.
            "python -S -c pass": [python, "-S", "-c", "pass"],
            # The floor of pip's console script: it imports re (and enum).
            "python -c 'import re'": [python, "-c", "import re"],
            "ts -n true (submit)": [ts, "-n", "true"],
            "ts true (submit)": [ts, "true"],
            "ts true (pip script)": [ts_pip, "true"],
            "ts -l (10 jobs)": [ts, "-l"],
            "ts -l (pip script)": [ts_pip, "-l"],
            "ts -i 1": [ts, "-i", "1"],
            "ts -S": [ts, "-S"],
        }
        wall: dict[str, list[float]] = {name: [] for name in calls}
        cpu: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(runs):
            for name, argv in calls.items():
                c0 = child_cpu()
                wall[name] += time_command(argv, d.env, 1)
                cpu[name].append(child_cpu() - c0)
        base_wall, base_cpu = med_ms(wall["python -c pass"]), med_ms(cpu["python -c pass"])
        for name in calls:
            print(f"{name:22s} median {med_ms(wall[name]):7.1f} ms "
                  f"({med_ms(wall[name]) / base_wall:.2f}x)   CPU {med_ms(cpu[name]):6.1f} ms "
                  f"({med_ms(cpu[name]) / base_cpu:.2f}x)")
    finally:
        d.stop()
        subprocess.run(["rm", "-rf", str(venv)], check=False)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)

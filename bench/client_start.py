"""Submit latency of `ts -n true` against `python -c pass`, interleaved, same environment.

Prints medians in ms and their ratio (the aim is at most 3x). The client runs
from a throwaway venv with tsd installed the way users get it (a regular, byte-
compiled install, not the editable one the tests use), so import costs are real.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from common import PersonalDaemon, med_ms, time_command

REPO = Path(__file__).resolve().parents[1]


def installed_venv() -> Path:
    """A venv with tsd installed non-editable; reuses the system's click etc."""
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
    return venv


def main(runs: int = 40) -> None:
    venv = installed_venv()
    ts, python = str(venv / "bin" / "ts"), str(venv / "bin" / "python")
    d = PersonalDaemon(TS_SLOTS="4")
    try:
        d.env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run([ts, "true"], env=d.env, check=True, capture_output=True)
        submit: list[float] = []
        listing: list[float] = []
        bare: list[float] = []
        for _ in range(runs):
            bare += time_command([python, "-c", "pass"], d.env, 1)
            submit += time_command([ts, "-n", "true"], d.env, 1)
            listing += time_command([ts, "-l"], d.env, 1)
        print(f"python -c pass      median {med_ms(bare):7.1f} ms")
        print(f"ts -n true (submit) median {med_ms(submit):7.1f} ms  "
              f"ratio {med_ms(submit) / med_ms(bare):.2f}x")
        print(f"ts -l               median {med_ms(listing):7.1f} ms  "
              f"ratio {med_ms(listing) / med_ms(bare):.2f}x")
    finally:
        d.stop()
        subprocess.run(["rm", "-rf", str(venv)], check=False)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)

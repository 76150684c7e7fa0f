"""Submit latency of `ts -n true` against `python -c pass`, interleaved, same environment.

Prints medians in ms and their ratio (the aim is at most 3x). Byte-compiles the
package first, as an installed package would be.
"""

from __future__ import annotations

import compileall
import sys
from pathlib import Path

from common import TS, PersonalDaemon, med_ms, time_command

import tsd


def main(runs: int = 40) -> None:
    compileall.compile_dir(str(Path(tsd.__file__).parent), quiet=1)
    d = PersonalDaemon(TS_SLOTS="4")
    try:
        d.ts("true")  # start the daemon
        submit: list[float] = []
        listing: list[float] = []
        bare: list[float] = []
        for _ in range(runs):
            bare += time_command([sys.executable, "-c", "pass"], d.env, 1)
            submit += time_command([TS, "-n", "true"], d.env, 1)
            listing += time_command([TS, "-l"], d.env, 1)
        print(f"python -c pass      median {med_ms(bare):7.1f} ms")
        print(f"ts -n true (submit) median {med_ms(submit):7.1f} ms  "
              f"ratio {med_ms(submit) / med_ms(bare):.2f}x")
        print(f"ts -l               median {med_ms(listing):7.1f} ms  "
              f"ratio {med_ms(listing) / med_ms(bare):.2f}x")
    finally:
        d.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)

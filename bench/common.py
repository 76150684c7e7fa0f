"""Shared helpers for the benchmarks: a private personal daemon and timing."""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TS = str(BIN / "ts")


class PersonalDaemon:
    """A personal tsd in a temp dir, started by the first `ts` call, stopped by pid."""

    def __init__(self, **extra_env: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tsd-bench-", dir="/tmp"))
        (self.root / "tmp").mkdir()
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("TS_", "XDG_"))
        }
        self.env.update(
            TMPDIR=str(self.root / "tmp"),
            XDG_STATE_HOME=str(self.root / "state"),
            TS_SOCKET=str(self.root / "run" / "tsd.sock"),
            **extra_env,
        )

    @property
    def state_dir(self) -> Path:
        return self.root / "state" / "tsd"

    def ts(self, *args: str) -> str:
        return subprocess.run(
            [TS, *args], env=self.env, check=True, capture_output=True, text=True
        ).stdout

    def pid(self) -> int:
        return int((self.state_dir / "tsd.pid").read_text())

    def stop(self) -> None:
        try:
            pid = self.pid()
        except OSError:
            pid = None
        if pid is not None:
            subprocess.run([TS, "-T"], env=self.env, capture_output=True)
            subprocess.run([TS, "-K"], env=self.env, capture_output=True)
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def time_command(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    """Wall seconds of `runs` runs of a command."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    return out


def med_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000

"""Helpers to run a real personal daemon in a temp dir and drive it with the real `ts`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

TS = str(Path(sys.executable).parent / "ts")
TSD = str(Path(sys.executable).parent / "tsd")

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


class Env(dict[str, str]):
    """The environment a test's `ts` calls run in, plus where things live."""

    root: Path
    state: Path
    tmp: Path
    socket: Path

    def daemon_pid(self) -> int | None:
        """The personal daemon's pid, if one is running."""
        try:
            pid = int((self.state / "tsd" / "tsd.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None


def queue(ts: Runner, *args: str, **kw: object) -> int:
    """Queue a job; ts must print exactly its id."""
    proc = ts(*args, **kw)
    assert re.fullmatch(r"[0-9]+\n", proc.stdout), proc.stdout
    return int(proc.stdout)


def wait_until(
    check: Callable[[], object], timeout: float = 15.0, what: str = "condition",
    interval: float = 0.05,
) -> None:
    """Poll `check` until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def state(ts: Runner, job: int) -> str:
    """The job's state word (ts -s)."""
    return str(ts("-s", str(job)).stdout.strip())


def wait_state(ts: Runner, job: int, *states: str, timeout: float = 15.0) -> None:
    """Poll until the job is in one of `states`."""
    wait_until(lambda: state(ts, job) in states, timeout, f"job {job} to be {'/'.join(states)}")


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie waiting for its reaper counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def make_env(root: Path, **extra: str) -> Env:
    """A private TMPDIR, state dir and socket under `root` (short: unix paths are limited)."""
    env = Env(
        {k: v for k, v in os.environ.items() if not k.startswith(("TS_", "XDG_", "TSD_"))}
    )
    env.root = root
    env.state = root / "state"
    env.tmp = root / "tmp"
    env.socket = root / "run" / "tsd.sock"
    env.tmp.mkdir(parents=True, exist_ok=True)
    env.update(
        TMPDIR=str(env.tmp),
        XDG_STATE_HOME=str(env.state),
        TS_SOCKET=str(env.socket),
        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.update(extra)
    return env


def run_ts(
    env: Env, *args: str, check: bool = True, input: str | None = None, timeout: float = 30,
    cwd: str | None = None, extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real `ts` once; on check failure the message has everything."""
    run_env = dict(env)
    if extra_env:
        run_env.update(extra_env)
    proc = subprocess.run(
        [TS, *args], env=run_env, input=input, capture_output=True, text=True,
        timeout=timeout, cwd=cwd or str(env.tmp),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"ts {' '.join(args)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def stop_daemon(env: Env) -> None:
    """End every job this test's daemon runs, then the daemon, by pid."""
    pid = env.daemon_pid()
    if pid is None:
        return
    run_ts(env, "-T", check=False, timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline:
        out = run_ts(env, "-R", check=False, timeout=10).stdout.strip()
        if out in ("0", ""):
            break
        time.sleep(0.05)
    run_ts(env, "-K", check=False, timeout=10)
    deadline = time.time() + 5
    while time.time() < deadline:
        if not alive(pid):
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


def info(ts: Runner, job: int) -> str:
    return str(ts("-i", str(job)).stdout)


def wait_reason(ts: Runner, job: int) -> str:
    """The `Wait reason:` line of ts -i, without its label."""
    for line in info(ts, job).splitlines():
        if line.startswith("Wait reason: "):
            return line.removeprefix("Wait reason: ")
    raise AssertionError(f"job {job} shows no wait reason:\n{info(ts, job)}")


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The refusal's text; it must be exactly one `ts: ` line, nothing on stdout, exit 1."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ts: "), proc.stderr
    return lines[0]


class Gate:
    """A flag file; jobs made with `hold` run until the test opens it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def hold(self, *echo: str) -> list[str]:
        """argv of a job that prints `echo` (shell words) and then waits for the gate."""
        words = " ".join(echo)
        return ["sh", "-c", f"echo {words}; while [ ! -e {self.path} ]; do sleep 0.05; done"]

    def open(self) -> None:
        self.path.touch()


def start_daemon_with_config(env: Env, config: str) -> int:
    """A personal daemon with this config file text (the first `ts` call would start one
    without a config); returns its pid once it answers."""
    cfg = env.root / "tsd.yaml"
    cfg.write_text(config)
    proc = subprocess.Popen(
        [TSD, "--user", "--config", str(cfg), "--socket", str(env.socket)],
        env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True, cwd="/",
    )
    wait_until(lambda: env.socket.exists() and env.daemon_pid() == proc.pid,
               what="the daemon to listen")
    return proc.pid

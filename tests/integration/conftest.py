"""Fixtures: a real personal daemon in a temp dir, driven by the real `ts` executable."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from integration.harness import Env, Gate, Runner, make_env, run_ts, stop_daemon


@pytest.fixture
def tsd_env() -> Iterator[Env]:
    """A fresh private place for one personal daemon."""
    root = Path(tempfile.mkdtemp(prefix="tsd-it-", dir="/tmp"))
    env = make_env(root)
    try:
        yield env
    finally:
        stop_daemon(env)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ts(tsd_env: Env) -> Runner:
    """`ts(*args, check=True, input=None, timeout=30, cwd=None, extra_env=None)`."""

    def runner(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return run_ts(tsd_env, *args, **kw)  # type: ignore[arg-type]

    return runner


@pytest.fixture
def gates(tsd_env: Env) -> Callable[[str], Gate]:
    """Make named gates in the test's private directory."""
    return lambda name: Gate(tsd_env.tmp / f"gate-{name}")


@pytest.fixture
def outsider() -> Iterator[int]:
    """A live process of ours, outside tsd, that a picture may show on a GPU
    (as a stranger's job would be)."""
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()

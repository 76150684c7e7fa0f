"""Fixtures: a real personal daemon in a temp dir, driven by the real `ts` executable."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration.harness import Env, Runner, make_env, run_ts, stop_daemon


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

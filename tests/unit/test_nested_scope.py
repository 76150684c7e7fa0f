"""A personal tsd run inside a system tsd job (its job scope): the personal jobs'
supervisors must not take that scope for their own job's."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
from unit.test_spawner import plan
from unit.test_supervisor_pool import report_in, until_end

from tsd import jobtree, launch


def test_a_personal_job_in_a_system_jobs_scope_leaves_that_scopes_processes_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outer = subprocess.Popen(["sleep", "300"])  # a process of the system job around us
    try:
        scope = tmp_path / "tsd-job-7.scope"
        scope.mkdir()
        (scope / "cgroup.procs").write_text(f"{outer.pid}\n")
        (scope / "cpu.stat").write_text("usage_usec 999000000\n")
        # What a supervisor of this process finds itself in (the forked one inherits it).
        monkeypatch.setattr(jobtree, "own_cgroup_dir", lambda: str(scope))
        started = launch.spawn(dataclasses.replace(plan(tmp_path, 1, "exit 0"), reuse=True))
        started.go()
        report = report_in(until_end(started))
        assert report.exit.code == 0
        assert report.exit.cpu_seconds != 999.0  # not the outer scope's CPU
        assert outer.poll() is None  # not ended as if it were this job's leftover
    finally:
        outer.kill()
        outer.wait()

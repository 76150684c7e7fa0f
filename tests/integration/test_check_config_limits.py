"""`tsd --check-config` says when this machine cannot enforce the job limits (issue 9)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tsd import daemon
from tsd.cgroupcheck import read_controller_status

REPO = Path(__file__).resolve().parents[2]


def test_check_config_prints_the_unenforced_limits_warning_on_stderr_and_exits_0() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tsd.daemon", "--check-config", str(REPO / "etc" / "tsd.yaml")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    warning = read_controller_status().warning()
    if warning is None:  # a machine whose cgroup v2 has memory, cpu and pids
        assert r.stderr == ""
    else:  # this build machine: no v2 controllers for tsd.slice
        assert r.stderr == f"tsd: warning: {warning}\n"
        assert "NOT enforced" in r.stderr


def test_check_config_says_nothing_more_where_limits_are_enforced(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(daemon, "limits_warning", lambda: None)
    assert daemon.check_config(str(REPO / "etc" / "tsd.yaml")) == 0
    out, err = capsys.readouterr()
    assert "OK" in out and err == ""


def test_system_daemon_start_logs_the_unenforced_limits_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(daemon, "limits_warning", lambda: "memory_max NOT enforced")
    with caplog.at_level("WARNING", logger="tsd"):
        daemon.warn_unenforced_limits()
    assert [r.getMessage() for r in caplog.records] == ["memory_max NOT enforced"]

"""Detecting whether the kernel can enforce tsd's job limits (cgroup v2 controllers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tsd import cgroupcheck
from tsd.cgroupcheck import controller_status, read_controller_status


def test_all_controllers_available_and_enabled_is_ok_with_no_warning() -> None:
    status = controller_status("cpuset cpu io memory pids\n", "cpu memory pids\n")
    assert status.ok
    assert status.enabled == {"cpu", "memory", "pids"}
    assert status.warning() is None


def test_available_but_not_yet_enabled_is_ok_since_systemd_enables_on_demand() -> None:
    status = controller_status("cpu io memory pids", "")
    assert status.ok and status.pending == {"cpu", "memory", "pids"}
    assert status.warning() is None


def test_controllers_held_by_cgroup_v1_are_missing_and_named_with_their_limits() -> None:
    status = controller_status("cpu io\n", "cpu\n")
    assert not status.ok
    assert status.missing == ("memory", "pids")
    warning = status.warning()
    assert warning is not None and "\n" not in warning
    assert "memory, pids" in warning and "memory_max" in warning and "tasks_max" in warning
    assert "cpu_quota" not in warning and "NOT enforced" in warning


def test_no_cgroup2_at_all_warns_that_nothing_is_enforced() -> None:
    status = controller_status(None, None)
    assert not status.ok and not status.cgroup2
    assert "NOT enforced" in (status.warning() or "")


def test_reader_prefers_the_slices_subtree_control_over_the_roots(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("\n")
    (tmp_path / "tsd.slice").mkdir()
    (tmp_path / "tsd.slice" / "cgroup.subtree_control").write_text("memory pids\n")
    status = read_controller_status((str(tmp_path),))
    assert status.enabled == {"memory", "pids"} and status.pending == {"cpu"}


def test_reader_falls_back_to_the_roots_subtree_control_and_to_unified(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("")  # hybrid: v1 holds everything
    (unified / "cgroup.subtree_control").write_text("")
    status = read_controller_status((str(tmp_path), str(unified)))
    assert status.cgroup2 and status.missing == ("memory", "cpu", "pids")


def test_reader_without_any_cgroup2_root_reports_no_cgroup2(tmp_path: Path) -> None:
    assert not read_controller_status((str(tmp_path / "none"),)).cgroup2


def test_module_entry_point_prints_one_line_and_exits_by_verdict(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cgroupcheck, "read_controller_status",
                        lambda: controller_status("cpu memory pids", ""))
    assert cgroupcheck.main() == 0
    monkeypatch.setattr(cgroupcheck, "read_controller_status",
                        lambda: controller_status("cpu", ""))
    assert cgroupcheck.main() == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith("tsd: warning: ") and "memory" in out[1]

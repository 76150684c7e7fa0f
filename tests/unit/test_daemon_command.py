"""The `tsd` command itself: --check-config and the config warnings it shares with the daemon."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tsd import daemon
from tsd.config import unknown_names
from tsd.configfile import parse_config

GHOSTS = (
    'admins: [root, nosuch-admin-x, "@nosuch-group-x"]\n'
    "users:\n  nosuch-user-x: {max_gpus: 1}\n  root: {max_gpus: 2}\n"
    "groups:\n  nosuch-students-x: {max_gpus: 1}\n  root: {max_gpus: 1}\n"
)


def run_tsd(args: list[str]) -> int:
    with pytest.raises(SystemExit) as stop:
        daemon.main(args)
    code = stop.value.code
    assert isinstance(code, int)
    return code


def test_check_config_without_a_path_checks_the_system_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "tsd.yaml"
    conf.write_text("slots: 7\n")
    monkeypatch.setattr(daemon, "SYSTEM_CONFIG", str(conf))
    assert run_tsd(["--check-config"]) == 0
    assert capsys.readouterr().out == f"{conf}: OK (7 slots, 0 user and 0 group overrides)\n"
    conf.write_text("slots: many\n")
    assert run_tsd(["--check-config"]) == 1
    assert capsys.readouterr().err.startswith(f"tsd: {conf}: line 1: slots")


def test_check_config_warns_about_users_and_groups_missing_here_but_exits_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "tsd.yaml"
    conf.write_text(GHOSTS)
    assert run_tsd(["--check-config", str(conf)]) == 0
    # Only the name warnings: whether this machine can enforce limits is another line.
    err = [line for line in capsys.readouterr().err.splitlines() if str(conf) in line]
    assert err == [
        f"tsd: warning: {conf}: admins: no user 'nosuch-admin-x' on this machine",
        f"tsd: warning: {conf}: admins: no group 'nosuch-group-x' on this machine",
        f"tsd: warning: {conf}: users: no user 'nosuch-user-x' on this machine",
        f"tsd: warning: {conf}: groups: no group 'nosuch-students-x' on this machine",
    ]


def test_unknown_names_asks_the_lookups_it_is_given() -> None:
    config = parse_config(GHOSTS)
    assert unknown_names(config, lambda _: True, lambda _: True) == []
    assert len(unknown_names(config, lambda _: False, lambda _: False)) == 7


def test_daemon_logs_the_same_warnings_at_start_and_reload(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="tsd"):
        daemon.log_name_warnings(parse_config(GHOSTS))
    assert "config: users: no user 'nosuch-user-x' on this machine" in caplog.messages
    assert len(caplog.messages) == 4

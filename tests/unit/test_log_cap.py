"""The personal daemon's log file stays under its cap: older lines move to tsd.log.1, .2."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsd.daemonlog import LOG_MAX_BYTES, CappedFileHandler, max_bytes


def _logger(path: Path, cap: int, backups: int = 2) -> tuple[logging.Logger, CappedFileHandler]:
    handler = CappedFileHandler(path, cap, backups)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger(f"cap-test-{path}")
    logger.addHandler(handler)
    return logger, handler


def _files(path: Path) -> list[Path]:
    """The log's files, oldest first."""
    older = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return [*older, path] if path.exists() else older


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=120), min_size=1, max_size=80),
    cap=st.integers(min_value=50, max_value=1500),
)
def test_the_files_hold_the_latest_lines_in_order_each_under_the_cap(
    tmp_path_factory: pytest.TempPathFactory, lengths: list[int], cap: int
) -> None:
    path = tmp_path_factory.mktemp("log") / "tsd.log"
    logger, handler = _logger(path, cap)
    lines = [f"{i:04d}" + "x" * n for i, n in enumerate(lengths)]
    for line in lines:
        logger.info(line)
    handler.close()
    files = _files(path)
    assert len(files) <= 3
    kept = [text.splitlines() for text in (f.read_text() for f in files)]
    # Whole lines, in order, the newest last: the tail of what was written.
    flat = [line for chunk in kept for line in chunk]
    assert flat == lines[len(lines) - len(flat):]
    assert flat[-1] == lines[-1]
    for f, chunk in zip(files, kept, strict=True):
        assert f.stat().st_size <= cap or len(chunk) == 1  # a line longer than the cap
    if len(files) < 3:  # nothing was dropped yet
        assert flat == lines


def test_a_log_already_past_the_cap_moves_aside_at_the_first_line(tmp_path: Path) -> None:
    path = tmp_path / "tsd.log"
    path.write_text("old line\n" * 1000)
    logger, handler = _logger(path, 4096)
    logger.info("new")
    handler.close()
    assert path.read_text() == "new\n"
    assert (tmp_path / "tsd.log.1").read_text() == "old line\n" * 1000


def test_the_oldest_file_is_dropped_past_the_backups(tmp_path: Path) -> None:
    path = tmp_path / "tsd.log"
    logger, handler = _logger(path, 100, backups=2)
    for i in range(40):
        logger.info("line %02d %s", i, "y" * 40)  # two lines a file
    handler.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tsd.log", "tsd.log.1", "tsd.log.2"]
    assert "line 39" in path.read_text() and "line 00" not in (tmp_path / "tsd.log.2").read_text()


def test_a_file_that_cannot_move_aside_keeps_growing_and_logging_goes_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tsd.log"
    (tmp_path / "tsd.log.1").mkdir()  # the rename onto it fails, even for root
    (tmp_path / "tsd.log.1" / "keep").write_text("")
    logger, handler = _logger(path, 100, backups=1)
    for i in range(20):
        logger.info("line %02d %s", i, "z" * 40)
    handler.close()
    text = path.read_text()
    assert all(f"line {i:02d}" in text for i in range(20))
    assert (tmp_path / "tsd.log.1" / "keep").exists()


@pytest.mark.parametrize(
    ("value", "cap"),
    [(None, LOG_MAX_BYTES), ("4096", 4096), ("abc", LOG_MAX_BYTES), ("0", LOG_MAX_BYTES),
     ("-5", LOG_MAX_BYTES), ("", LOG_MAX_BYTES)],
)
def test_the_cap_comes_from_the_environment_when_it_is_a_positive_number(
    value: str | None, cap: int
) -> None:
    env = {} if value is None else {"TSD_LOG_MAX_BYTES": value}
    assert max_bytes(env) == cap

"""Fixtures for every test: the NVML stand-in library and a GPU picture writer."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

# Started in the background of a non-interactive shell (`./tests/run &`), the run
# ignores SIGINT, and so would every ts it starts: Ctrl-C tests would find their
# client deaf to it. With Python's handler here instead, children get SIGINT's
# default at exec, as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Make tests/fixtures importable as `fixtures` whatever pytest's import mode.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from fixtures.nvml.build import build  # noqa: E402
from fixtures.nvml.picture import PictureFile  # noqa: E402


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the NVML stand-in, built once per session as .../libnvidia-ml.so.1."""
    return build(tmp_path_factory.mktemp("nvml"))


@pytest.fixture
def nvml_picture(tmp_path: Path, fake_nvml: Path) -> PictureFile:
    """This test's picture file (not written yet): .write() it; .env() points tsd at it."""
    return PictureFile(path=tmp_path / "nvml-picture.txt", library=fake_nvml)

"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tsd.spawnlink import SpawnerLauncher


@pytest.fixture
def spawner() -> Iterator[SpawnerLauncher]:
    """A real spawner (tsd.spawner), started, closed after the test."""
    s = SpawnerLauncher()
    s.start()
    yield s
    s.close()
